"""Streaming sufficient statistics of the weights against the reference weights, and the affine fit.

The fit (paper, eqs. 8–10, and the assignment of Algorithm 1) needs, over the fit window, only the
mean of every weight, its centred sum of squares S, the centred sums of squares Q of the M references
and the centred co-moments P (M × N). Given these,

    ρ_mi   = P_mi / sqrt(S_i Q_m)                 (0 where S_i Q_m = 0)
    mode_i = argmax_m |ρ_mi|
    a_i    = P_{mode_i, i} / Q_{mode_i}           (the least-squares slope of eq. 10)
    b_i    = mean_i − a_i · mean_ref[mode_i]       (the least-squares intercept)

and ρ² is each weight's R². :func:`affine_fit` is that computation; :class:`StreamingMoments` keeps
the moments up to date one record at a time (Welford's update), so the fit is available at any time
without the history.

Precision: float32 Welford on raw weights fails when a weight's mean is large against its motion (a
mean of 1e3 moving by 1e-3 is only ~16 float32 ulps, and rounding of the running mean then swamps
the co-moments). The moments are therefore taken of w − c, where the shift c is the weight at the
start of the window, stored exactly: w − c is exact or nearly so, and small numbers keep their
precision. That costs one more float32 per weight than the centred form alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

# Columns per chunk in affine_fit: bounds the M × chunk float64 temporaries of a query.
_FIT_CHUNK = 1 << 18


@dataclass
class AffineFit:
    """Per-weight fit: mode (int64), slope a, intercept b and R² (float64), one entry per weight."""

    modes: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    r2: torch.Tensor


def affine_fit(P: torch.Tensor, S: torch.Tensor, Q: torch.Tensor, mean: torch.Tensor,
               ref_mean: torch.Tensor, modes: torch.Tensor | None = None) -> AffineFit:
    """The least-squares CMD fit of n weights from their moments (computed in float64).

    Args:
        P (tensor): co-moments, M × n (or, with ``modes`` given, the n co-moments with their own mode).
        S (tensor): centred sums of squares of the weights (n,).
        Q (tensor): centred sums of squares of the references (M,).
        mean (tensor): mean of each weight over the window (n,), float64 preferred.
        ref_mean (tensor): mean of each reference over the window (M,).
        modes (tensor): fixed modes (n,), for the compact form; None chooses argmax |ρ|.
    """
    Q = Q.double()
    ref_mean = ref_mean.double()
    mean = mean.double()
    S = S.double()
    out = []
    for start in range(0, S.numel(), _FIT_CHUNK):
        part = slice(start, start + _FIT_CHUNK)
        s = S[part]
        if modes is None:
            p_all = P[:, part].double()
            denom = torch.sqrt(s.unsqueeze(0) * Q.unsqueeze(1))
            rho_all = torch.where(denom > 0, p_all / denom, torch.zeros_like(p_all))
            mode = rho_all.abs().argmax(dim=0)
            p = p_all.gather(0, mode.unsqueeze(0)).squeeze(0)
            rho = rho_all.gather(0, mode.unsqueeze(0)).squeeze(0)
        else:
            mode = modes[part].long()
            p = P[part].double()
            denom = torch.sqrt(s * Q[mode])
            rho = torch.where(denom > 0, p / denom, torch.zeros_like(p))
        q = Q[mode]
        a = torch.where(q > 0, p / q, torch.zeros_like(p))
        # A weight that does not move in the window is exactly its mean: a = 0, b = mean.
        a = torch.where(s > 0, a, torch.zeros_like(a))
        b = mean[part] - a * ref_mean[mode]
        out.append((mode, a, b, rho * rho))
    if not out:
        empty = torch.empty(0, dtype=torch.float64, device=S.device)
        return AffineFit(empty.long(), empty, empty, empty)
    return AffineFit(*(torch.cat(x) for x in zip(*out)))


def mode_means(modes: torch.Tensor, values: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Mean of ``values`` over the members of each mode (0 for an empty mode), as float64 (M,)."""
    modes = modes.long()
    sums = torch.zeros(num_modes, dtype=torch.float64, device=values.device).index_add_(0, modes, values.double())
    counts = torch.bincount(modes, minlength=num_modes).clamp_min(1)
    return sums / counts


