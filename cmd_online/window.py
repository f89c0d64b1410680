"""The default recorder's statistics: the compact form from the window's start, its modes fixed from raw
snapshots of the window's first records.

With ``freeze_modes_after = k ≤`` :data:`SNAPSHOT_LIMIT` the recorder never builds the full form (M + 3
float32 per weight). :class:`SnapshotMoments` holds the compact form's own buffers from the start —
``mean`` (the coefficients' dtype), ``sumsq`` and ``comoment[0]`` (float32) and ``modes`` (one byte for
M ≤ 256): 3.25 float32 per weight — and uses them first to keep the window's first k − 1 records:

    record 1 in ``mean`` (w₁ itself), record 2 in ``sumsq`` (w₂ − w₁), record 3 in ``comoment[0]`` (w₃ − w₁).

At record k (its values taken live) the modes and the exact moments of each weight — its mean, S, and
its co-moment p with its own mode — are computed in float64 from the k records and the references' k
values (the recorder's table), block by block, in place: the modes as the full form's fit chooses them
(argmax |ρ|, ties to the lower mode, references set aside as :func:`~cmd_online.stats.resolved_references`
says, reference weights pinned to their own mode), so the default and the full form frozen at k agree.
From then on the compact form's streaming update (:class:`~cmd_online.stats.StreamingMoments`) goes on.
Before the freeze a fit is computed the same way from the records kept so far.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .stats import AffineFit, StreamingMoments, _best_mode, _foreach_copy_, _host_ref_update, affine_fit

# freeze_modes_after up to this keeps snapshots; above it the full form is built, then frozen
SNAPSHOT_LIMIT = 4
# Weights per block of the freeze and of a fit before it: its float64 temporaries, about (M + 4k + 8)
# values a weight, stay near 0.5 MiB at M = 10 (0.14 float32 per weight at N = 1e6: tests/test_lean.py).
SNAPSHOT_BLOCK = 1 << 11


def keeps_snapshots(freeze_modes_after: int | None) -> bool:
    """Whether a recorder with this ``freeze_modes_after`` keeps snapshots (:class:`SnapshotMoments`)."""
    return freeze_modes_after is not None and freeze_modes_after <= SNAPSHOT_LIMIT


class SnapshotMoments(StreamingMoments):
    """The compact form's statistics from the window's first record, its modes fixed at record ``freeze_after``.

    Args:
        sizes, num_modes, device, shift_dtype, kernel, allocate: as :class:`StreamingMoments` (``shift_dtype``
            is the mean's dtype here: there is no shift).
        freeze_after (int): k, 1 ≤ k ≤ :data:`SNAPSHOT_LIMIT`.

    Set by the recorder before the first record: ``ref_window`` (a callable: the references' values over
    the window so far, M × count) and ``pins`` (a callable ``pins(start, stop)``: the positions, relative
    to ``start``, of the reference weights in [start, stop) of the flat index, and their modes).

    With the flat kernel the window's first k records read their ``ok`` flag on the host (a record that
    is skipped changes nothing): k synchronisations, then none.

    The freeze converts the buffers in place, block by block. An exception inside it (an out-of-memory
    error, a KeyboardInterrupt) leaves some blocks converted and the others not: such statistics refuse
    every later use (``RuntimeError``, with the cause) instead of giving wrong numbers or writing a wrong
    state.
    """

    def __init__(self, sizes: Sequence[int], num_modes: int, device: torch.device | str = "cpu", *,
                 freeze_after: int, shift_dtype: torch.dtype = torch.float32, kernel: str | None = None,
                 allocate: bool = True):
        if not 1 <= freeze_after <= SNAPSHOT_LIMIT:
            raise ValueError(f"freeze_after must lie in [1, {SNAPSHOT_LIMIT}]; got {freeze_after!r}")
        super().__init__(sizes, num_modes, device, shift_dtype=shift_dtype, kernel=kernel, allocate=False)
        self.freeze_after = int(freeze_after)
        self.frozen = False
        self.shift = None
        N = sum(self.sizes) if allocate else 0
        self.mean = torch.zeros(N, dtype=shift_dtype, device=self.device)
        self.sumsq = torch.zeros(N, dtype=torch.float32, device=self.device)
        self.comoment = [torch.zeros(N, dtype=torch.float32, device=self.device)]
        self._set_compact(torch.zeros(N, dtype=self.modes_dtype, device=self.device))
        self.ref_window: Callable[[], torch.Tensor] | None = None
        self.pins: Callable[[int, int], tuple] | None = None
        self.damaged: str | None = None  # why the freeze stopped halfway (then nothing else runs)

    def _check_intact(self) -> None:
        if self.damaged is not None:
            raise RuntimeError(f"CMDRecorder: the freeze of the modes stopped halfway ({self.damaged}), so its "
                               f"statistics are part converted and cannot be used or saved; load the last "
                               f"state_dict() saved, or start a new recorder")

    @property
    def compact(self) -> bool:
        """Whether the modes are fixed (before that the buffers hold the window's first records)."""
        return self.frozen

    def update(self, weights: Sequence[torch.Tensor], refs: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Add one record: a snapshot, the freeze (record k), or the compact form's streaming update."""
        self._check_intact()
        if self.frozen:
            self._step(self, weights, refs, ok)
            return
        if ok is not None and not bool(ok):  # a skipped record changes nothing
            return
        if self.count == 0:
            self.ref_shift.copy_(refs)
            self.count = 1
            _foreach_copy_(self.views(self.mean), weights)  # record 1: w₁ itself
        else:
            _host_ref_update(self, refs)
            if self.count < self.freeze_after:  # records 2, 3: w − w₁ in sumsq, comoment[0]
                keep = self.sumsq if self.count == 2 else self.comoment[0]
                for w, first, out in zip(weights, self.views(self.mean), self.views(keep)):
                    torch.sub(w, first, out=out)
        if self.count_t is not None:
            self.count_t.fill_(float(self.count))
        if self.count == self.freeze_after:
            self._freeze(weights)

    def _records(self, flat, weights: Sequence[torch.Tensor] | None = None,
                 local: tuple[int, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w₁, X): record 1 of the weights ``flat`` and the window's records less w₁, count × n, float64.

        The buffers hold the records taken so far; at the freeze (``weights`` given) record k is not in
        them, and comes from ``weights[local[0]][local[1]]``.
        """
        first = self.mean[flat].double()
        live = weights is not None and self.count > 1
        stored = self.count - 1 if live else self.count
        rows = [torch.zeros_like(first)] + [b[flat].double() for b in (self.sumsq, self.comoment[0])[:stored - 1]]
        if live:
            rows.append(weights[local[0]][local[1]].double() - first)
        return first, torch.stack(rows)

    def _window_moments(self, flat, weights=None, local=None):
        """mean, S (n,), P (M × n), Q, ref_mean (M,) of the weights ``flat`` over the window, float64, exact."""
        first, X = self._records(flat, weights, local)
        Y = self.ref_window().double()
        ref_mean = Y.mean(dim=1)
        Yc = Y - ref_mean.unsqueeze(1)
        x_mean = X.mean(dim=0)
        Xc = X - x_mean
        return first + x_mean, (Xc * Xc).sum(dim=0), Yc @ Xc, (Yc * Yc).sum(dim=1), ref_mean

    def _assigned(self, P: torch.Tensor, Q: torch.Tensor, resolved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each weight's mode (argmax |ρ| among the resolved references) and its co-moment there."""
        return _best_mode(P, torch.where(resolved, Q, torch.zeros_like(Q)))

    def _freeze(self, weights: Sequence[torch.Tensor]) -> None:
        """Record k: the modes and exact moments, block by block, in place; then the compact update."""
        resolved = self.resolved_references()
        done = 0
        try:
            for i, local, flat in self.block_plan(SNAPSHOT_BLOCK):
                self._freeze_block(flat, weights, (i, local), resolved)
                done = flat.stop
        except BaseException as e:  # record k is counted and some blocks may be converted: neither form
            self.damaged = f"{type(e).__name__} after {done} of {sum(self.sizes)} weights"
            raise
        self.frozen = True

    def _freeze_block(self, flat: slice, weights: Sequence[torch.Tensor], local: tuple[int, slice],
                      resolved: torch.Tensor) -> None:
        """The modes and exact moments of the weights ``flat``, written over their snapshots."""
        mean, S, P, Q, _ = self._window_moments(flat, weights, local)
        mode, _ = self._assigned(P, Q, resolved)
        positions, modes = self.pins(flat.start, flat.stop)
        if len(positions):
            mode[torch.as_tensor(positions, dtype=torch.int64, device=mode.device)] = torch.as_tensor(
                modes, dtype=mode.dtype, device=mode.device)
        p = P.gather(0, mode.unsqueeze(0)).squeeze(0)
        self.mean[flat], self.sumsq[flat], self.comoment[0][flat] = mean, S, p
        self.modes[flat] = mode.to(self.modes.dtype)

    def fit(self, flat: slice | torch.Tensor = slice(None), resolved: torch.Tensor | None = None) -> AffineFit:
        """:meth:`StreamingMoments.fit`; before the freeze, from the records kept (exact, float64)."""
        self._check_intact()
        if self.frozen:
            return super().fit(flat, resolved)
        if resolved is None:
            resolved = self.resolved_references()
        mean, S, P, Q, ref_mean = self._window_moments(flat)
        Q = torch.where(resolved, Q, torch.zeros_like(Q))
        return affine_fit(P, S, Q, mean, ref_mean)

    def mean_of(self, flat: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        self._check_intact()
        return super().mean_of(flat) if self.frozen else self._window_moments(flat)[0]

    def sumsq_of(self, flat: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        self._check_intact()
        return super().sumsq_of(flat) if self.frozen else self._window_moments(flat)[1]

    def window_count(self) -> int:  # asked by every query and by state_dict()
        self._check_intact()
        return super().window_count()

    def restore(self, state: dict, copy: bool = True) -> None:
        """:meth:`StreamingMoments.restore` of a compact state, or of the snapshots of one before the freeze."""
        super().restore(state, copy)
        self.damaged = None
        self.frozen = self.count >= self.freeze_after


def snapshots_of_full(stats: dict, freeze_after: int) -> dict:
    """A version-3 state of the full form, of a recorder with ``freeze_modes_after = k ≤`` :data:`SNAPSHOT_LIMIT`
    before its freeze, as :class:`SnapshotMoments`' snapshots: exact for 1 or 2 records of the window
    (w₁ = c, w₂ − w₁ = 2μ); 3 records cannot be told from their moments (ValueError)."""
    count = stats["count"]
    if count > 2:
        raise ValueError(f"the state (version 3) holds the full form after {count} records of the window, and a "
                         f"recorder with freeze_modes_after={freeze_after} keeps those records themselves: they "
                         f"cannot be recovered from the moments; load it with cmd_online before issue 23, or "
                         f"record the window again")
    first = stats["shift"]
    second = stats["mean"] * 2 if count == 2 else torch.zeros_like(stats["mean"])
    return {**{k: v for k, v in stats.items() if k != "shift"}, "mean": first, "sumsq": second,
            "comoment": [torch.zeros_like(stats["mean"])], "modes": torch.zeros(first.shape, dtype=torch.uint8)}
