"""Dynamic Mode Decomposition of a training trajectory: the baseline of the paper's Section 2 and Fig. 5.

DMD fits the records w_0 … w_{T−1} (columns of an N × T matrix W) by a linear system
w_{t+1} ≈ A w_t, so that w_t ≈ Σ_j φ_j b_j λ_j^t (paper, eq. 1). With X = W[:, :−1], Y = W[:, 1:]:

    X ≈ U Σ Vᴴ (rank r)          Ã = Uᴴ Y V Σ⁻¹ = Ŵ Λ Ŵ⁻¹          φ = Y V Σ⁻¹ Ŵ  (exact DMD)

and the amplitudes b minimise Σ_t ‖w_t − Φ diag(λ^t) b‖² over *all* snapshots (Jovanović et al. 2014,
"optimal amplitudes", pydmd's ``opt=True``), not only w_0. The SVD is either a thin SVD of X or, for
N ≫ T, the eigen-decomposition of the T × T Gram matrix XᵀX (same result, O(N T²) with N-long
products only). Everything is computed in float64/complex128.

:func:`node_dmd` is the "node Koopman operator" of Redman et al. (the paper's ref. [27]): the weights
are split into nodes (each output unit with its incoming weights and its bias) and every node gets its
own DMD of rank ≤ r; nodes of equal size are solved together as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import check_int
from ..layout import Layout

# Singular values below this fraction of the largest are dropped (their inverse would be noise).
_RTOL = 1e-10


def _check_trajectory(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N × T); got {type(W).__name__}")
    if W.dim() != 2 or W.shape[1] < 3 or W.shape[0] < 1:
        raise ValueError(f"{name} must be N × T with N ≥ 1 and T ≥ 3 records; got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values; got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return W


def _thin_svd(X: torch.Tensor, rank: int, method: str):
    """Batched truncated SVD of X (B × n × m): U (B × n × r), s (B × r), V (B × m × r); r = min(rank, n, m)."""
    r = min(rank, X.shape[-2], X.shape[-1])
    if method == "svd":
        U, s, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[..., :r], s[..., :r], Vh[..., :r, :].mH
    if method == "gram":
        evals, V = torch.linalg.eigh(X.mT @ X)  # ascending
        evals, V = evals.flip(-1)[..., :r], V.flip(-1)[..., :r]
        s = evals.clamp_min(0).sqrt()
        inv = torch.where(s > _RTOL * s[..., :1], 1 / s, torch.zeros_like(s))
        return (X @ V) * inv.unsqueeze(-2), s, V
    raise ValueError(f"method must be 'svd' or 'gram'; got {method!r}")


def _fit(W: torch.Tensor, rank: int, method: str, exact: bool):
    """Batched DMD of W (B × n × T) → modes (B × n × r), eigs (B × r), amplitudes (B × r), all complex."""
    X, Y = W[..., :-1], W[..., 1:]
    U, s, V = _thin_svd(X, rank, method)
    inv = torch.where(s > _RTOL * s[..., :1], 1 / s, torch.zeros_like(s))
    YVS = (Y @ V) * inv.unsqueeze(-2)  # n × r
    atilde = U.mT @ YVS  # r × r
    eigs, vecs = torch.linalg.eig(atilde)
    modes = (YVS.to(vecs.dtype) @ vecs) if exact else (U.to(vecs.dtype) @ vecs)
    # Optimal amplitudes over all T snapshots: P b = q with P = (ΦᴴΦ) ∘ conj(V Vᴴ), q = conj(diag(V Wᴴ Φ)).
    T = W.shape[-1]
    vander = eigs.unsqueeze(-1) ** torch.arange(T, dtype=W.dtype, device=W.device)  # r × T
    P = (modes.mH @ modes) * (vander @ vander.mH).conj()
    q = ((vander @ W.to(modes.dtype).mT) * modes.mT).sum(-1).conj()  # diag(V Wᵀ Φ), without the r × r product
    amplitudes = (torch.linalg.pinv(P, hermitian=True) @ q.unsqueeze(-1)).squeeze(-1)
    return modes, eigs, amplitudes


@dataclass
class DMD:
    """A DMD model w_t ≈ Re Σ_j modes[:, j] · amplitudes[j] · eigs[j]^t.

    Attributes:
        modes (tensor): N × r complex DMD modes φ.
        eigs (tensor): r complex eigenvalues λ.
        amplitudes (tensor): r complex amplitudes b (fitted to all snapshots).
    """

    modes: torch.Tensor
    eigs: torch.Tensor
    amplitudes: torch.Tensor

    @property
    def rank(self) -> int:
        return self.eigs.numel()

    def reconstruct(self, at: int) -> torch.Tensor:
        """The N-vector of DMD weights at record ``at`` (≥ 0; beyond the fitted records it extrapolates)."""
        return (self.modes @ (self.amplitudes * self.eigs ** int(at))).real

    def reconstruct_all(self, num_records: int) -> torch.Tensor:
        """N × T matrix of DMD weights for records 0 … T−1."""
        t = torch.arange(num_records, dtype=torch.float64, device=self.eigs.device)
        return (self.modes @ (self.amplitudes.unsqueeze(1) * self.eigs.unsqueeze(1) ** t)).real


def dmd(W: torch.Tensor, rank: int, *, method: str = "svd", exact: bool = True) -> DMD:
    """Truncated DMD of a whole trajectory.

    Args:
        W (tensor): N × T trajectory, one column per record.
        rank (int): r, the number of singular values kept (capped by min(N, T − 1)).
        method (str): "svd" (thin SVD of the snapshots) or "gram" (T × T Gram matrix; for N ≫ T) (default "svd").
        exact (bool): exact DMD modes Y V Σ⁻¹ Ŵ; False gives projected modes U Ŵ (default True).
    """
    W = _check_trajectory(W).double()
    modes, eigs, amplitudes = _fit(W.unsqueeze(0), check_int("rank", rank, 1), method, exact)
    return DMD(modes[0], eigs[0], amplitudes[0])


@dataclass
class NodeDMD:
    """One DMD per node (node Koopman operator). ``groups`` are the flat indices of each node."""

    num_weights: int
    groups: list[torch.Tensor]
    models: list[DMD]

    def reconstruct(self, at: int) -> torch.Tensor:
        """The N-vector of DMD weights at record ``at``; weights in no node stay NaN."""
        out = torch.full((self.num_weights,), float("nan"), dtype=torch.float64)
        for index, model in zip(self.groups, self.models):
            out[index] = model.reconstruct(at).reshape(-1).to(out.device)
        return out


def node_dmd(W: torch.Tensor, groups: Sequence[torch.Tensor], rank: int, *, method: str = "svd",
             exact: bool = True) -> NodeDMD:
    """DMD of each node's weights separately (the paper's "Koopman node operator", ref. [27]).

    Args:
        W (tensor): N × T trajectory.
        groups (sequence of tensor): flat indices of the weights of each node (see :func:`node_groups`).
        rank (int): r per node, capped by min(node size, T − 1).
        method (str): "svd" or "gram" (default "svd").
        exact (bool): exact or projected modes (default True).
    """
    W = _check_trajectory(W).double()
    rank = check_int("rank", rank, 1)
    groups = [torch.as_tensor(g, dtype=torch.int64) for g in groups]
    if not groups or any(g.dim() != 1 or g.numel() == 0 for g in groups):
        raise ValueError("groups must be a non-empty list of non-empty 1-D index tensors")
    if int(torch.cat(groups).max()) >= W.shape[0] or int(torch.cat(groups).min()) < 0:
        raise ValueError(f"groups hold indices outside [0, N = {W.shape[0]})")
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(g.numel(), []).append(i)
    batch_groups, models = [], []
    for size, members in by_size.items():
        index = torch.stack([groups[i] for i in members])  # B × size
        modes, eigs, amplitudes = _fit(W[index], rank, method, exact)
        for j, i in enumerate(members):
            batch_groups.append(groups[i])
            models.append(DMD(modes[j], eigs[j], amplitudes[j]))
    return NodeDMD(W.shape[0], batch_groups, models)


def node_groups(named_shapes: Sequence[tuple[str, Sequence[int]]]) -> list[torch.Tensor]:
    """Flat indices of each node: output unit j of a module with all its parameters' j-th slices.

    Parameters are grouped by module (the name up to the last dot); in a module whose parameters
    share their first dimension (weight out × …, bias out, BatchNorm weight/bias), node j holds
    weight[j], bias[j], …. A parameter with another first dimension forms its own nodes by rows.

    Args:
        named_shapes (sequence of (str, shape)): parameter names and shapes in flat (optimizer) order,
            e.g. ``[(n, p.shape) for n, p in model.named_parameters()]``.
    """
    named_shapes = [(name, tuple(int(s) for s in shape)) for name, shape in named_shapes]
    layout = Layout(tuple(n for n, _ in named_shapes), tuple(s for _, s in named_shapes),
                    (torch.float32,) * len(named_shapes))
    modules: dict[tuple[str, int], list[tuple[tuple[int, ...], int]]] = {}
    for (name, shape), start in zip(named_shapes, layout.offsets):
        rows = shape[0] if shape else 1
        modules.setdefault((name.rsplit(".", 1)[0], rows), []).append((shape, start))
    groups = []
    for (_, rows), params in modules.items():
        for j in range(rows):
            parts = []
            for shape, start in params:
                width = math.prod(shape[1:])
                parts.append(torch.arange(start + j * width, start + (j + 1) * width))
            groups.append(torch.cat(parts))
    return groups
