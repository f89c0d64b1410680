"""Sampling (paper, appendix 8.2) and correlation clustering (Algorithm 1, steps 2–4)."""

import numpy as np
import pytest
import torch

from cmd_online.clustering import cluster
from cmd_online.sampling import sample_indices


def test_each_layer_gets_its_share_and_the_rest_is_uniform():
    sizes = [5000, 300, 40, 10_000]
    idx = sample_indices(sizes, 200, seed=0)
    assert len(idx) == 200 and len(torch.unique(idx)) == 200
    assert torch.equal(idx, torch.sort(idx).values)
    edges = np.cumsum([0] + sizes)
    counts = np.histogram(idx.numpy(), bins=edges)[0]
    assert (counts >= 200 // (2 * 4)).all()  # ⌊K / 2L⌋ = 25 per layer at least
    assert counts[1] < 100 and counts[3] > counts[1]  # the uniform half follows the layer sizes


def test_a_layer_smaller_than_its_share_gives_all_its_weights():
    idx = sample_indices([3, 1000], 100, seed=1)
    assert {0, 1, 2} <= set(idx.tolist())
    assert len(torch.unique(idx)) == 100


def test_many_layers_fall_back_to_uniform_sampling():
    sizes = [10] * 60  # K/2 = 30 ≤ L = 60
    idx = sample_indices(sizes, 60, seed=2)
    assert len(torch.unique(idx)) == 60
    counts = np.bincount(idx.numpy() // 10, minlength=60)
    assert (counts == 0).any()  # no per-layer quota: some layers get none


def test_same_seed_same_samples_other_seed_other_samples():
    assert torch.equal(sample_indices([1000, 1000], 50, 7), sample_indices([1000, 1000], 50, 7))
    assert not torch.equal(sample_indices([1000, 1000], 50, 7), sample_indices([1000, 1000], 50, 8))


def test_all_weights_can_be_sampled():
    assert torch.equal(sample_indices([4, 6], 10, 0), torch.arange(10))


@pytest.mark.parametrize("sizes, k", [([10], 11), ([10], 0), ([], 1)])
def test_bad_sampling_arguments(sizes, k):
    with pytest.raises(ValueError, match="samples|layer_sizes"):
        sample_indices(sizes, k)


def _three_groups(T=30, per=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    profiles = [torch.exp(-5 * t), torch.sin(7 * t), torch.cos(13 * t)]
    rows, truth = [], []
    for m, (p, n) in enumerate(zip(profiles, (3 * per, 2 * per, per))):
        for _ in range(n):
            rows.append(torch.randn(1, generator=g).item() * p + torch.randn(1, generator=g).item()
                        + 1e-3 * torch.randn(T, generator=g, dtype=torch.float64))
            truth.append(m)
    return torch.stack(rows), np.array(truth)


def test_modes_are_numbered_largest_first():
    h, truth = _three_groups()
    found = cluster(h, modes=3)
    assert np.bincount(found.labels).tolist() == [60, 40, 20]
    assert (found.labels == truth).all()


def test_reference_maximises_summed_absolute_correlation_in_its_mode():
    h, _ = _three_groups()
    found = cluster(h, modes=3)
    corr = np.abs(np.corrcoef(h.numpy()))
    for m, r in enumerate(found.reference):
        members = np.flatnonzero(found.labels == m)
        scores = corr[np.ix_(members, members)].sum(axis=0)
        assert r == members[np.argmax(scores)]


def test_constant_rows_are_set_aside_and_never_references():
    h, _ = _three_groups()
    h[[0, 5, 70]] = 2.5
    found = cluster(h, modes=3)
    assert (found.labels[[0, 5, 70]] == -1).all()
    assert not set(found.reference) & {0, 5, 70}
    assert len(found.varying) == len(h) - 3


def test_all_constant_history_gives_one_mode():
    found = cluster(torch.ones(10, 5), modes=3)
    assert found.num_modes == 1


def test_one_mode_and_single_varying_row():
    h, _ = _three_groups()
    assert cluster(h, modes=1).num_modes == 1
    h2 = torch.ones(4, 6, dtype=torch.float64)
    h2[2] = torch.arange(6.0)
    found = cluster(h2, modes=2)
    assert found.num_modes == 1 and found.reference.tolist() == [2]


def _two_signals_apart(distance: float, T: int = 12, copies: int = 500) -> np.ndarray:
    """float32 rows: ``copies`` of x and ``copies`` of y with 1 − |corr(x, y)| = ``distance``."""
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal(T), rng.standard_normal(T)
    x -= x.mean()
    z -= z.mean()
    z -= (z @ x) / (x @ x) * x
    x, z = x / np.linalg.norm(x), z / np.linalg.norm(z)
    rho = 1 - distance
    y = rho * x + np.sqrt(1 - rho ** 2) * z
    return np.vstack([np.tile(x, (copies, 1)), np.tile(y, (copies, 1))]).astype(np.float32)


@pytest.mark.parametrize("gap", [2e-6, 1e-5])
def test_threshold_never_joins_samples_whose_corr_is_below_1_minus_t_by_more_than_1e_9(gap):
    t = 0.1
    history = _two_signals_apart(t + gap)
    actual = 1 - abs(np.corrcoef(history[0].astype(np.float64), history[-1].astype(np.float64))[0, 1])
    assert t + 1e-9 < actual < t + 3e-5  # inside the old margin 8·eps32·√1000 ≈ 3.0e-5, which joined them
    found = cluster(torch.from_numpy(history), threshold=t)
    assert found.num_modes == 2 and len(set(found.labels[:500])) == 1 and len(set(found.labels[500:])) == 1
    assert found.labels[0] != found.labels[-1]


def test_threshold_joins_samples_whose_corr_is_1_minus_t_up_to_round_off():
    t = 0.1
    history = _two_signals_apart(t - 2e-6)
    actual = 1 - abs(np.corrcoef(history[0].astype(np.float64), history[-1].astype(np.float64))[0, 1])
    assert actual <= t
    assert cluster(torch.from_numpy(history), threshold=t).num_modes == 1
    assert cluster(torch.from_numpy(history), threshold=actual).num_modes == 1  # exactly at the boundary
