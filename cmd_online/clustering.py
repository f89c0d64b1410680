"""Correlation clustering of the sampled weights and the choice of references (paper, Algorithm 1).

Steps 2–4 of Algorithm 1: the correlation C of the K sampled trajectories, complete ("farthest
point", appendix 8.3) linkage on the distance D = 1 − |C|, a cut into modes, and one reference per
mode: r_m = argmax_{j ∈ C_m} Σ_{i ∈ C_m} |C_ij|.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from .config import DISTANCES, check_choice, check_modes


@dataclass
class Clustering:
    """The result of clustering K sampled trajectories.

    Attributes:
        labels (np.ndarray): mode of each sample (K,), modes numbered by size, largest first;
            −1 for a sample whose trajectory is constant (set aside, never a reference).
        reference (np.ndarray): for each mode, the position (0..K−1) of its reference sample.
        abs_corr (np.ndarray): |C| among the non-constant samples, in sample order (k × k).
        varying (np.ndarray): positions of the non-constant samples (k,).
    """

    labels: np.ndarray
    reference: np.ndarray
    abs_corr: np.ndarray
    varying: np.ndarray

    @property
    def num_modes(self) -> int:
        return len(self.reference)


# Merge heights below ROUNDOFF · eps(history dtype) · √k (relative to max(1, the largest height), k
# samples) are the history's round-off: its rounding moves a correlation by about eps, a Euclidean
# distance between rows of |C| by about eps·√k, and it must never split a mode. A cut that falls among
# them takes them all.
ROUNDOFF = 8.0
# Above that level a merge height is a distance of the data: two heights are distinct when they differ
# by more than the round-off of the float64 distance computation, this fraction of max(1, the largest
# height). A threshold is the user's bound, not a height of the tree: above it only this is allowed.
THRESHOLD_ROUNDOFF = 1e-9


def cluster(history: torch.Tensor | np.ndarray, modes: int | None = None, threshold: float | None = None,
            distance: str = "correlation", max_modes: int | None = None) -> Clustering:
    """Cluster K trajectories (rows of ``history``, K × T) into modes by correlation.

    Complete linkage on the distance between samples, then a cut. With ``modes``, M modes come out
    wherever the tree has M − 1 merges above the history's round-off (:data:`ROUNDOFF`) whose heights
    differ from the next lower one by more than the float64 round-off of the distances
    (:data:`THRESHOLD_ROUNDOFF`, 10⁻⁹), as scipy's ``maxclust`` gives them; merges of round-off height
    fall on one side of the cut, so round-off never splits a mode: two records (every |corr| = 1)
    always give one mode, and exact affine copies of one another always share a mode. Fewer modes than
    asked come out with a ``RuntimeWarning`` that gives their number. With ``threshold`` the cut is at
    the threshold plus :data:`THRESHOLD_ROUNDOFF` only.

    Args:
        history (tensor or array): K × T trajectories of the sampled weights.
        modes (int): cut the linkage into at most this many modes (criterion ``maxclust``).
        threshold (float): or cut at this distance (criterion ``distance``): with the correlation
            distance every pair inside a mode then has |corr| ≥ 1 − threshold − 10⁻⁹, the paper's
            hypothesis with ε = threshold.
        distance (str): ``"correlation"``: 1 − |C_ij| (default); ``"euclidean"``: the Euclidean
            distance between rows i and j of |C|, the distance of the paper authors' code.
        max_modes (int): with ``threshold``, a cut that gives more modes is coarsened to this many
            (criterion ``maxclust``) (default None: no bound).
    """
    modes, threshold = check_modes(modes, threshold)
    check_choice("distance", distance, DISTANCES)
    history = torch.as_tensor(history).detach()
    eps = torch.finfo(history.dtype).eps if history.is_floating_point() else torch.finfo(torch.float64).eps
    h = history.to("cpu", torch.float64).numpy()
    if h.ndim != 2 or h.shape[1] < 2:
        raise ValueError(f"history must be K × T with T ≥ 2; got shape {h.shape}")
    labels = np.full(h.shape[0], -1, dtype=np.int64)
    # A constant row has no correlation with anything; it is set aside (paper: zero variance).
    varying = np.flatnonzero(h.max(axis=1) > h.min(axis=1))
    if len(varying) == 0:
        # Nothing moves: one mode whose reference is the first sample; every fit is then a = 0, b = mean.
        labels[:] = 0
        _warn_fewer(modes, 1, "none of the sampled trajectories moves")
        return Clustering(labels, np.array([0]), np.ones((1, 1)), np.array([0]))
    abs_corr = np.abs(np.corrcoef(h[varying])) if len(varying) > 1 else np.ones((1, 1))
    abs_corr = np.nan_to_num(np.clip(abs_corr, 0.0, 1.0), nan=0.0)
    raw = np.zeros(len(varying), dtype=np.int64) if len(varying) == 1 else \
        _cut(linkage(_condensed(abs_corr, distance), method="complete"), modes, threshold,
             ROUNDOFF * eps * np.sqrt(len(varying)), max_modes)
    # Number modes by size, largest first; ties broken by the first member's position.
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-counts[i], first[i]))
    relabel = np.empty(ids.max() + 1, dtype=np.int64)
    relabel[ids[order]] = np.arange(len(ids))
    sub_labels = relabel[raw]
    labels[varying] = sub_labels
    _warn_fewer(modes, len(ids), f"only {len(varying)} sampled trajectories move" if len(varying) < (modes or 0)
                else f"the sampled trajectories form only {len(ids)} group{'s' * (len(ids) != 1)} apart from round-off")
    reference = np.empty(len(ids), dtype=np.int64)
    for m in range(len(ids)):
        members = np.flatnonzero(sub_labels == m)
        score = abs_corr[np.ix_(members, members)].sum(axis=0)
        reference[m] = varying[members[np.argmax(score)]]
    return Clustering(labels, reference, abs_corr, varying)


def _condensed(abs_corr: np.ndarray, distance: str) -> np.ndarray:
    """The pairwise distances of the samples, condensed (scipy's form)."""
    if distance == "euclidean":
        return pdist(abs_corr, "euclidean")
    d = 1.0 - abs_corr
    np.fill_diagonal(d, 0.0)
    return squareform(d, checks=False)


def _cut(tree: np.ndarray, modes: int | None, threshold: float | None, roundoff: float,
         max_modes: int | None = None) -> np.ndarray:
    """Flat clusters of a linkage: at most ``modes`` of them, or merged up to ``threshold`` (and then
    at most ``max_modes``).

    The cut is made at a height, and every merge within :data:`THRESHOLD_ROUNDOFF` (relative) above it
    is taken too; a cut among the merges of round-off height (below ``roundoff``, relative) takes all of
    them.
    """
    heights = tree[:, 2]
    scale = max(1.0, float(heights.max()))
    # the lowest height that leaves at most `bound` clusters: K − bound merges (heights ascend)
    lowest = lambda bound: heights[len(heights) - bound] if bound <= len(heights) else 0.0  # noqa: E731
    height = threshold if threshold is not None else lowest(modes)
    if threshold is not None and max_modes is not None and lowest(max_modes) > threshold:
        height = lowest(max_modes)
    if height < roundoff * scale and (threshold is None or height != threshold):
        height = roundoff * scale
    return fcluster(tree, t=height + THRESHOLD_ROUNDOFF * scale, criterion="distance")


def _warn_fewer(modes: int | None, found: int, why: str) -> None:
    if modes is not None and found < modes:
        warnings.warn(f"clustering: modes={modes} asked, {found} found: {why} (docs/caveats.md, fewer modes than "
                      f"asked)", RuntimeWarning, stacklevel=3)
