"""The flat index space: parameters in order, row-major, as one vector w of length N.

A :class:`Layout` maps flat indices to (tensor, offset) pairs and back, and knows each tensor's
name, shape and dtype so that a flat vector can be turned back into named, shaped tensors.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

# dtypes a layout may name; kept as strings in files so that loading never needs a pickle
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


RECORDABLE_DTYPES = tuple(_DTYPES.values())


_WIDE_UNSIGNED = tuple(getattr(torch, f"uint{bits}") for bits in (16, 32, 64) if hasattr(torch, f"uint{bits}"))
_KINDS = {  # what each kind of tensor must hold, and how an error names it
    "float": (lambda t: t.dtype in RECORDABLE_DTYPES, "a floating-point (float64/32/16, bfloat16)"),
    "int": (lambda t: not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool), "an integer"),
    "bool": (lambda t: t.dtype == torch.bool, "a bool"),
}


def check_tensor(name: str, value, kind: str = "float", shape: tuple[int, ...] | None = None, *,
                 finite: bool = False, convert: bool = True) -> torch.Tensor:
    """``value`` as a dense tensor whose dtype is of ``kind`` ("float", "int" or "bool"): the one tensor validator
    of the package (trajectories, the recorder's state, the post-hoc arguments).

    With ``convert`` an array or list is taken too (``torch.as_tensor``); else only a tensor. With ``shape`` it
    must have that shape; with ``finite`` a float tensor must hold no NaN/Inf. An unsigned integer tensor wider
    than a byte comes back as int64 (torch cannot compare those), refused if a value does not fit. Raises a
    TypeError naming ``name`` for what is not a dense tensor of ``kind``, a ValueError for a wrong shape,
    NaN/Inf or an index too large."""
    words = _KINDS[kind][1]
    if not convert and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of {words} dtype; got {type(value).__name__}")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor (or array) of {words} dtype; got {type(value).__name__}") from None
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor; got layout {t.layout}")
    if not _KINDS[kind][0](t):
        raise TypeError(f"{name} must be {words} tensor; got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if finite and kind == "float" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    if t.dtype in _WIDE_UNSIGNED:
        values = t.cpu().numpy()
        if values.size and values.max() > torch.iinfo(torch.int64).max:
            raise ValueError(f"{name} holds {int(values.max())}, too large for an index (int64)")
        t = t.to(torch.int64)
    return t


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype must be a floating-point dtype, one of {sorted(_DTYPES)}; got {dtype}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def coefficient_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of the fit's coefficients a and b (and of the statistics' shifts) for parameters of these dtypes:
    float64 if one of them is (its weights then come back exactly), else float32. The one home of this rule."""
    return torch.float64 if torch.float64 in tuple(dtypes) else torch.float32


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the tensors that make up the flat vector, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    def __post_init__(self):
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)):
            raise ValueError("layout: names, shapes and dtypes must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("layout: tensor names must be unique")

    @classmethod
    def of_tensors(cls, tensors: Sequence[torch.Tensor], names: Iterable[str] | None = None) -> "Layout":
        names = tuple(names) if names is not None else tuple(f"tensor{i}" for i in range(len(tensors)))
        return cls(names, tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors))

    @classmethod
    def flat(cls, numel: int, dtype: torch.dtype = torch.float32) -> "Layout":
        return cls(("weights",), ((numel,),), (dtype,))

    @property
    def coefficient_dtype(self) -> torch.dtype:
        """:func:`coefficient_dtype` of this layout's parameters."""
        return coefficient_dtype(self.dtypes)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> list[int]:
        """Flat index of the first element of each tensor."""
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return out

    def locate(self, flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor number, offset inside that tensor) of each flat index."""
        starts = torch.tensor(self.offsets, dtype=torch.int64)
        tensor = torch.searchsorted(starts, flat_index.to(torch.int64).cpu(), right=True) - 1
        return tensor, flat_index.cpu() - starts[tensor]

    def resolution(self, flat_index: torch.Tensor) -> torch.Tensor:
        """The machine epsilon of each flat index's tensor dtype, float64 (its relative resolution)."""
        eps = [torch.finfo(dtype).eps for dtype in self.dtypes]
        return torch.tensor(eps, dtype=torch.float64)[self.locate(flat_index)[0]]

    def split(self, flat: torch.Tensor, cast: bool = True) -> dict[str, torch.Tensor]:
        """A flat N-vector as named tensors of this layout's shapes (and dtypes, if ``cast``)."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat vector must have {self.numel} elements; got shape {tuple(flat.shape)}")
        pieces = torch.split(flat, self.sizes)
        return {
            name: (piece.to(dtype) if cast else piece).reshape(shape)
            for name, piece, shape, dtype in zip(self.names, pieces, self.shapes, self.dtypes)
        }

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [dtype_name(d) for d in self.dtypes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        try:
            return cls(
                tuple(str(n) for n in d["names"]),
                tuple(tuple(int(x) for x in s) for s in d["shapes"]),
                tuple(dtype_from_name(n) for n in d["dtypes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed layout entry: {e}") from None


# Components that wrappers put inside parameter names, at any depth: torch.compile (``_orig_mod``, of the
# model or of a submodule), FSDP1 (``_fsdp_wrapped_module``) and activation checkpointing
# (``_checkpoint_wrapped_module``). Outer wrappers (DDP's and DataParallel's ``module.``, a
# LightningModule's attribute, PEFT's ``base_model.model.``, Fabric's ``_forward_module.``) add one leading
# prefix to every name: :func:`name_differences` allows one such prefix on each side.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# The name of a parameter recorded without ``model=``: its place in the optimizer, which any name matches.
_GENERIC = re.compile(r"param_groups\.\d+\.params\.\d+")


def core_name(name: str) -> tuple[str, ...]:
    """A parameter name's components without the wrappers' (:data:`WRAPPER_COMPONENTS`)."""
    return tuple(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def _prefixes(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The leading components that ``a`` and ``b`` have before their longest common ending, if that ending
    holds at least the parameter's own name; None otherwise."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return (a[:len(a) - n], b[:len(b) - n]) if n else None


def name_differences(saved: Sequence[str], now: Sequence[str]) -> list[int]:
    """The positions at which two lists of parameter names (of equal length, in optimizer order) name
    different parameters, up to wrappers: components of :data:`WRAPPER_COMPONENTS` anywhere, and one
    leading prefix on each side common to every name (``module.`` of DDP, ``model.`` of a
    LightningModule, …). A name of a recorder built without ``model=`` (``param_groups.0.params.1``)
    matches any name. Empty when the lists name the same parameters."""
    pairs = [(i, core_name(a), core_name(b)) for i, (a, b) in enumerate(zip(saved, now))
             if not (_GENERIC.fullmatch(a) or _GENERIC.fullmatch(b))]
    if all(a == b for _, a, b in pairs):
        return []

    def leads_all(prefix: tuple[str, ...], side: int) -> bool:
        return all(pair[side][:len(prefix)] == prefix for pair in pairs)

    def differing(p: tuple[str, ...], q: tuple[str, ...]) -> list[int]:
        return [i for i, a, b in pairs if a[len(p):] != b[len(q):]]

    # a wrapper's prefix leads every name of its side; take the one that explains the most names
    found = {pq for _, a, b in pairs if (pq := _prefixes(a, b)) is not None}
    candidates = {((), ())} | {pq for pq in found if leads_all(pq[0], 1) and leads_all(pq[1], 2)}
    return min((differing(*pq) for pq in candidates), key=len)


class GatherPlan:
    """Reads a fixed set of flat indices out of a list of tensors without a Python loop per index.

    The indices are grouped by tensor once; each read is one ``index_select`` per tensor that holds
    any of them, a ``cat`` and (if the requested order is not flat order) one permutation.
    """

    def __init__(self, layout: Layout, flat_index: torch.Tensor, device: torch.device | str = "cpu"):
        flat_index = torch.as_tensor(flat_index, dtype=torch.int64).cpu()
        order = torch.argsort(flat_index)
        tensor, offset = layout.locate(flat_index[order])
        self.parts = [
            (int(t), offset[tensor == t].to(device)) for t in torch.unique(tensor).tolist()
        ]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        identity = bool((order == torch.arange(len(order))).all())
        self.inverse = None if identity else inverse.to(device)

    def __call__(self, flat_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        values = torch.cat([flat_tensors[t].index_select(0, idx) for t, idx in self.parts])
        return values if self.inverse is None else values.index_select(0, self.inverse)
