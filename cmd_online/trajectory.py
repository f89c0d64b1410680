"""CMDTrajectory: the compressed model of a training trajectory.

N weights over T records are held as M reference trajectories (M × T), and per weight a mode label
and affine coefficients a, b (paper, eq. 7):  ŵ_i(t) = a_i · references[mode_i, t] + b_i.
The object knows nothing of how it was fitted: post-hoc and online CMD produce the same thing.
"""

from __future__ import annotations

import numbers
import os

import torch

from .files import atomic_save, check_format, checksum, safe_load, unpack, verify_checksum
from .layout import Layout, check_tensor

FORMAT = "cmd_online.CMDTrajectory"
VERSION = 1
_REQUIRED = ("references", "reference_index", "a", "b", "modes", "window_start", "layout")
_OPTIONAL = ("mode_r2", "set_aside", "sample_index", "sample_history", "sample_modes")  # tensor arguments that
# default to None: saved when set, checked when in a file
_SAMPLES = ("sample_index", "sample_history", "sample_modes")  # the clustered samples: all three or none


def normalize_at(at: int, num_records: int, name: str = "at") -> int:
    """A record index in [0, num_records); negative values count from the end."""
    if isinstance(at, bool) or not isinstance(at, numbers.Integral):
        raise TypeError(f"{name} must be an int record index; got {type(at).__name__}")
    if not -num_records <= at < num_records:
        raise ValueError(f"{name}={at} is out of range: there are {num_records} records "
                         f"(valid: {-num_records}..{num_records - 1})")
    return int(at) % num_records


def reconstruct(a: torch.Tensor, b: torch.Tensor, modes: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """ŵ = a · column[modes] + b, for one record's reference values ``column`` (M,), in a's dtype.

    Computed in float64: a float32 product is then exact and the sum rounds once, so the result does
    not depend on how the vector is split (per tensor or flat) or on FMA use in the kernel.
    """
    picked = column.to(torch.float64).index_select(0, modes.to(torch.int32))
    return torch.addcmul(b.to(torch.float64), a.to(torch.float64), picked).to(a.dtype)


_CHUNK = 1 << 16  # entries per chunk of the element-wise finite check


def _vector(name: str, t: torch.Tensor, length: int, what: str) -> None:
    if t.shape != (length,):
        raise ValueError(f"{name} must be a vector of {what} = {length} entries; got shape {tuple(t.shape)}")


def _finite(name: str, t: torch.Tensor) -> None:
    """A ValueError unless every entry of ``t`` is finite; extra memory of one chunk, not of ``t``.

    A finite sum proves it (a NaN or an infinity makes any sum non-finite); only a sum that overflows
    is checked element by element, a chunk at a time (``isfinite`` makes temporaries of its input's size).
    """
    if bool(torch.isfinite(t.sum())):
        return
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in t.reshape(-1).split(_CHUNK))
    if bad:
        raise ValueError(f"{name} must be finite; it holds {bad} NaN or Inf value(s)")