def _full_update(w, shift, mean, sumsq, rows, ref_dev, scalars):
    """One record of the full form for one tensor, written for torch.compile to fuse into one loop.

    ``rows`` are the M rows of P as separate views: written row by row, the compiler computes dx once
    per element and updates all M + 2 outputs from it (a broadcast ``P += ref_dev ⊗ dx`` instead
    compiles to a loop over P that recomputes dx per row, slower than eager).
    """
    dx = (w - shift) - mean
    mean.add_(dx * scalars[0])
    sumsq.add_(dx * dx * scalars[1])
    for m, row in enumerate(rows):
        row.add_(dx * ref_dev[m])


def _compact_update(w, shift, mean, sumsq, comoment, modes, ref_dev, scalars):
    """One record of the compact form for one tensor, written for torch.compile to fuse into one loop."""
    dx = (w - shift) - mean
    mean.add_(dx * scalars[0])
    sumsq.add_(dx * dx * scalars[1])
    comoment.add_(dx * ref_dev[modes.long()])


@functools.lru_cache(maxsize=None)
def _compiled(update):
    return torch.compile(update, dynamic=True)


def _foreach_copy_(dst: list[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):  # torch ≥ 2.2
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


class StreamingMoments:
    """Welford moments of N weights, held as one flat float32 tensor per parameter, against M references.

    Full form: per weight the shift c, the shifted mean μ, S and one column of P (M + 3 floats).
    Compact form (after :meth:`freeze`): c, μ, S, the co-moment with the weight's own mode, and
    the mode as int32 (4 floats + 1 int32).

    Each :meth:`update` is a handful of fused kernels per tensor into preallocated scratch (fresh
    N-sized temporaries cost page faults on CPU: 2.7× vs 1.9× the memory floor at N = 10^7); it
    never moves a value to the host.
    """

    def __init__(self, sizes: Sequence[int], num_modes: int, device: torch.device | str = "cpu",
                 compiled: bool = False, foreach: bool | None = None):
        self.num_modes = int(num_modes)
        # multi-tensor (``torch._foreach_*``) passes: by default on accelerators, where each kernel launch
        # costs more than a pass over a small tensor; on CPU the per-tensor loop keeps dx in cache
        self.foreach = torch.device(device).type != "cpu" if foreach is None else bool(foreach)
        self.compiled = bool(compiled)  # torch.compile the update (one-time compile cost)
        self.count = 0  # records in the window; a host int, so the update never syncs
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
        self.shift = [zeros(n) for n in sizes]
        self.mean = [zeros(n) for n in sizes]
        self.sumsq = [zeros(n) for n in sizes]
        self.comoment = [zeros(self.num_modes, n) for n in sizes]  # M × n each; (n,) when compact
        self.modes: list[torch.Tensor] | None = None  # set by freeze()
        self.ref_shift = zeros(self.num_modes)
        self.ref_mean = zeros(self.num_modes)
        self.ref_sumsq = zeros(self.num_modes)
        self.scratch = [torch.empty(n, dtype=torch.float32, device=device) for n in sizes]  # dx, not state
        self.own_scratch: list[torch.Tensor] = []  # compact form: each weight's own (y − ν)

    @property
    def compact(self) -> bool:
        return self.modes is not None

    def update(self, weights: Sequence[torch.Tensor], refs: torch.Tensor) -> None:
        """Add one record: ``weights`` are flat float32 tensors (one per parameter), ``refs`` the M reference values."""
        self.count += 1
        n = self.count
        if n == 1:
            _foreach_copy_(self.shift, weights)
            self.ref_shift.copy_(refs)
            return
        dy = refs - self.ref_shift - self.ref_mean
        self.ref_mean.add_(dy, alpha=1.0 / n)
        self.ref_sumsq.addcmul_(dy, dy, value=(n - 1) / n)
        ref_dev = dy * ((n - 1) / n)  # y − ν after the mean update
        if self.compiled:
            # scalars as a tensor: one compiled kernel serves every record without recompiling
            scalars = torch.tensor([1.0 / n, (n - 1) / n], dtype=torch.float32).to(ref_dev.device, non_blocking=True)
            if self.modes is None:
                update = _compiled(_full_update)
                for w, c, mu, S, P in zip(weights, self.shift, self.mean, self.sumsq, self.comoment):
                    update(w, c, mu, S, P.unbind(0), ref_dev, scalars)
            else:
                update = _compiled(_compact_update)
                for args in zip(weights, self.shift, self.mean, self.sumsq, self.comoment, self.modes):
                    update(*args, ref_dev, scalars)
            return

        inv_n, shrink = 1.0 / n, (n - 1) / n
        if self.foreach:
            # a few multi-tensor kernels for all tensors instead of five launches per tensor (GPU)
            dx = self.scratch
            _foreach_copy_(dx, weights)
            torch._foreach_sub_(dx, self.shift)
            torch._foreach_sub_(dx, self.mean)  # dx = (w − c) − μ
            torch._foreach_add_(self.mean, dx, alpha=inv_n)
            torch._foreach_addcmul_(self.sumsq, dx, dx, value=shrink)
            if self.modes is None:
                for i in range(len(dx)):
                    self._add_comoment(i, ref_dev)
            else:
                for modes, own in zip(self.modes, self.own_scratch):
                    torch.index_select(ref_dev, 0, modes, out=own)
                torch._foreach_addcmul_(self.comoment, dx, self.own_scratch)
            return
        # one tensor at a time, so that each tensor's dx is still in cache for its next passes (CPU)
        for i, (w, dx) in enumerate(zip(weights, self.scratch)):
            torch.sub(w, self.shift[i], out=dx)
            dx.sub_(self.mean[i])  # dx = (w − c) − μ
            self.mean[i].add_(dx, alpha=inv_n)
            # S += dx·(w − c − μ_new) = dx²·(n − 1)/n, without forming w − μ_new
            self.sumsq[i].addcmul_(dx, dx, value=shrink)
            self._add_comoment(i, ref_dev)

    def _add_comoment(self, i: int, ref_dev: torch.Tensor) -> None:
        """P += (y − ν) ⊗ dx for tensor i, from its dx in the scratch."""
        dx = self.scratch[i]
        if self.modes is None:
            # one broadcast kernel over M × n: no M × n temporary
            self.comoment[i].addcmul_(ref_dev.unsqueeze(1), dx.unsqueeze(0))
        else:
            # each weight's own (y − ν); int32 index_select is ~15× faster on CPU than ref_dev[modes]
            own = torch.index_select(ref_dev, 0, self.modes[i], out=self.own_scratch[i])
            self.comoment[i].addcmul_(dx, own)

    def freeze(self, modes: Sequence[torch.Tensor]) -> None:
        """Switch to the compact form: keep only each weight's co-moment with its own mode."""
        self.modes = [m.to(torch.int32) for m in modes]
        self.comoment = [P.gather(0, m.long().unsqueeze(0)).squeeze(0) for P, m in zip(self.comoment, modes)]
        self.own_scratch = [torch.empty_like(s) for s in self.scratch]

    def restore(self, state: dict) -> None:
        """Take the count and tensors of a ``{"count": …, **tensors()}`` dict (as saved), on this device."""
        device = self.ref_mean.device
        self.count = int(state["count"])
        if "modes" in state:
            self.freeze([m.to(device) for m in state["modes"]])
        for name, value in self.tensors().items():
            setattr(self, name, [t.to(device) for t in state[name]] if isinstance(value, list)
                    else state[name].to(device))

    def fit(self) -> list[AffineFit]:
        """The affine fit of every tensor (see :func:`affine_fit`)."""
        ref_mean = self.ref_shift.double() + self.ref_mean.double()
        return [
            affine_fit(P, S, self.ref_sumsq, c.double() + mu.double(), ref_mean,
                       None if self.modes is None else self.modes[i])
            for i, (P, S, c, mu) in enumerate(zip(self.comoment, self.sumsq, self.shift, self.mean))
        ]

    def tensors(self) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Every tensor this object owns, by name (for state_dict and memory accounting)."""
        out = {"shift": self.shift, "mean": self.mean, "sumsq": self.sumsq, "comoment": self.comoment,
               "ref_shift": self.ref_shift, "ref_mean": self.ref_mean, "ref_sumsq": self.ref_sumsq}
        if self.modes is not None:
            out["modes"] = self.modes
        return out

    def nbytes(self) -> int:
        """Bytes of the statistics (the state; scratch not included)."""
        total = 0
        for value in self.tensors().values():
            for t in value if isinstance(value, list) else [value]:
                total += t.numel() * t.element_size()
        return total

    def scratch_nbytes(self) -> int:
        """Bytes of the preallocated temporaries."""
        return sum(t.numel() * t.element_size() for t in self.scratch + self.own_scratch)


# Columns per chunk in quick_fit: an M × chunk float32 scratch stays small (≈ 1.3 MB at M = 10).
_QUICK_CHUNK = 1 << 15


def quick_fit(P: torch.Tensor, S: torch.Tensor, Q: torch.Tensor,
              modes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 mode, R² and slope a of n weights from their moments: a cheap summary, not the fit.

    Same assignment as :func:`affine_fit` (mode = argmax_m ρ²_mi = argmax_m P²_mi / Q_m, since S_i
    is common to all m), at a few float32 passes over P instead of float64 temporaries. The argmax
    packs each mode's code into the lowest ⌈log2 M⌉ mantissa bits of P²/Q (positive floats order
    like their int32 bits), so one fast ``amax`` gives value and index; ties go to the lower mode, as
    in ``argmax``. The mode can thus differ from the float64 fit only for a weight whose two best ρ²
    agree to ~2^(⌈log2 M⌉ − 23) relative. R² and a are then exact float32 from P[mode].

    Args:
        P (tensor): co-moments, M × n (or, with ``modes``, the n co-moments with their own mode).
        S (tensor): centred sums of squares of the weights (n,).
        Q (tensor): centred sums of squares of the references (M,).
        modes (tensor): fixed modes (n,), for the compact form; None chooses argmax |ρ|.

    Returns:
        (modes int64, r2 float32, a float32), each (n,).
    """
    Q = Q.float()
    inv_q = torch.where(Q > 0, 1.0 / Q, torch.zeros_like(Q))
    if modes is not None:
        mode = modes.long()
        p = P.float()
    else:
        M, n = P.shape
        bits = max(1, (M - 1).bit_length())
        low = (1 << bits) - 1
        code = (M - 1 - torch.arange(M, dtype=torch.int32, device=P.device)).unsqueeze(1)
        scratch = torch.empty(M, min(n, _QUICK_CHUNK), dtype=torch.float32, device=P.device)
        mode = torch.empty(n, dtype=torch.int64, device=P.device)
        for start in range(0, n, _QUICK_CHUNK):
            part = P[:, start:start + _QUICK_CHUNK]
            buf = scratch[:, :part.shape[1]]
            torch.mul(part, part, out=buf)
            buf.mul_(inv_q.unsqueeze(1))
            packed = buf.view(torch.int32)
            packed.bitwise_and_(~low).bitwise_or_(code)
            mode[start:start + part.shape[1]] = (M - 1) - (packed.amax(0) & low)
        p = P.gather(0, mode.unsqueeze(0)).squeeze(0)
    q_inv = inv_q[mode]
    a = torch.where(S > 0, p * q_inv, torch.zeros_like(p))
    r2 = torch.where(S > 0, p * a / S.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(p))
    return mode, r2, a
