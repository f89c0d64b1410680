"""What an observer reads of the statistics: :class:`RecordingSummary`, frozen and read-only.

The recorder's live statistics (``cmd_online.stats.StreamingMoments``) are its own: they change with
every record and their methods change them. An observer (``cmd_online.observers``) reads
``rec.summary`` instead: the few values the loggers need, fixed when it is made, and a fit of any
weights. Its tensors are views of the recorder's own (no copy of N values is made): do not modify
them; they change with the next record. ``sumsq`` and ``fit`` compute what they are asked for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from .stats import AffineFit, StreamingMoments


@dataclass(frozen=True, eq=False)
class RecordingSummary:
    """The statistics of a recorder in the tracking phase, as its observers see them (``rec.summary``).

    Attributes:
        window_count (int): records in the fit window (from the last warm-up record on).
        compact (bool): whether the modes are frozen (the compact form: each weight keeps its own mode).
        sizes (tuple of int): weights of each parameter held by this process (its shard under FSDP2).
        modes (tensor or None): in the compact form, each local weight's mode (N,); None in the full form.
        sumsq (callable): ``sumsq(index)``, the sums of squared deviations from their mean in the window of
            the local weights ``index`` (a slice or a tensor of flat indices), float64.
        resolved_references (tensor): which references move above their resolution (M, bool); the
            others count as not moving (docs/concepts.md).
        fit (callable): ``fit(index)``, the affine fit (``a``, ``b``, ``modes``, ``r2``) of the local
            weights ``index`` (a slice or a tensor of flat indices), with those references.
    """

    window_count: int
    compact: bool
    sizes: tuple[int, ...]
    modes: torch.Tensor | None
    sumsq: Callable[[slice | torch.Tensor], torch.Tensor] = field(repr=False)
    resolved_references: torch.Tensor
    fit: Callable[[slice | torch.Tensor], AffineFit] = field(repr=False)

    @classmethod
    def of(cls, stats: StreamingMoments) -> "RecordingSummary":
        """The summary of the statistics as they are now."""
        resolved = stats.resolved_references()
        return cls(window_count=stats.window_count(), compact=stats.compact, sizes=tuple(stats.sizes),
                   modes=stats.modes if stats.compact else None, sumsq=stats.sumsq_of, resolved_references=resolved,
                   fit=functools.partial(stats.fit, resolved=resolved))

    @property
    def numel(self) -> int:
        """The local weights: the sum of ``sizes``."""
        return sum(self.sizes)
