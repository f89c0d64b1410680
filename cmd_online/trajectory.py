"""CMDTrajectory: the compressed model of a training trajectory.

N weights over T records are held as M reference trajectories (M × T), and per weight a mode label
and affine coefficients a, b (paper, eq. 7):  ŵ_i(t) = a_i · references[mode_i, t] + b_i.
The object knows nothing of how it was fitted: post-hoc and online CMD produce the same thing.
"""

from __future__ import annotations

import numbers
import os

import torch

from .files import atomic_save, check_format, safe_load
from .layout import Layout

FORMAT = "cmd_online.CMDTrajectory"
VERSION = 1


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


class CMDTrajectory:
    """A CMD model of N weights over T records.

    Attributes:
        references (tensor): M × T reference trajectories.
        reference_index (tensor): M flat indices of the reference weights.
        a, b (tensor): N affine coefficients.
        modes (tensor): N mode labels (int32), 0 = the largest mode.
        window_start (int): first record of the window over which a and b were fitted.
        layout (Layout): names, shapes and dtypes of the tensors the flat index runs over.
        mode_r2 (tensor): mean R² of each mode's members over the window (M,).
    """

    def __init__(self, references, reference_index, a, b, modes, window_start: int = 0,
                 layout: Layout | None = None, mode_r2=None):
        self.references = torch.as_tensor(references)
        self.reference_index = torch.as_tensor(reference_index).long()
        self.a = torch.as_tensor(a)
        self.b = torch.as_tensor(b)
        self.modes = torch.as_tensor(modes).to(torch.int32)
        self.window_start = int(window_start)
        n = self.a.numel()
        self.layout = layout if layout is not None else Layout.flat(n, self.a.dtype)
        self.mode_r2 = None if mode_r2 is None else torch.as_tensor(mode_r2)
        self._validate()

    def _validate(self):
        M = self.reference_index.numel()
        if self.references.dim() != 2 or self.references.shape[0] != M:
            raise ValueError(f"references must be M × T with M = {M}; got {tuple(self.references.shape)}")
        n = self.a.numel()
        for name in ("a", "b", "modes"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must be a vector of N = {n} entries; got {tuple(getattr(self, name).shape)}")
        if self.layout.numel != n:
            raise ValueError(f"layout covers {self.layout.numel} weights but a has {n}")
        if n and (int(self.modes.min()) < 0 or int(self.modes.max()) >= M):
            raise ValueError(f"modes must lie in [0, {M}); the file or arguments are inconsistent")
        if not 0 <= self.window_start < max(self.num_records, 1):
            raise ValueError(f"window_start={self.window_start} outside [0, {self.num_records})")

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
        return CMDTrajectory(self.references.to(device), self.reference_index.to(device), self.a.to(device),
                             self.b.to(device), self.modes.to(device), self.window_start, self.layout,
                             None if self.mode_r2 is None else self.mode_r2.to(device))

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
        if self.mode_r2 is not None:
            payload["mode_r2"] = self.mode_r2.cpu()
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "CMDTrajectory":
        """Read a file written by :meth:`save`; refuses other files with a ValueError that says why."""
        obj = check_format(safe_load(path, "CMD trajectory", map_location), path, FORMAT, (VERSION,))
        try:
            return cls(obj["references"], obj["reference_index"], obj["a"], obj["b"], obj["modes"],
                       obj["window_start"], Layout.from_dict(obj["layout"]), obj.get("mode_r2"))
        except KeyError as e:
            raise ValueError(f"{str(path)!r} is a damaged CMD trajectory file: missing {e}") from None
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"{str(path)!r} is a damaged CMD trajectory file: {e}") from None

    def __repr__(self) -> str:
        return (f"CMDTrajectory(weights={self.num_weights}, modes={self.num_modes}, "
                f"records={self.num_records}, window_start={self.window_start})")