def _in_range(name: str, t: torch.Tensor, high: int, what: str) -> None:
    """Every entry of the integer tensor ``t`` in [0, high), checked before any cast could wrap it."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        raise ValueError(f"{name} must lie in [0, {what} = {high}); got values from {int(t.min())} to {int(t.max())}")


def _check_layout(layout: Layout, N: int) -> Layout:
    for name, shape in zip(layout.names, layout.shapes):
        if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in shape):
            raise TypeError(f"layout: tensor {name!r} has shape {shape}; sizes must be ints")
        if any(x < 0 for x in shape):
            raise ValueError(f"layout: tensor {name!r} has a negative size in its shape {shape}")
    if layout.numel != N:
        raise ValueError(f"a has {N} entries but layout covers {layout.numel} weights; both must be N")
    return layout


class CMDTrajectory:
    """A CMD model of N weights over T records.

    Attributes:
        references (tensor): M × T reference trajectories (floating point, finite).
        reference_index (tensor): M distinct flat indices of the reference weights, in [0, N) (int64).
        a, b (tensor): N affine coefficients (floating point of one dtype, finite).
        modes (tensor): N mode labels (int32) in [0, M), 0 = the largest mode.
        window_start (int): first record of the window over which a and b were fitted, in [0, T).
        layout (Layout): names, shapes and dtypes of the tensors the flat index runs over (N weights).
        mode_r2 (tensor): mean R² of each mode's members over the window (M,), or None.
        set_aside (tensor): which references were set aside (M bool: they moved only by rounding in
            the window, so no weight was assigned to them, unless no reference moves: every weight
            then stays in mode 0 as a constant; concepts.md), or None (not known).
        sample_index, sample_history, sample_modes (tensor): the K weights that were clustered (flat
            indices, int64), their values over the clustered records (K × C, float) and the mode each
            was clustered into (int64, −1 for a sample that did not move), from which the clustered
            correlation matrix is drawn again; all three or None.
        metrics (dict): per-record metrics, name → float tensor of T entries (NaN where none was
            recorded), e.g. the trained and CMD model's test accuracy; or None.

    Every argument is checked: a wrong type or dtype raises TypeError, a wrong shape, range or value
    ValueError, each naming the argument.
    """

    def __init__(self, references, reference_index, a, b, modes, window_start: int = 0,
                 layout: Layout | None = None, mode_r2=None, set_aside=None, sample_index=None,
                 sample_history=None, sample_modes=None, metrics=None):
        references = check_tensor("references", references, "float")
        reference_index = check_tensor("reference_index", reference_index, "int")
        a, b = check_tensor("a", a, "float"), check_tensor("b", b, "float")
        modes = check_tensor("modes", modes, "int")
        mode_r2 = None if mode_r2 is None else check_tensor("mode_r2", mode_r2, "float")
        set_aside = None if set_aside is None else check_tensor("set_aside", set_aside, "bool")
        if isinstance(window_start, bool) or not isinstance(window_start, numbers.Integral):
            raise TypeError(f"window_start must be an int record index; got {type(window_start).__name__}")
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(f"layout must be a Layout (cmd_online.layout.Layout); got {type(layout).__name__}")

        if reference_index.dim() != 1 or reference_index.numel() == 0:
            raise ValueError(f"reference_index must be a non-empty vector (M ≥ 1 reference weights); "
                             f"got shape {tuple(reference_index.shape)}")
        M = reference_index.numel()
        if references.dim() != 2 or references.shape[0] != M:
            raise ValueError(f"references must be M × T with M = {M} (one row per entry of reference_index); "
                             f"got shape {tuple(references.shape)}")
        if references.shape[1] == 0:
            raise ValueError("references must hold at least one record (T ≥ 1); got 0 columns")
        _finite("references", references)
        if a.dim() != 1:
            raise ValueError(f"a must be a vector of N entries; got shape {tuple(a.shape)}")
        N = a.numel()
        if N == 0:
            raise ValueError("a must hold at least one weight (N ≥ 1); got 0")
        _finite("a", a)
        layout = _check_layout(layout if layout is not None else Layout.flat(N, a.dtype), N)
        _vector("b", b, N, "N")
        if b.dtype != a.dtype:
            raise TypeError(f"b must have a's dtype {a.dtype}; got {b.dtype}")
        _finite("b", b)
        _vector("modes", modes, N, "N")
        _in_range("modes", modes, M, "M")
        _in_range("reference_index", reference_index, N, "N")
        if torch.unique(reference_index).numel() != M:
            raise ValueError("reference_index must hold distinct flat indices; some appear more than once")
        T = references.shape[1]
        if not 0 <= window_start < T:
            raise ValueError(f"window_start must lie in [0, T = {T}); got {window_start}")
        if mode_r2 is not None:
            _vector("mode_r2", mode_r2, M, "M")
            _finite("mode_r2", mode_r2)
        if set_aside is not None:
            _vector("set_aside", set_aside, M, "M")
        samples = _samples(sample_index, sample_history, sample_modes, N, M)
        metrics = _metrics(metrics, T)

        self.references, self.a, self.b, self.layout, self.mode_r2 = references, a, b, layout, mode_r2
        self.set_aside = set_aside
        self.sample_index, self.sample_history, self.sample_modes = samples
        self.metrics = metrics
        self.reference_index = reference_index.long()
        self.modes = modes.to(torch.int32)
        self.window_start = int(window_start)

    @property
    def num_records(self) -> int:
        return self.references.shape[1]

    @property
    def num_modes(self) -> int:
        return self.references.shape[0]

    @property
    def num_weights(self) -> int:
        return self.a.numel()

    def mode_sizes(self) -> torch.Tensor:
        """Number of weights in each mode (M,)."""
        return torch.bincount(self.modes.long(), minlength=self.num_modes)

    def reconstruct(self, at: int = -1) -> torch.Tensor:
        """The flat N-vector of CMD weights at record ``at`` (negative counts from the end)."""
        at = normalize_at(at, self.num_records)
        return reconstruct(self.a, self.b, self.modes, self.references[:, at])

    def state_dict(self, at: int = -1) -> dict[str, torch.Tensor]:
        """The CMD weights at record ``at`` as named tensors, shaped and typed like the originals."""
        return self.layout.split(self.reconstruct(at))

    def to(self, device) -> "CMDTrajectory":
        optional = {name: None if getattr(self, name) is None else getattr(self, name).to(device) for name in _OPTIONAL}
        metrics = None if self.metrics is None else {k: v.to(device) for k, v in self.metrics.items()}
        return CMDTrajectory(self.references.to(device), self.reference_index.to(device), self.a.to(device),
                             self.b.to(device), self.modes.to(device), self.window_start, self.layout, **optional,
                             metrics=metrics)

    def nbytes(self) -> int:
        """Bytes of the tensors that make up the model."""
        tensors = [self.references, self.reference_index, self.a, self.b, self.modes]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write the trajectory to ``path`` atomically (a versioned file; no pickled objects)."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "references": self.references.detach().cpu(),
            "reference_index": self.reference_index.cpu(),
            "a": self.a.detach().cpu(),
            "b": self.b.detach().cpu(),
            "modes": self.modes.cpu(),
            "window_start": self.window_start,
            "layout": self.layout.to_dict(),
        }
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                payload[name] = getattr(self, name).detach().cpu()
        if self.metrics is not None:
            payload["metrics"] = {name: values.detach().cpu() for name, values in self.metrics.items()}
        payload["checksum"] = checksum(_checked(payload))
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "CMDTrajectory":
        """Read a file written by :meth:`save`; refuses other files with a ValueError that says why.

        Every field is checked as the constructor checks its argument, and must be a tensor (an int for
        ``window_start``, a dict of lists for ``layout``); an optional field is checked when present. Then
        the file's checksum (of every field): a damaged file is refused, naming it; a file
        of an earlier cmd_online, without one, by its zip members' CRC-32s.
        """
        has_checksum = lambda obj: isinstance(obj, dict) and "checksum" in obj  # noqa: E731
        obj = check_format(safe_load(path, "CMD trajectory", map_location, own_checksum=has_checksum), path, FORMAT,
                           (VERSION,))
        try:
            missing = [name for name in _REQUIRED if name not in obj]
            if missing:
                raise ValueError(f"missing {', '.join(map(repr, missing))}")
            fields = {name: obj[name] for name in (*_REQUIRED, *_OPTIONAL, "metrics") if name in obj}
            for name, value in fields.items():
                if name not in ("window_start", "layout", "metrics") and not isinstance(value, torch.Tensor):
                    raise TypeError(f"{name} must be a tensor; got {type(value).__name__}")
            if "metrics" in fields and not (isinstance(fields["metrics"], dict) and all(
                    isinstance(v, torch.Tensor) for v in fields["metrics"].values())):
                raise TypeError("metrics must be a dict of metric name → tensor")
            fields["layout"] = _layout_from_file(fields["layout"])
            trajectory = cls(**fields)
            if "checksum" in obj:
                verify_checksum(obj["checksum"], _checked(obj), "its fields")
            return trajectory
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"{str(path)!r} is a damaged CMD trajectory file: {e}") from None

    @classmethod
    def from_state_dict(cls, state: dict) -> "CMDTrajectory":
        """A trajectory from ``CMDRecorder.trajectory_state_dict()`` with whole (plain) tensors, e.g. as
        :func:`cmd_online.checkpoint.load_trajectory` reads it back from a sharded checkpoint."""
        meta = unpack(state.get("meta") if isinstance(state, dict) else None)
        layout = _layout_from_file(meta.get("layout"))
        flat = {}
        for name in ("a", "b", "modes"):
            parts = state.get(name)
            if not isinstance(parts, dict) or set(parts) != set(layout.names):
                raise ValueError(f"state[{name!r}] must hold one tensor per parameter of the layout")
            flat[name] = torch.cat([torch.as_tensor(parts[n]).reshape(-1) for n in layout.names])
        missing = [key for key in ("references", "reference_index", "window_start") if key not in meta]
        if missing:
            raise ValueError(f"state['meta'] is missing {', '.join(map(repr, missing))}")
        if "checksum" in meta:  # written unsharded: the parts are the ones it was computed over
            verify_checksum(meta["checksum"], parts_checked(state, layout.names), "state's a, b and modes")
        optional = {key: meta.get(key) for key in (*_OPTIONAL, "metrics")}
        return cls(meta["references"], meta["reference_index"], flat["a"], flat["b"], flat["modes"],
                   meta["window_start"], layout, **optional)

    def __repr__(self) -> str:
        return (f"CMDTrajectory(weights={self.num_weights}, modes={self.num_modes}, "
                f"records={self.num_records}, window_start={self.window_start})")


def parts_checked(state: dict, names) -> list[tuple[str, object]]:
    """What the checksum of a ``trajectory_state_dict`` covers: a, b and the modes of every parameter."""
    return [(f"{kind}.{name}", state[kind][name]) for kind in ("a", "b", "modes") for name in names]


def _checked(fields: dict) -> list[tuple[str, object]]:
    """What a trajectory file's checksum covers: every field, present or not (None), in a fixed order, and
    each per-record metric by name."""
    items = [(name, fields.get(name)) for name in ("format", "version", *_REQUIRED, *_OPTIONAL)]
    metrics = fields.get("metrics")
    if isinstance(metrics, dict):
        names = sorted(metrics, key=str)
        items.append(("metrics", names))
        items.extend((f"metrics.{name}", metrics[name]) for name in names)
    return items


def _samples(index, history, modes, N: int, M: int) -> tuple:
    """The clustered samples checked: all three tensors, or all None."""
    given = [name for name, value in zip(_SAMPLES, (index, history, modes)) if value is not None]
    if not given:
        return None, None, None
    if len(given) < 3:
        missing = [name for name in _SAMPLES if name not in given]
        raise ValueError(f"{', '.join(missing)} must be given with {', '.join(given)}: the clustered samples are "
                         f"three tensors, all or none")
    index = check_tensor("sample_index", index, "int")
    history = check_tensor("sample_history", history, "float")
    modes = check_tensor("sample_modes", modes, "int")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"sample_index must be a non-empty vector (K ≥ 1 samples); got shape {tuple(index.shape)}")
    K = index.numel()
    if history.dim() != 2 or history.shape[0] != K or history.shape[1] < 2:
        raise ValueError(f"sample_history must be K × C with K = {K} and C ≥ 2 clustered records; "
                         f"got shape {tuple(history.shape)}")
    _finite("sample_history", history)
    _vector("sample_modes", modes, K, "K")
    _in_range("sample_index", index, N, "N")
    if modes.numel() and (int(modes.min()) < -1 or int(modes.max()) >= M):
        raise ValueError(f"sample_modes must lie in [−1, M = {M}); got values from {int(modes.min())} to "
                         f"{int(modes.max())}")
    return index.long(), history, modes.long()


def _metrics(metrics, T: int) -> dict[str, torch.Tensor] | None:
    """The per-record metrics checked: a dict of str → float vectors of T entries, or None."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of metric name → tensor of T values; got {type(metrics).__name__}")
    out = {}
    for name, values in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics: names must be non-empty str; got {name!r}")
        values = check_tensor(f"metrics[{name!r}]", values, "float")
        _vector(f"metrics[{name!r}]", values, T, "T")
        out[name] = values
    return out


def _layout_from_file(entry) -> Layout:
    """The layout entry of a file (a dict of three lists) as a Layout, refusing anything else by name."""
    if not isinstance(entry, dict) or not {"names", "shapes", "dtypes"} <= entry.keys():
        raise ValueError("layout must be a dict with the lists 'names', 'shapes' and 'dtypes'")
    names, shapes, dtypes = entry["names"], entry["shapes"], entry["dtypes"]
    for key, items in (("names", names), ("dtypes", dtypes)):
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"layout: {key} must be a list of str")
    if not isinstance(shapes, list) or not all(
            isinstance(s, list) and all(type(x) is int for x in s) for s in shapes):
        raise ValueError("layout: shapes must be lists of ints")
    try:
        return Layout.from_dict(entry)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith("layout") else f"layout: {e}") from None
