"""The K sampled weights whose full warm-up history is kept (paper, appendix 8.2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import check_int


def sample_indices(layer_sizes: Sequence[int], samples: int, seed: int = 0) -> torch.Tensor:
    """K distinct flat indices, sorted, drawn as in the paper's appendix 8.2.

    Every layer (parameter tensor) gets ⌊K / (2L)⌋ samples, capped by its size, drawn uniformly
    inside it; the remaining samples are drawn uniformly over all N weights, without duplicates.
    If K/2 ≤ L, all K samples are drawn uniformly over all N.

    Args:
        layer_sizes (sequence of int): number of weights in each of the L layers, in flat order.
        samples (int): K, the number of samples; 1 ≤ K ≤ N.
        seed (int): seed of the random generator; the same seed gives the same samples.
    """
    sizes = [int(s) for s in layer_sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"layer_sizes must be a non-empty list of sizes ≥ 0; got {list(layer_sizes)}")
    total = sum(sizes)
    samples = check_int("samples", samples, 1, total)
    rng = np.random.default_rng(seed)
    chosen = np.empty(0, dtype=np.int64)
    if samples / 2 > len(sizes):
        per_layer = samples // (2 * len(sizes))
        start = 0
        picks = []
        for size in sizes:
            take = min(per_layer, size)
            if take:
                picks.append(start + rng.choice(size, size=take, replace=False))
            start += size
        chosen = np.concatenate(picks).astype(np.int64) if picks else chosen
    need = samples - len(chosen)
    if need:
        # Draw enough distinct candidates that, after dropping the ones already chosen, `need` remain.
        candidates = rng.choice(total, size=min(total, need + len(chosen)), replace=False)
        candidates = candidates[~np.isin(candidates, chosen)][:need]
        chosen = np.concatenate([chosen, candidates.astype(np.int64)])
    return torch.from_numpy(np.sort(chosen))
