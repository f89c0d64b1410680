"""The settings of a decomposition, validated once, and the argument checks every entry point shares.

:class:`CMDConfig` holds what defines a CMD run — how many modes, how they are cut, which weights are
sampled, how long the warm-up is, how the record path is scheduled — and is the one place where
these rules live. ``CMDRecorder``, ``decompose``, ``decompose_checkpoints``, the demo and the
command line build one; ``CMDRecorder.state_dict()`` stores it as a plain dict (:meth:`to_dict`).

The ``check_*`` functions are the argument checks of the whole package: each raises a ``TypeError``
for the wrong type and a ``ValueError`` for a value out of range, naming the argument and the range.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

DISTANCES = ("correlation", "euclidean")
KERNELS = ("blocks", "flat", "compiled")  # the statistics kernels (cmd_online.stats); RunOptions checks the choice
DEFAULT_SAMPLES = 1000  # samples K by default; on a model of fewer weights it becomes N (CMDConfig.for_weights)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as an int in [low, high] (None allowed if ``allow_none``); NumPy integers are accepted."""
    if value is None and allow_none:
        return None
    bounds = _bounds(low, high)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{bounds}{' or None' if allow_none else ''}; "
                        f"got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{bounds}; got {value}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                allow_none: bool = False) -> float | None:
    """``value`` as a finite float in [low, high], or in (low, high] with ``low_open``."""
    if value is None and allow_none:
        return None
    where = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {where}; got {type(value).__name__}")
    value = float(value)
    if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails both
        raise ValueError(f"{name} must be a number {where}; got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (Python or NumPy bool only; 0/1 are refused as ambiguous)."""
    if not isinstance(value, (bool, np.bool_)):  # np.bool_ in NumPy 1 and 2 (where its type is named "bool")
        raise TypeError(f"{name} must be True or False; got {type(value).__name__}")
    return bool(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_modes(modes: Any, threshold: Any) -> tuple[int | None, float | None]:
    """The ``modes`` / ``threshold`` pair: one of them; ``modes`` defaults to 10 when neither is given."""
    if modes is not None and threshold is not None:
        raise ValueError("give either modes or threshold, not both (threshold cuts by distance instead of a count)")
    threshold = check_float("threshold", threshold, 0.0, 1.0, low_open=True, allow_none=True)
    return (None if threshold is not None else check_int("modes", 10 if modes is None else modes, 1)), threshold


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" ≥ {low}"
    if high is not None:
        return f" ≤ {high}"
    return ""


@dataclasses.dataclass(frozen=True, eq=False)
class CMDConfig(Mapping):
    """What defines a CMD decomposition; validated at construction, immutable.

    Also a read-only mapping (``config["warmup"]``, ``dict(config)``), so code written against the
    recorder's former ``config`` dict keeps working.

    Args:
        modes (int): number of modes M, cut with ``maxclust``; at most M modes come out (default 10
            when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]; M then follows from the data (default None).
        samples (int): K, the weights whose warm-up history is clustered; ``modes`` ≤ K (default 1000).
        warmup (int): F ≥ 2 warm-up records (default 20). None, post hoc only: cluster on all records.
        record_every (int): record after every k-th optimizer step; None: by hand (default None).
        freeze_modes_after (int): fix each weight's mode this many records into the fit window and keep
            the compact form (default 3: 3.25 float32 per weight, the full form never built for k ≤ 4;
            docs/concepts.md); None keeps the full form (M + 3 float32 per weight).
        seed (int): seed of the sampling, ≥ 0 (default 0).
        max_modes (int): with ``threshold``, at most this many modes: a cut that gives more is
            coarsened to ``max_modes`` (criterion ``maxclust``). It bounds the full form's memory and
            fixes the shapes of the state a freshly built recorder loads through
            torch.distributed.checkpoint (default None: no bound). With ``modes`` it must be None.
        distance (str): clustering distance between two sampled weights: ``"correlation"``, 1 − |C_ij|
            (default), or ``"euclidean"``, the Euclidean distance between rows i and j of |C|, the
            distance of the paper authors' code (docs/concepts.md: what it reproduces of their code).
    """

    modes: int | None = None
    threshold: float | None = None
    samples: int = 1000
    warmup: int | None = 20
    record_every: int | None = None
    freeze_modes_after: int | None = 3
    seed: int = 0
    distance: str = "correlation"
    max_modes: int | None = None

    def __post_init__(self):
        modes, threshold = check_modes(self.modes, self.threshold)
        samples = check_int("samples", self.samples, 1)
        if modes is not None and modes > samples:
            raise ValueError(f"modes ({modes}) must be ≤ samples ({samples})")
        checked = dict(
            modes=modes, threshold=threshold, samples=samples,
            warmup=check_int("warmup", self.warmup, 2, allow_none=True),
            record_every=check_int("record_every", self.record_every, 1, allow_none=True),
            freeze_modes_after=check_int("freeze_modes_after", self.freeze_modes_after, 1, allow_none=True),
            seed=check_int("seed", self.seed, 0),
            distance=check_choice("distance", self.distance, DISTANCES),
            max_modes=check_int("max_modes", self.max_modes, 1, samples, allow_none=True),
        )
        if checked["max_modes"] is not None and threshold is None:
            raise ValueError("max_modes bounds the modes a threshold gives; with modes=M it must be None (M is the bound)")
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    # a read-only mapping over the fields
    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other: object) -> bool:  # equal to a config or a mapping with the same entries
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(self.items()))

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for state dicts and JSON)."""
        return {name: getattr(self, name) for name in self._names()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CMDConfig":
        """A config from :meth:`to_dict`'s output; a field missing from ``d`` takes its default (older states)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config must be a dict; got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls._names()))
        if unknown:
            raise ValueError(f"config has unknown entries {unknown}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config is invalid: {e}") from None

    @property
    def mode_bound(self) -> int | None:
        """The most modes the clustering can give: ``modes``, or ``max_modes`` with a threshold (None: no bound)."""
        return self.modes if self.modes is not None else self.max_modes

    def replace(self, **changes: Any) -> "CMDConfig":
        """A copy with some fields changed (validated again).

        ``modes`` and ``threshold`` are the two ways to cut: giving one of them (not None) without the
        other switches the cut, so ``CMDConfig().replace(threshold=0.2)`` has ``modes=None``, and
        ``replace(modes=M)`` drops ``threshold`` and ``max_modes`` (which bounds only a threshold cut).
        """
        if changes.get("threshold") is not None and "modes" not in changes:
            changes["modes"] = None
        if changes.get("modes") is not None and "threshold" not in changes:
            changes["threshold"] = None
            changes.setdefault("max_modes", None)
        return dataclasses.replace(self, **changes)

    def for_weights(self, N: int, who: str) -> "CMDConfig":
        """This configuration for N weights. ``samples`` at its default, 1000, on a model of fewer weights
        is clamped to N with a UserWarning (all N weights are clustered), also when the value was passed on
        explicitly (the framework callbacks and the command line do); any other ``samples`` larger than N
        is a ValueError (a clustering costs K² memory: a typo must not be taken as asked), and so is
        ``modes`` or ``max_modes`` larger than N."""
        if self.samples <= N:
            return self
        if self.samples != DEFAULT_SAMPLES:
            raise ValueError(f"samples ({self.samples}) must be ≤ the number of weights N = {N}")
        for name in ("modes", "max_modes"):
            value = getattr(self, name)
            if value is not None and value > N:
                raise ValueError(f"{name} ({value}) must be ≤ the number of weights N = {N}")
        warnings.warn(f"{who}: samples={self.samples} (the default) is more than the N = {N} weights; clustering "
                      f"all of them (samples={N})", UserWarning, stacklevel=3)
        return dataclasses.replace(self, samples=N)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a recording runs, as opposed to what it computes (:class:`CMDConfig`); validated once, here.

    ``CMDRecorder`` builds one from its keyword arguments (``rec.run_options``) and both framework callbacks
    check theirs with it when they are created; none of these options is part of a state.

    Args:
        check_finite (bool): skip (with a warning) records whose weights hold NaN/Inf (default True).
        kernel (str): the statistics kernel, ``"blocks"``, ``"flat"`` or ``"compiled"``; None picks by
            device (default None).
        offload (bool): keep the statistics in host memory and update them on a worker thread; not with
            ``kernel="flat"``, which keeps them on the parameters' device (default False).
    """

    check_finite: bool = True
    kernel: str | None = None
    offload: bool = False

    def __post_init__(self):
        check_bool("check_finite", self.check_finite)
        if self.kernel is not None:
            check_choice("kernel", self.kernel, KERNELS)
        if check_bool("offload", self.offload) and self.kernel == "flat":
            raise ValueError("kernel='flat' keeps the statistics on the parameters' device; offload=True keeps them "
                             "in host memory (kernel 'blocks' or 'compiled')")
        object.__setattr__(self, "check_finite", bool(self.check_finite))
        object.__setattr__(self, "offload", bool(self.offload))

    @classmethod
    def of(cls, *, check_finite: bool = True, kernel: str | None = None, offload: bool = False,
           compile_update: bool = False, stacklevel: int = 3) -> "RunOptions":
        """The options from a recorder's keyword arguments: the deprecated ``compile_update=True`` is
        ``kernel="compiled"``, with a FutureWarning (another ``kernel`` with it is a ValueError)."""
        if check_bool("compile_update", compile_update):
            if kernel not in (None, "compiled"):
                raise ValueError(f"compile_update=True asks for kernel='compiled'; got kernel={kernel!r}")
            warnings.warn("compile_update=True is deprecated and will be removed: pass kernel='compiled'",
                          FutureWarning, stacklevel=stacklevel)
            kernel = "compiled"
        return cls(check_finite=check_finite, kernel=kernel, offload=offload)

    def replace(self, **changes: Any) -> "RunOptions":
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)
