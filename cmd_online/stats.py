"""Streaming sufficient statistics of the weights against the reference weights, and the affine fit.

The fit (paper, eqs. 8–10, and the assignment of Algorithm 1) needs, over the fit window, only the
mean of every weight, its centred sum of squares S, the centred sums of squares Q of the M references
and the centred co-moments P (M × N). Given these,

    ρ_mi   = P_mi / sqrt(S_i Q_m)                 (0 where S_i Q_m = 0)
    mode_i = argmax_m |ρ_mi|
    a_i    = P_{mode_i, i} / Q_{mode_i}           (the least-squares slope of eq. 10)
    b_i    = mean_i − a_i · mean_ref[mode_i]       (the least-squares intercept)

and ρ² is each weight's R². :func:`affine_fit` is that computation; :class:`StreamingMoments` keeps
the moments up to date one record at a time, so the fit is available at any time without the
history (tests/test_stats.py checks it against the plain float64 two-pass computation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import KERNELS

# Weights per block of the CPU record path and of a fit: the block's temporaries stay in cache, and a
# query's extra memory is a few blocks, whatever N (benchmarks/cost.py measures the choice).
BLOCK = 1 << 17
# Weights per block of the compact form's CPU record path (:func:`compact_block`): at least this, at most
# BLOCK, and N/64 between, so that its three scratch vectors (dx, each weight's own y − ν, its mode as
# int32) stay below 0.05 float32 per weight from N = 1e6 on (the default's 3.5 budget), while large
# models get large blocks (fewer operations a record: benchmarks/cost.py).
COMPACT_BLOCK = 1 << 14


def compact_block(numel: int) -> int:
    """Weights per block of the compact form's CPU record path for ``numel`` weights."""
    return max(COMPACT_BLOCK, min(BLOCK, numel // 64))


@dataclass
class AffineFit:
    """The fit of n weights: mode (int64), slope a, intercept b and R² (float64), one entry per weight."""

    modes: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    r2: torch.Tensor


def affine_fit(P: torch.Tensor | Sequence[torch.Tensor], S: torch.Tensor, Q: torch.Tensor, mean: torch.Tensor,
               ref_mean: torch.Tensor, modes: torch.Tensor | None = None) -> AffineFit:
    """The least-squares CMD fit of n weights from their moments.

    The assignment compares |P_mi| / √Q_m, which orders the modes as |ρ_mi| does (S_i is common to
    every m), in P's own dtype: float64 for the post-hoc oracle, float32 for the streaming moments
    (so a weight whose two best |ρ| agree to float32 round-off may take either mode). Ties go to the
    lower mode. a, b and R² are computed in float64.

    Args:
        P (tensor or list of tensors): co-moments, M × n, or its M rows (or, with ``modes`` given,
            the n co-moments with their own mode).
        S (tensor): centred sums of squares of the weights (n,).
        Q (tensor): centred sums of squares of the references (M,).
        mean (tensor): mean of each weight over the window (n,).
        ref_mean (tensor): mean of each reference over the window (M,).
        modes (tensor): fixed modes (n,), for the compact form; None chooses argmax |ρ|.
    """
    if modes is None:
        mode, p = _best_mode(P if isinstance(P, torch.Tensor) else list(P), Q)
    else:
        mode, p = modes.long(), P
    # elementwise arithmetic only (masks are slow on CPU): a = 0 where the weight does not move in the
    # window (S = 0, its value is its mean) or its reference does not (Q = 0; P is then 0 too)
    p = p.double()
    moving = S.double().sign()
    a = p / torch.index_select(Q.double(), 0, mode)
    a.mul_(moving).nan_to_num_(0.0, 0.0, 0.0)
    r2 = (a * p).div_(S.double()).nan_to_num_(0.0, 0.0, 0.0)  # ρ² = P² / (S Q)
    b = torch.index_select(ref_mean.double(), 0, mode).mul_(a).neg_().add_(mean.double())
    return AffineFit(mode, a, b, r2)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _best_mode(rows: list[torch.Tensor] | torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_m |P_m| / √Q_m of each weight (score 0 where Q_m = 0; the lowest m on ties), and P there.

    Exact in the rows' dtype, in integer arithmetic: scores are ≥ 0, and non-negative floats order as
    their bit patterns do, so a running maximum of the bits with a 0/1 "strictly better" step finds
    the first best mode. (On CPU ``argmax(dim=0)`` of an M × n tensor, or boolean masks, are many
    times slower.)
    """
    bits = _BITS[rows[0].dtype]
    scale = torch.where(Q > 0, Q.double().rsqrt(), torch.zeros((), dtype=torch.float64)).tolist()
    best = torch.abs(rows[0]).mul_(scale[0]).view(bits)
    mode = torch.zeros(best.shape, dtype=bits, device=best.device)
    score, better, step = torch.empty_like(rows[0]), torch.empty_like(best), torch.empty_like(best)
    for m in range(1, len(rows)):
        key = torch.abs(rows[m], out=score).mul_(scale[m]).view(bits)
        torch.sub(key, best, out=better).clamp_(0, 1)  # 1 where mode m scores strictly higher
        torch.maximum(best, key, out=best)
        mode.add_(torch.sub(m, mode, out=step).mul_(better))  # m there, unchanged elsewhere
    mode = mode.long()
    P = rows if isinstance(rows, torch.Tensor) else torch.stack(rows)  # an M × n tensor is not copied
    return mode, P.gather(0, mode.unsqueeze(0)).squeeze(0)


def resolved_references(Q: torch.Tensor, count: int, magnitude: torch.Tensor,
                        dtype: torch.dtype | torch.Tensor) -> torch.Tensor:
    """Which references move over the window by more than the resolution of their dtype.

    A reference whose standard deviation over the window is at most 2 units in the last place of
    its value (``dtype``'s spacing there) moves only by rounding: a reference that stopped (a unit
    that died) and jitters by a few float32 ulps. Its |ρ| with other weights is noise and its Q tiny,
    so it would attract weights with huge slopes; such a reference is set aside: no weight is
    assigned to it (it still reproduces itself).

    Args:
        Q (tensor): centred sums of squares of the references over the window (M,).
        count (int): records in the window.
        magnitude (tensor): the references' typical value, e.g. their mean over the window (M,).
        dtype (torch.dtype or tensor): the dtype the reference values were stored in, or each reference's
            machine epsilon (M,) when they differ (references in parameters of several dtypes).
    """
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else dtype.double().to(magnitude.device)
    spacing = eps * magnitude.double().abs()
    return Q.double() > count * (2 * spacing) ** 2


def pin_references(fit: AffineFit, positions: Sequence[int], modes: Sequence[int],
                   moving: Sequence[bool] | None = None) -> None:
    """A reference weight reproduces itself exactly: mode m, a = 1, b = 0 at its position, and R² = 1 —
    or 0 for a reference set aside, which moves by rounding only, as any weight that does not move.

    Args:
        fit (AffineFit): the fit of a run of weights, changed in place.
        positions (sequence of int): positions of reference weights inside that run.
        modes (sequence of int): the mode each of them is the reference of.
        moving (sequence of bool): per mode, whether its reference moves (default: all do).
    """
    if len(positions):
        where = torch.as_tensor(positions, dtype=torch.int64, device=fit.a.device)
        fit.modes[where] = torch.as_tensor(modes, dtype=fit.modes.dtype, device=fit.modes.device)
        fit.a[where], fit.b[where] = 1.0, 0.0
        r2 = [1.0] * len(positions) if moving is None else [float(moving[m]) for m in modes]
        fit.r2[where] = torch.tensor(r2, dtype=fit.r2.dtype, device=fit.r2.device)


def mode_means(modes: torch.Tensor, values: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Mean of ``values`` over the members of each mode (0 for an empty mode), as float64 (M,)."""
    modes = modes.long()
    sums = torch.zeros(num_modes, dtype=torch.float64, device=values.device).index_add_(0, modes, values.double())
    counts = torch.bincount(modes, minlength=num_modes).clamp_min(1)
    return sums / counts


# ---------------------------------------------------------------------------------------- record steps
# One record of the Welford update (see StreamingMoments) in three kernels × two forms. Each step is a
# pure function of the state object ``st`` and one record; StreamingMoments chooses one at
# construction and again at freeze(), never per record.

def _host_ref_update(st: "StreamingMoments", refs: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """The references' moments with host scalars; returns ((n−1)/n · dy, 1/n, (n−1)/n)."""
    st.count += 1
    n = st.count
    dy = (refs - st.ref_shift).float().sub_(st.ref_mean)  # the shift in its own dtype, then float32
    st.ref_mean.add_(dy, alpha=1.0 / n)
    st.ref_sumsq.addcmul_(dy, dy, value=(n - 1) / n)
    return dy.mul_((n - 1) / n), 1.0 / n, (n - 1) / n


def _block_dx(st: "StreamingMoments", w: torch.Tensor, flat: slice, inv_n: float, shrink: float) -> torch.Tensor:
    """dx = (w − c) − μ of one block of the full form into the scratch; μ and S updated (the compact form's
    record, :func:`_compact_blocks`, has no shift)."""
    dx = st.scratch[:flat.stop - flat.start]
    mean = st.mean[flat]
    torch.sub(w, st.shift[flat], out=dx)
    dx.sub_(mean)
    mean.add_(dx, alpha=inv_n)
    st.sumsq[flat].addcmul_(dx, dx, value=shrink)  # S += dx·(x − μ_new) = dx²·(n − 1)/n
    return dx


def _full_blocks(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    """CPU: block by block, so that dx is still in cache for the M + 2 passes that read it."""
    ref_dev, inv_n, shrink = _host_ref_update(st, refs)
    coefficients = ref_dev.tolist()
    for i, local, flat in st.step_blocks:
        dx = _block_dx(st, weights[i][local], flat, inv_n, shrink)
        for row, coefficient in zip(st.comoment, coefficients):
            row[flat].add_(dx, alpha=coefficient)  # P_m += (y − ν)_m · dx


def _compact_blocks(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    ref_dev, inv_n, shrink = _host_ref_update(st, refs)
    if not st.compact_views:  # the views of every block, made once (a view costs as much as a small kernel)
        st.compact_views = _compact_views(st)
    for (i, local), mean, sumsq, p, modes, dx, own, index in st.compact_views:
        torch.sub(weights[i][local], mean, out=dx)  # in μ's dtype, then rounded to float32
        mean.add_(dx, alpha=inv_n)
        sumsq.addcmul_(dx, dx, value=shrink)  # S += dx²·(n − 1)/n
        index.copy_(modes)  # int32: what index_select takes
        torch.index_select(ref_dev, 0, index, out=own)
        p.addcmul_(dx, own)  # p += dx · (y − ν)_{mode}


def _compact_views(st: "StreamingMoments") -> list[tuple]:
    """Per block of the compact record path: where it lies, views of μ, S, p, the modes and the scratch."""
    out = []
    for i, local, flat in st.step_blocks:
        n = flat.stop - flat.start
        out.append(((i, local), st.mean[flat], st.sumsq[flat], st.comoment[0][flat], st.modes[flat],
                    st.scratch[:n], st.own_scratch[:n], st.index_scratch[:n]))
    return out


def _device_ref_update(st: "StreamingMoments", refs: torch.Tensor, ok: torch.Tensor | None):
    """The references' moments with device scalars (no host sync); a record with ``ok`` False changes nothing.

    Returns (√((n−1)/n)·dy, 1/n, √((n−1)/n), mask of a skipped record or None).
    """
    skip = None if ok is None else ok.logical_not()
    grown = st.count_t + (1.0 if ok is None else ok.to(st.count_t.dtype))
    inv_n = (grown - st.count_t) / grown  # 1/n, or 0 for a skipped record
    root = torch.sqrt((grown - 1) / grown)
    st.count_t.copy_(grown)
    dy = (refs - st.ref_shift).float().sub_(st.ref_mean)
    if skip is not None:
        dy.masked_fill_(skip, 0.0)
    st.ref_mean.addcmul_(dy, inv_n.float())
    dy.mul_(root.float())
    st.ref_sumsq.addcmul_(dy, dy)
    return dy, inv_n.float(), root.float(), skip


def _flat_dx(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok):
    """Accelerators: dx of all N weights in a few multi-tensor kernels, scaled by √((n−1)/n)."""
    dy, inv_n, root, skip = _device_ref_update(st, refs, ok)
    dx = st.scratch
    base = st.mean if st.shift is None else st.shift  # the compact form has no shift: dx = w − μ
    if st.copy_exact:  # float32/16 weights: copying to float32 first changes nothing
        _foreach_copy_(st.scratch_views, weights)
        dx.sub_(base)
    else:  # float64 weights against a float64 shift (or mean): subtract before rounding
        for w, c, d in zip(weights, st.views(base), st.scratch_views):
            torch.sub(w, c, out=d)
    if st.shift is not None:
        dx.sub_(st.mean)
    if skip is not None:
        dx.masked_fill_(skip, 0.0)
    st.mean.addcmul_(dx, inv_n)
    dx.mul_(root)
    st.sumsq.addcmul_(dx, dx)  # S += (√((n−1)/n)·dx)²
    return dx, dy


def _full_flat(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    dx, dy = _flat_dx(st, weights, refs, ok)
    for m, row in enumerate(st.comoment):
        row.addcmul_(dx, dy[m])  # P_m += (√s·dy_m)(√s·dx) = (n−1)/n · dy_m · dx


def _compact_flat(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    dx, dy = _flat_dx(st, weights, refs, ok)
    own = torch.index_select(dy, 0, st.modes, out=st.own_scratch)
    st.comoment[0].addcmul_(dx, own)


def _fused_full(w, shift, mean, sumsq, rows, ref_dev, scalars):
    """One record of the full form for one tensor, for torch.compile to fuse into one loop.

    ``rows`` are the M rows of P as separate tensors: written row by row, the compiler computes dx
    once per element and updates all M + 2 outputs from it.
    """
    dx = (w - shift) - mean
    mean.add_(dx * scalars[0])
    sumsq.add_(dx * dx * scalars[1])
    for m, row in enumerate(rows):
        row.add_(dx * ref_dev[m])


def _fused_compact(w, mean, sumsq, comoment, modes, ref_dev, scalars):
    """One record of the compact form for one tensor, for torch.compile to fuse into one loop."""
    dx = w - mean
    mean.add_(dx * scalars[0])
    sumsq.add_(dx * dx * scalars[1])
    comoment.add_(dx * ref_dev[modes.long()])


@functools.lru_cache(maxsize=None)
def _compiled(update: Callable) -> Callable:
    return torch.compile(update, dynamic=True)


def _compiled_scalars(st: "StreamingMoments", refs: torch.Tensor):
    ref_dev, inv_n, shrink = _host_ref_update(st, refs)
    # scalars as a tensor: one compiled kernel serves every record without recompiling
    scalars = torch.tensor([inv_n, shrink], dtype=torch.float32).to(ref_dev.device, non_blocking=True)
    return ref_dev, scalars


def _full_compiled(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    ref_dev, scalars = _compiled_scalars(st, refs)
    update = _compiled(_fused_full)
    shift, mean, sumsq = (st.views(t) for t in (st.shift, st.mean, st.sumsq))
    rows = [st.views(row) for row in st.comoment]
    for i, w in enumerate(weights):
        update(w, shift[i], mean[i], sumsq[i], [r[i] for r in rows], ref_dev, scalars)


def _compact_compiled(st: "StreamingMoments", weights: Sequence[torch.Tensor], refs: torch.Tensor, ok=None) -> None:
    ref_dev, scalars = _compiled_scalars(st, refs)
    update = _compiled(_fused_compact)
    views = [st.views(t) for t in (st.mean, st.sumsq, st.comoment[0], st.modes)]
    for i, w in enumerate(weights):
        update(w, *(v[i] for v in views), ref_dev, scalars)


_STEPS = {
    ("blocks", False): _full_blocks, ("blocks", True): _compact_blocks,
    ("flat", False): _full_flat, ("flat", True): _compact_flat,
    ("compiled", False): _full_compiled, ("compiled", True): _compact_compiled,
}


def _foreach_copy_(dst: list[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):  # torch ≥ 2.2
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _block_plan(sizes: Sequence[int], block: int) -> list[tuple[int, slice, slice]]:
    """(tensor, slice inside the tensor, slice of the flat index) of each block; no block spans two tensors."""
    plan, offset = [], 0
    for i, size in enumerate(sizes):
        for start in range(0, size, block):
            stop = min(start + block, size)
            plan.append((i, slice(start, stop), slice(offset + start, offset + stop)))
        offset += size
    return plan


def mode_dtype(num_modes: int) -> torch.dtype:
    """The smallest integer dtype that holds mode labels 0 … M − 1."""
    return torch.uint8 if num_modes <= 256 else torch.int16 if num_modes <= 32768 else torch.int32


class StreamingMoments:
    """Welford moments of N weights (flat, over all tensors) against M references, one record at a time.

    In the full form the moments are taken of the weights shifted by their value at the window start,
    c, so that float32 keeps its precision for weights whose mean is large against their motion
    (`concepts.md <../docs/concepts.md#the-streaming-statistics>`_); the compact form has no shift
    (c = 0: μ is the weight's mean itself, in the coefficients' dtype). Record n of the window:

    .. math::

        n = 1:&\\quad c ← w,\\; c_{ref} ← y \\qquad (μ = S = P = 0,\\; ν = Q = 0) \\\\
        n ≥ 2:&\\quad dx = (w − c) − μ,\\quad μ ← μ + dx/n,\\quad S ← S + dx^2 (n−1)/n \\\\
              &\\quad dy = (y − c_{ref}) − ν,\\quad ν ← ν + dy/n,\\quad Q ← Q + dy^2 (n−1)/n \\\\
              &\\quad P ← P + ((n−1)/n · dy) ⊗ dx \\qquad\\text{(full form, M × N)} \\\\
              &\\quad p ← p + dx ⊙ ((n−1)/n · dy)_{mode} \\qquad\\text{(compact form, N)}

    After n records μ = mean(w) − c, S = Σ(w − w̄)², Q = Σ(y − ȳ)², P_mi = Σ(w_i − w̄_i)(y_m − ȳ_m).

    State, as flat tensors over the N weights (:meth:`views` splits one per parameter). Full form:
    ``shift`` c (float32; float64 when a parameter is float64, so that its never-moving weights come
    back bit for bit), ``mean`` μ and ``sumsq`` S (float32), ``comoment``, the M rows of P (float32).
    Compact form (after :meth:`freeze`): ``shift`` None, ``mean`` the weights' mean (the shift's
    dtype: the shift is folded into it), S, ``comoment`` the one row p of each weight's co-moment with
    its own mode, and ``modes``. Both: ``ref_shift`` (the shift's dtype), ``ref_mean``, ``ref_sumsq``
    (float32), M each.

    Kernels (chosen once; the step function is chosen again at :meth:`freeze`):

    - ``"blocks"`` (CPU default): block by block of :data:`BLOCK` weights (:func:`compact_block` in
      the compact form), each block's dx in a fixed scratch that stays in cache. Held per weight:
      M + 3 float32 (full), 3 float32 and the mode in one byte (compact, M ≤ 256).
    - ``"flat"`` (accelerator default): a few kernels over all N weights at once, with the record
      count and the Welford scalars on the device, so a record never waits for the host; ``update``
      takes a device flag ``ok`` and a record with ``ok`` False changes nothing. Holds N float32 of
      scratch (dx), and in the compact form N more (each weight's own y − ν) with int32 modes.
    - ``"compiled"``: ``torch.compile`` of one fused loop per tensor (a one-time compile cost).

    Args:
        sizes (sequence of int): number of weights of each tensor, in flat order.
        num_modes (int): M.
        device: where the state lives (default "cpu").
        shift_dtype (torch.dtype): dtype of the shift c (default float32).
        kernel (str): ``"blocks"``, ``"flat"`` or ``"compiled"``; None: blocks on CPU, flat elsewhere.
    """

    def __init__(self, sizes: Sequence[int], num_modes: int, device: torch.device | str = "cpu", *,
                 shift_dtype: torch.dtype = torch.float32, kernel: str | None = None, allocate: bool = True):
        self.device = torch.device(device)
        self.kernel = kernel or ("blocks" if self.device.type == "cpu" else "flat")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
        self.sizes = [int(n) for n in sizes]
        self.num_modes = int(num_modes)
        N = sum(self.sizes)
        zeros = lambda n, dtype=torch.float32: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        self.count = 0  # records in the window (host); the flat kernel keeps it on the device, count_t
        self.count_t = torch.zeros((), dtype=torch.float64, device=self.device) if self.kernel == "flat" else None
        self.shift_dtype = shift_dtype
        # allocate=False: restore() brings the per-weight tensors (a resumed state, without a copy)
        self.shift: torch.Tensor | None = zeros(N if allocate else 0, shift_dtype)
        self.mean = zeros(N if allocate else 0)
        self.sumsq = zeros(N if allocate else 0)
        self.comoment = [zeros(N) for _ in range(self.num_modes)] if allocate else []
        self.modes: torch.Tensor | None = None  # set by freeze()
        self.ref_shift = zeros(self.num_modes, shift_dtype)
        self.ref_eps: torch.Tensor | None = None  # each reference's own machine epsilon, if set (M,)
        self.ref_mean, self.ref_sumsq = zeros(self.num_modes), zeros(self.num_modes)
        self.copy_exact = shift_dtype != torch.float64
        self.blocks = _block_plan(self.sizes, BLOCK)
        self._allocate_scratch(compact=False)
        self._step = _STEPS[(self.kernel, False)]

    def _allocate_scratch(self, compact: bool) -> None:
        """dx (and, compact, each weight's own y − ν and its mode as int32): N floats for the flat kernel,
        one block for the blocks kernel, none for the compiled one."""
        block = compact_block(sum(self.sizes)) if compact else BLOCK
        self.compact_views: list[tuple] = []  # made at the first compact record: they hold the tensors
        size = {"flat": sum(self.sizes), "blocks": min(block, sum(self.sizes)), "compiled": 0}[self.kernel]
        empty = lambda n, dtype=torch.float32: torch.empty(n, dtype=dtype, device=self.device)  # noqa: E731
        self.scratch = empty(size)
        self.scratch_views = self.views(self.scratch) if self.kernel == "flat" else []
        self.own_scratch = empty(size if compact else 0)
        self.index_scratch = empty(size if compact and self.kernel == "blocks" else 0, torch.int32)
        self.step_blocks = _block_plan(self.sizes, block)

    @property
    def compact(self) -> bool:
        return self.modes is not None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat per-weight tensor as one flat view per parameter tensor."""
        return list(torch.split(flat, self.sizes))

    def window_count(self) -> int:
        """Records in the window (reads the device count of the flat kernel: one synchronisation)."""
        return int(self.count_t.item()) if self.count_t is not None else self.count

    def update(self, weights: Sequence[torch.Tensor], refs: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Add one record.

        Args:
            weights (list of tensors): one flat tensor per parameter (any float dtype).
            refs (tensor): the M reference values (float32).
            ok (tensor): for the flat kernel, a device bool; False leaves every statistic unchanged
                (default None: the record is taken). The first record of the window must be taken.
        """
        if self.count == 0:  # the window's first record fixes the shift: μ = S = P = 0
            _foreach_copy_(self.views(self.shift), weights)
            self.ref_shift.copy_(refs)
            self.count = 1
            if self.count_t is not None:
                self.count_t.fill_(1.0)
            return
        self._step(self, weights, refs, ok)

    def freeze(self, modes: torch.Tensor) -> None:
        """Switch to the compact form: keep only each weight's co-moment with its own mode, and fold the
        shift into the mean.

        The co-moments are gathered into the first row of P block by block, in place, and the other
        rows are freed: freezing needs no more memory than the modes themselves and a block.

        Args:
            modes (tensor): the mode of every weight, flat (N,).
        """
        kept = self.comoment[0]
        for _, _, flat in self.blocks:
            chosen, part = modes[flat], kept[flat]
            for m in range(1, self.num_modes):  # one row at a time: no M × block copy
                torch.where(chosen == m, self.comoment[m][flat], part, out=part)
        self.comoment = [kept]
        self.shift.add_(self.mean)  # c + μ, in the shift's dtype: the mean itself
        self.mean, self.shift = self.shift, None
        self._set_compact(modes)

    def _set_compact(self, modes: torch.Tensor) -> None:
        """The modes (in the kernel's dtype), the compact scratch and record step."""
        self.modes = modes.to(self.modes_dtype)
        self._allocate_scratch(compact=True)
        self._step = _STEPS[(self.kernel, True)]

    def mean_of(self, flat: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The weights' mean over the window, float64, of the weights ``flat`` (a slice or indices)."""
        mean = self.mean[flat].double()
        return mean if self.shift is None else mean.add_(self.shift[flat].double())

    def sumsq_of(self, flat: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The weights' centred sums of squares S over the window, float64, of the weights ``flat``."""
        return self.sumsq[flat].double()

    def resolved_references(self) -> torch.Tensor:
        """The references that move above their resolution (:func:`resolved_references`), (M,) bool."""
        return resolved_references(self.ref_sumsq, self.window_count(), self.ref_shift.double() + self.ref_mean.double(),
                                   self.ref_shift.dtype if self.ref_eps is None else self.ref_eps)

    def fit(self, flat: slice | torch.Tensor = slice(None), resolved: torch.Tensor | None = None) -> AffineFit:
        """The affine fit (:func:`affine_fit`) of the weights in ``flat`` (a slice or indices of the flat index).

        Args:
            flat: which weights (default all).
            resolved (tensor): the references that may be assigned to (M bool; default
                :meth:`resolved_references`); the others count as not moving (Q = 0).
        """
        if resolved is None:
            resolved = self.resolved_references()
        Q = torch.where(resolved, self.ref_sumsq, torch.zeros_like(self.ref_sumsq))
        ref_mean = self.ref_shift.double() + self.ref_mean.double()
        mean = self.mean_of(flat)
        if self.modes is None:
            return affine_fit([row[flat] for row in self.comoment], self.sumsq[flat], Q, mean, ref_mean)
        return affine_fit(self.comoment[0][flat], self.sumsq[flat], Q, mean, ref_mean, self.modes[flat])

    def block_plan(self, size: int = BLOCK) -> list[tuple[int, slice, slice]]:
        """Blocks of ``size`` weights: (tensor, slice inside it, slice of the flat index); none spans two tensors."""
        return self.blocks if size == BLOCK else _block_plan(self.sizes, size)

    # ------------------------------------------------------------------------------- state
    def tensors(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Every tensor of the state, by name: flat per-weight tensors, M-vectors, the rows of P (the
        compact form has no ``shift``)."""
        out = {"shift": self.shift, "mean": self.mean, "sumsq": self.sumsq, "comoment": self.comoment,
               "ref_shift": self.ref_shift, "ref_mean": self.ref_mean, "ref_sumsq": self.ref_sumsq,
               "modes": self.modes}
        return {name: value for name, value in out.items() if value is not None}

    def restore(self, state: dict, copy: bool = True) -> None:
        """Take the count and tensors of a ``{"count": …, **tensors()}`` dict (as saved), on this device.

        ``copy=False`` keeps the given tensors themselves where they already have this object's device
        and dtypes (a state built for this recorder, e.g. the template torch.distributed.checkpoint
        loaded into); otherwise they are copied.
        """
        self.compact_views = []  # views of the tensors replaced below would keep them alive

        def own(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            moved = value.to(self.device, dtype).contiguous()
            return moved.clone() if copy and moved.data_ptr() == value.data_ptr() and moved.numel() else moved

        compact = "modes" in state
        for name, dtype in (("sumsq", torch.float32), ("ref_shift", self.shift_dtype), ("ref_mean", torch.float32),
                            ("ref_sumsq", torch.float32)):
            setattr(self, name, own(state[name], dtype))
        self.shift = None if compact else own(state["shift"], self.shift_dtype)
        if compact and state.get("shift") is not None:  # a compact state of version ≤ 3: fold its shift in
            self.mean = (state["shift"].to(self.device).double() + state["mean"].to(self.device).double()).to(
                self.shift_dtype)
        else:
            self.mean = own(state["mean"], self.shift_dtype if compact else torch.float32)
        self.comoment = [own(row, torch.float32) for row in state["comoment"][:1 if compact else self.num_modes]]
        if compact:
            self._set_compact(own(state["modes"], self.modes_dtype))
        self.count = int(state["count"])
        if self.count_t is not None:
            self.count_t.fill_(float(self.count))

    @property
    def modes_dtype(self) -> torch.dtype:
        """The modes' dtype: int32 for the flat kernel (what index_select takes), else the smallest."""
        return torch.int32 if self.kernel == "flat" else mode_dtype(self.num_modes)

    def nbytes(self) -> int:
        """Bytes of the statistics (the state; scratch not included)."""
        tensors = [self.mean, self.sumsq, *self.comoment, self.ref_shift, self.ref_mean, self.ref_sumsq]
        tensors += [t for t in (self.shift, self.modes) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def scratch_nbytes(self) -> int:
        """Bytes of the preallocated temporaries of the record path."""
        return sum(t.numel() * t.element_size() for t in (self.scratch, self.own_scratch, self.index_scratch))
