"""DMD baseline: exact on linear dynamics, agrees with pydmd, node variant covers every weight."""

import pytest
import torch

from cmd_online.baselines import dmd, node_dmd, node_groups


def linear_trajectory(n=6, T=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = 0.98 * A / torch.linalg.eigvals(A).abs().max()
    cols = [torch.randn(n, generator=g, dtype=torch.float64)]
    for _ in range(T - 1):
        cols.append(A @ cols[-1])
    return torch.stack(cols, 1)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_full_rank_dmd_reproduces_linear_dynamics(method):
    W = linear_trajectory()
    model = dmd(W, rank=6, method=method)
    assert (model.reconstruct_all(30) - W).norm() / W.norm() < 1e-10
    assert torch.allclose(model.reconstruct(7), W[:, 7], atol=1e-10)


def test_svd_and_gram_give_the_same_truncated_model():
    W = torch.randn(200, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).cumsum(1)
    a, b = dmd(W, 5, method="svd"), dmd(W, 5, method="gram")
    assert torch.allclose(a.reconstruct_all(25), b.reconstruct_all(25), atol=1e-8)


def test_optimal_amplitudes_fit_better_than_the_first_snapshot_only():
    W = torch.randn(40, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).cumsum(1)
    model = dmd(W, 4)
    err = (model.reconstruct_all(25) - W).norm()
    first = torch.linalg.lstsq(model.modes, W[:, 0].to(model.modes.dtype).unsqueeze(1)).solution.squeeze(1)
    t = torch.arange(25, dtype=torch.float64)
    naive = (model.modes @ (first.unsqueeze(1) * model.eigs.unsqueeze(1) ** t)).real
    assert err < (naive - W).norm()


def test_matches_pydmd_with_optimal_amplitudes():
    pydmd = pytest.importorskip("pydmd", reason="pydmd is not installed (pip install pydmd)")
    W = torch.randn(40, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).cumsum(1)
    ours = dmd(W, 5, exact=True)
    ref = pydmd.DMD(svd_rank=5, exact=True, opt=True).fit(W.numpy())
    expected = torch.from_numpy(ref.reconstructed_data.real)
    assert torch.allclose(ours.reconstruct_all(25), expected, atol=1e-9 * expected.abs().max())
    assert torch.allclose(ours.eigs.abs().sort().values, torch.from_numpy(abs(ref.eigs)).sort().values, atol=1e-10)


def test_node_groups_follow_modules_and_cover_every_weight_once():
    shapes = [("conv.weight", (4, 3, 2)), ("conv.bias", (4,)), ("bn.weight", (4,)), ("bn.bias", (4,)),
              ("fc.weight", (2, 8)), ("fc.bias", (2,))]
    groups = node_groups(shapes)
    assert len(groups) == 4 + 4 + 2
    assert groups[0].tolist() == [0, 1, 2, 3, 4, 5, 24]  # conv filter 0 and its bias
    assert groups[4].tolist() == [28, 32]  # bn channel 0: weight and bias
    assert torch.cat(groups).sort().values.tolist() == list(range(54))


def test_node_dmd_is_exact_on_independent_linear_nodes():
    W = torch.cat([linear_trajectory(3, 20, seed=s) for s in range(4)])  # 4 nodes of 3 weights
    groups = [torch.arange(3 * k, 3 * k + 3) for k in range(4)]
    model = node_dmd(W, groups, rank=3)
    for t in (0, 9, 19):
        assert torch.allclose(model.reconstruct(t), W[:, t], atol=1e-9)


def test_bad_arguments_name_the_argument():
    W = torch.randn(5, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank"):
        dmd(W, 0)
    with pytest.raises(TypeError, match="rank"):
        dmd(W, 2.5)
    with pytest.raises(ValueError, match="method"):
        dmd(W, 2, method="qr")
    with pytest.raises(ValueError, match="W must be N × T"):
        dmd(W[:, :2], 1)
    with pytest.raises(ValueError, match="groups"):
        node_dmd(W, [torch.tensor([7])], 1)


def test_node_groups_offsets_skip_empty_tensors_as_the_layout_does():
    # a 0-size tensor holds no weights: the next tensor starts at the same flat offset (it once shifted by one)
    assert [g.tolist() for g in node_groups([("a.weight", (0, 3)), ("b.bias", (2,))])] == [[0], [1]]


def test_rank_accepts_numpy_integers_like_every_other_integer_argument():
    import numpy as np

    W = torch.randn(5, 10, dtype=torch.float64)
    assert dmd(W, np.int64(2)).rank == 2
