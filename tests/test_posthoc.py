"""Post-hoc CMD (paper, Algorithms 1 and 2) on planted, brute-force and real trajectories."""

import math
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import cmd_online as cmdo
from cmd_online import posthoc
from cmd_online.layout import Layout
from _digits import accuracy, small_cnn, train_epoch

NOISE = 1e-3


def planted(N=3000, T=40, M=4, seed=0, constant=50, dtype=torch.float64):
    """W = a·profile[mode] + b + noise, with anti-correlated members (a < 0) and constant weights."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    # nearly orthogonal profiles: a decay, and three oscillations
    profiles = torch.stack([torch.exp(-4 * t), torch.sin(2 * math.pi * t), torch.cos(3 * math.pi * t),
                            torch.sin(5 * math.pi * t)][:M])
    modes = torch.randint(0, M, (N,), generator=g)
    # |a| in [0.5, 2], about half negative: anti-correlated members
    a = (0.5 + 1.5 * torch.rand(N, generator=g, dtype=torch.float64)) * torch.randn(N, generator=g).sign()
    b = torch.randn(N, generator=g, dtype=torch.float64)
    W = a[:, None] * profiles[modes] + b[:, None] + NOISE * torch.randn(N, T, generator=g, dtype=torch.float64)
    W[:constant] = b[:constant, None]  # weights that never move
    return W.to(dtype), modes, a, b, profiles


def test_planted_modes_are_recovered():
    W, modes, a, _, _ = planted()
    traj = cmdo.decompose(W, modes=4, samples=400)
    moving = slice(50, None)
    assert adjusted_rand_score(modes[moving].numpy(), traj.modes[moving].numpy()) >= 0.99
    assert (a[moving] < 0).any() and (traj.a[moving] < 0).sum() == (a[moving] < 0).sum()


def test_planted_reconstruction_error_is_at_noise_level():
    W, *_ = planted()
    traj = cmdo.decompose(W, modes=4, samples=400)
    W_hat = torch.stack([traj.reconstruct(s) for s in range(W.shape[1])], dim=1)
    rms = (W_hat - W).pow(2).mean().sqrt().item()
    # the reference carries its own noise into its mode, so the residual is about √2 × noise
    assert NOISE * 0.5 < rms < NOISE * 2


def test_constant_weights_reconstruct_exactly():
    W, *_ = planted()
    traj = cmdo.decompose(W, modes=4, samples=400)
    assert torch.equal(traj.a[:50], torch.zeros(50, dtype=W.dtype))
    for s in (0, 17, -1):
        assert torch.equal(traj.reconstruct(s)[:50], W[:50, s])


def test_references_reconstruct_exactly():
    W, *_ = planted()
    traj = cmdo.decompose(W, modes=4, samples=400)
    idx = traj.reference_index
    assert torch.equal(traj.a[idx], torch.ones(4, dtype=W.dtype))
    assert torch.equal(traj.reconstruct(5)[idx], W[idx, 5])


def brute_force_cmd(W: np.ndarray, reference_index: np.ndarray):
    """Written plainly: full correlation with every reference, then explicit least squares per weight."""
    N, T = W.shape
    modes, a, b = np.zeros(N, dtype=np.int64), np.zeros(N), np.zeros(N)
    for i in range(N):
        corr = []
        for r in reference_index:
            if W[i].max() == W[i].min() or W[r].max() == W[r].min():
                corr.append(0.0)
            else:
                corr.append(abs(np.corrcoef(W[i], W[r])[0, 1]))
        m = int(np.argmax(corr))
        design = np.stack([W[reference_index[m]], np.ones(T)], axis=1)
        (a[i], b[i]), *_ = np.linalg.lstsq(design, W[i], rcond=None)
        if W[i].max() == W[i].min():
            a[i], b[i] = 0.0, W[i, 0]
        modes[i] = m
    return modes, a, b


def test_matches_brute_force_float64_reference():
    W, *_ = planted(N=600, T=25, M=3, seed=3, constant=10)
    traj = cmdo.decompose(W, modes=3, samples=200, seed=1)
    modes, a, b = brute_force_cmd(W.numpy(), traj.reference_index.numpy())
    assert np.array_equal(traj.modes.numpy(), modes)
    np.testing.assert_allclose(traj.a.numpy(), a, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(traj.b.numpy(), b, rtol=1e-6, atol=1e-9)


def test_chunked_fit_equals_single_chunk(monkeypatch):
    W, *_ = planted(N=1000, T=20)
    whole = cmdo.decompose(W, modes=4, samples=300)
    monkeypatch.setattr(posthoc, "_CHUNK_ELEMENTS", 20 * 37)  # 37 rows per chunk
    chunked = cmdo.decompose(W, modes=4, samples=300)
    assert torch.equal(whole.modes, chunked.modes)
    torch.testing.assert_close(whole.a, chunked.a, rtol=1e-12, atol=1e-12)


def test_float32_input_gives_float32_model_close_to_float64():
    W, *_ = planted(N=800, T=20)
    t64 = cmdo.decompose(W, modes=4, samples=300)
    t32 = cmdo.decompose(W.float(), modes=4, samples=300)
    assert t32.a.dtype == torch.float32 and t64.a.dtype == torch.float64
    assert (t32.modes == t64.modes).float().mean() > 0.99
    assert (t32.reconstruct(-1).double() - t64.reconstruct(-1)).abs().max() < 1e-4


def test_numpy_input_is_accepted():
    W, *_ = planted(N=500, T=12)
    assert torch.equal(cmdo.decompose(W.numpy(), modes=4, samples=100).modes,
                       cmdo.decompose(W, modes=4, samples=100).modes)


def test_threshold_bounds_in_mode_correlation():
    W, *_ = planted(N=800, T=30)
    t = 0.05
    traj = cmdo.decompose(W, threshold=t, samples=300)
    from cmd_online.clustering import cluster
    from cmd_online.sampling import sample_indices

    sample = sample_indices([W.shape[0]], 300, 0)
    found = cluster(W[sample], threshold=t)
    labels = found.labels[found.varying]
    for m in range(found.num_modes):
        members = np.flatnonzero(labels == m)
        assert found.abs_corr[np.ix_(members, members)].min() >= 1 - t - 1e-12
    assert traj.num_modes == found.num_modes >= 4


def test_max_modes_bounds_a_threshold_cut_as_the_recorder_does():
    W, *_ = planted(N=800, T=30)
    W = W.float()
    free = cmdo.decompose(W, threshold=0.05, samples=300, warmup=8)
    bounded = cmdo.decompose(W, threshold=0.05, max_modes=2, samples=300, warmup=8)
    assert free.num_modes == 3 and bounded.num_modes == 2  # the cut gave more: coarsened to the bound
    weights = torch.nn.Parameter(W[:, 0].clone())
    rec = cmdo.CMDRecorder(torch.optim.SGD([weights], lr=0.1), threshold=0.05, max_modes=2, samples=300, warmup=8)
    for column in W.T:
        with torch.no_grad():
            weights.copy_(column)
        rec.record()
    online = rec.trajectory()
    assert torch.equal(online.reference_index, bounded.reference_index)
    assert (online.reconstruct(-1) - bounded.reconstruct(-1)).abs().max() < 1e-4 * W.abs().max()
    with pytest.raises(ValueError, match="max_modes"):
        cmdo.decompose(W, modes=3, max_modes=2, samples=300)


def test_warmup_argument_matches_the_online_window():
    W, *_ = planted(N=500, T=30)
    traj = cmdo.decompose(W, modes=4, samples=200, warmup=10)
    assert traj.window_start == 9
    oracle = cmdo.fit_affine(W, traj.reference_index, window_start=9)
    torch.testing.assert_close(traj.a, oracle.a, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(modes=0), "modes"),
    (dict(modes=2.5), "modes"),
    (dict(modes=20, samples=10), "samples"),
    (dict(samples=10_000), "samples"),
    (dict(samples=0), "samples"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=0.1, modes=3), "threshold"),
    (dict(layer_sizes=[10, 10]), "layer_sizes"),
    (dict(warmup=1), "warmup"),
    (dict(warmup=40), "warmup"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    W, *_ = planted(N=300, T=12)
    with pytest.raises((ValueError, TypeError), match=name):
        cmdo.decompose(W, **{"samples": 50, **kwargs})


@pytest.mark.parametrize("W, match", [
    (torch.zeros(10, 1), "T ≥ 2"),
    (torch.zeros(10), "2-D"),
    (torch.zeros(10, 3, 2), "2-D"),
    (torch.zeros(10, 5, dtype=torch.int64), "floating"),
    ([[1.0, 2.0]], "W must be"),
])
def test_bad_matrices_are_refused(W, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cmdo.decompose(W, modes=1, samples=1)


def test_nan_in_W_is_refused():
    W, *_ = planted(N=300, T=12)
    W[7, 3] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN"):
        cmdo.decompose(W, modes=2, samples=50)


def _checkpoint_trajectory(epochs=22, seed=0):
    model = small_cnn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    checkpoints = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(epochs):
        train_epoch(model, opt, g)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, checkpoints


@pytest.fixture(scope="module")
def digits_run():
    return _checkpoint_trajectory()


def test_real_trajectory_cmd_accuracy_within_two_points(digits_run, tmp_path):
    model, checkpoints = digits_run
    trained = accuracy(model)
    paths = []
    for t, sd in enumerate(checkpoints):  # half as files, half in memory: both kinds are accepted
        if t % 2:
            paths.append(tmp_path / f"epoch{t}.pt")
            torch.save(sd, paths[-1])
        else:
            paths.append(sd)
    traj = cmdo.decompose_checkpoints(paths, modes=10, samples=1000)
    sd = traj.state_dict(-1)
    assert list(sd) == list(model.state_dict())
    assert all(sd[k].shape == v.shape and sd[k].dtype == v.dtype for k, v in model.state_dict().items())
    model.load_state_dict(sd)
    assert trained > 90
    assert accuracy(model) >= trained - 2.0  # CMD may do better than the trained weights (it smooths)


def test_mismatched_checkpoints_are_refused(digits_run):
    _, checkpoints = digits_run
    bad = dict(checkpoints[1])
    bad["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]\['0.weight'\]"):
        cmdo.decompose_checkpoints([checkpoints[0], bad, checkpoints[2]], modes=2, samples=50)
    missing = {k: v for k, v in checkpoints[2].items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has different entries"):
        cmdo.decompose_checkpoints([checkpoints[0], missing], modes=2, samples=50)
    with pytest.raises(TypeError, match=r"checkpoints\[1\]"):
        cmdo.decompose_checkpoints([checkpoints[0], 42], modes=2, samples=50)
    with pytest.raises(ValueError, match="at least 2"):
        cmdo.decompose_checkpoints([checkpoints[0]], modes=2, samples=50)


def test_checkpoint_files_nesting_the_state_dict_are_read_as_the_cli_reads_them(digits_run, tmp_path):
    _, checkpoints = digits_run
    paths = []
    for t, sd in enumerate(checkpoints[:4]):  # training checkpoints: {"model": ...} and {"state_dict": ...}
        paths.append(tmp_path / f"epoch{t}.pt")
        torch.save({"model" if t % 2 else "state_dict": sd, "epoch": t}, paths[-1])
    nested = cmdo.decompose_checkpoints(paths, modes=2, samples=50)
    plain = cmdo.decompose_checkpoints(checkpoints[:4], modes=2, samples=50)
    assert torch.equal(nested.a, plain.a) and torch.equal(nested.references, plain.references)


def test_checkpoints_with_the_same_entries_in_another_order_are_accepted(digits_run):
    _, checkpoints = digits_run
    reordered = dict(reversed(list(checkpoints[1].items())))
    traj = cmdo.decompose_checkpoints([checkpoints[0], reordered, checkpoints[2]], modes=2, samples=50)
    plain = cmdo.decompose_checkpoints(checkpoints[:3], modes=2, samples=50)
    assert traj.layout.names == tuple(checkpoints[0]) and torch.equal(traj.b, plain.b)


def test_layout_balanced_sampling_uses_the_checkpoint_layers(digits_run):
    _, checkpoints = digits_run
    traj = cmdo.decompose_checkpoints(checkpoints[:5], modes=2, samples=200)
    assert traj.layout.names == tuple(checkpoints[0])
    assert traj.layout.sizes == [v.numel() for v in checkpoints[0].values()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    W, *_ = planted(N=2000, T=20)
    cpu = cmdo.decompose(W.float(), modes=4, samples=300)
    gpu = cmdo.decompose(W.float().cuda(), modes=4, samples=300)
    assert gpu.a.is_cuda
    assert (gpu.modes.cpu() == cpu.modes).float().mean() > 0.999
    torch.testing.assert_close(gpu.reconstruct(-1).cpu(), cpu.reconstruct(-1), rtol=1e-5, atol=1e-5)



def test_decompose_and_fit_affine_take_a_W_that_requires_grad():
    W = planted(N=200, T=12, M=2, constant=0)[0]
    W = W.float().requires_grad_(True)
    traj = cmdo.decompose(W, modes=2, samples=100)
    oracle = cmdo.decompose(W.detach(), modes=2, samples=100)
    assert torch.equal(traj.a, oracle.a) and not traj.a.requires_grad
    fit = cmdo.fit_affine(W, traj.reference_index)
    assert torch.equal(fit.modes, oracle.modes) and not fit.b.requires_grad


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layout=Layout.flat(41)), ValueError, r"^layout covers 41 weights but W has N = 40 rows"),
    (dict(layout={"names": ["w"], "shapes": [[40]], "dtypes": ["float32"]}), TypeError, r"^layout must be a Layout"),
    (dict(layer_sizes="40"), TypeError, r"^layer_sizes must be a list of ints.*got str"),
    (dict(layer_sizes=40), TypeError, r"^layer_sizes must be a list of ints.*got int"),
    (dict(layer_sizes=[20.5, 19.5]), TypeError, r"^layer_sizes\[0\] must be an int ≥ 0; got float"),
    (dict(layer_sizes=[50, -10]), ValueError, r"^layer_sizes\[1\] must be an int ≥ 0; got -10"),
    (dict(layer_sizes=[20, 19]), ValueError, r"^layer_sizes must sum to N = 40; got 39"),
])
def test_decompose_names_a_wrong_layout_or_layer_sizes(kwargs, error, match):
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).cumsum(1)
    with pytest.raises(error, match=match):
        cmdo.decompose(W, modes=2, samples=20, **kwargs)


def test_decompose_takes_layer_sizes_as_numpy_ints():
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).cumsum(1)
    traj = cmdo.decompose(W, modes=2, samples=20, layer_sizes=np.array([20, 20]))
    assert torch.equal(traj.modes, cmdo.decompose(W, modes=2, samples=20, layer_sizes=[20, 20]).modes)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reference_index=[0, 1], window_start=1.5), TypeError, r"^window_start must be an int; got float"),
    (dict(reference_index=[0, 1], window_start=7), ValueError, r"^window_start must be in \[0, T−2 = 6\]"),
    (dict(reference_index=[]), ValueError, r"^reference_index must be a non-empty vector.*got shape \(0,\)"),
    (dict(reference_index=None), TypeError, r"^reference_index must be a non-empty vector.*got NoneType"),
    (dict(reference_index="01"), TypeError, r"^reference_index must be a non-empty vector.*got str"),
    (dict(reference_index=[0.0, 1.0]), TypeError, r"^reference_index must be an integer tensor"),
    (dict(reference_index=[0, 40]), ValueError, r"^reference_index must be .* in \[0, 40\); got values from 0 to 40"),
])
def test_fit_affine_names_a_wrong_window_start_or_reference_index(kwargs, error, match):
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).cumsum(1)
    with pytest.raises(error, match=match):
        cmdo.fit_affine(W, **kwargs)


def test_fit_affine_takes_a_numpy_uint64_reference_index():
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).cumsum(1)
    fit = cmdo.fit_affine(W, np.array([3, 17], dtype=np.uint64))
    assert fit.reference_index.tolist() == [3, 17]
    assert torch.equal(fit.modes, cmdo.fit_affine(W, [3, 17]).modes)


def test_a_reference_set_aside_has_r2_0_like_every_weight_that_does_not_move():
    W = torch.full((36, 8), 0.25) + torch.arange(36.0)[:, None]  # nothing moves
    traj = cmdo.decompose(W, modes=3, samples=20)
    assert traj.set_aside.tolist() == [True] and traj.mode_sizes().tolist() == [36]
    assert traj.mode_r2.tolist() == [0.0]  # was 1/36: the reference pinned to R² = 1
    assert torch.equal(traj.reconstruct(3), W[:, 3])  # it still reproduces itself
