"""Hardening round 2: each defect a demanding user found, as the behaviour it must have now.

The numbers in the test names follow the defects of the hardening issue; each test failed before its fix.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import cmd_online as cmdo
from _digits import small_cnn, train_epoch
from cmd_online.checkpoint import read_meta
from cmd_online.files import pack
from cmd_online.clustering import cluster


def random_walk(model, records, rec=None, seed=0, scale=0.1, inference=()):
    """Move every parameter by a seeded random step before each record (records in ``inference`` run
    under torch.inference_mode, the others alternate between no_grad and plain)."""
    g = torch.Generator().manual_seed(seed)
    for t in range(records):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=scale)
        if rec is None:
            continue
        if t in inference:
            with torch.inference_mode():
                rec.record()
        elif t % 2:
            with torch.no_grad():
                rec.record()
        else:
            rec.record()
    return rec


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


# ------------------------------------------------------------------------------------------ 1
def test_1_a_model_that_does_not_own_the_optimizer_parameters_is_refused():
    trained, other = mlp(0), mlp(1)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model is not the optimizer's model"):
        cmdo.CMDRecorder(opt, other)
    subset = torch.optim.SGD(trained[0].parameters(), lr=0.1)  # a subset of the model's parameters is fine
    assert cmdo.CMDRecorder(subset, trained, modes=2, samples=10, warmup=3).layout.names == ("0.weight", "0.bias")


# ------------------------------------------------------------------------------------------ 2
def test_2_records_work_in_any_autograd_mode_in_any_order():
    # records that allocate under inference_mode: the end of the warm-up (2), the freeze (5), the growth
    # of the reference table past its 64 columns (64); the others alternate no_grad and plain
    def run(inference):
        model = mlp()
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=30,
                               warmup=3, freeze_modes_after=3)
        return random_walk(model, 70, rec, inference=inference)

    plain, mixed = run(()), run({2, 5, 64, 65, 66})
    assert mixed.num_records == 70 and mixed.moments.compact
    a, b = plain.trajectory(), mixed.trajectory()
    for name in ("references", "a", "b", "modes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_2_the_hook_records_under_inference_mode_without_breaking_later_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=3, record_every=1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step == 2:  # the warm-up ends inside inference_mode
            with torch.inference_mode():
                opt.step()
        else:
            opt.step()
    assert rec.num_records == 6 and torch.isfinite(torch.cat([p.reshape(-1) for p in rec.cmd_parameters()])).all()


# ------------------------------------------------------------------------------------------ 3
class WithExtraState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.calls = 7

    def forward(self, x):
        return self.linear(x)

    def get_extra_state(self):
        return {"calls": self.calls, "tag": "v1"}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def test_3_non_tensor_extra_state_passes_through_cmd_state_dict_and_export(tmp_path):
    model = torch.nn.Sequential(WithExtraState(), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=10, warmup=3)
    random_walk(model, 5, rec)
    sd = rec.cmd_state_dict()
    assert sd["0._extra_state"] == {"calls": 7, "tag": "v1"}
    rec.export(tmp_path / "cmd.pt")
    loaded = torch.load(tmp_path / "cmd.pt", weights_only=True)
    assert loaded["0._extra_state"] == {"calls": 7, "tag": "v1"}
    model.load_state_dict(loaded)  # strict
    assert torch.equal(model[0].linear.weight, rec.cmd_parameters()[0])


# ------------------------------------------------------------------------------------------ 4
def test_4_two_warmup_records_always_give_one_mode_online():
    modes = []
    for seed in range(10):
        model = mlp(seed)
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=10, samples=40,
                               warmup=2, seed=seed)
        random_walk(model, 2, rec, seed=seed)
        modes.append(rec.num_modes)
    assert modes == [1] * 10


def test_4_two_records_always_give_one_mode_post_hoc_and_in_the_cli(tmp_path):
    g = torch.Generator().manual_seed(0)
    for seed in range(10):
        W = torch.randn(300, 2, generator=g)
        assert cmdo.decompose(W, modes=10, samples=200, seed=seed).num_modes == 1
    paths = []
    for t in range(2):
        paths.append(tmp_path / f"epoch{t}.pt")
        torch.save({"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}, paths[-1])
    out = tmp_path / "traj.pt"
    subprocess.run([sys.executable, "-m", "cmd_online.cli", "decompose", *map(str, paths), "-o", str(out),
                    "--modes", "10", "--samples", "500"], check=True, capture_output=True)
    assert cmdo.CMDTrajectory.load(out).num_modes == 1


def test_4_exact_affine_copies_are_never_split_by_round_off():
    g = torch.Generator().manual_seed(3)
    signals = torch.randn(3, 12, generator=g, dtype=torch.float64).cumsum(1)
    group = torch.arange(90) % 3
    a, b = torch.randn(90, generator=g, dtype=torch.float64) + 2, torch.randn(90, generator=g, dtype=torch.float64)
    history = (a[:, None] * signals[group] + b[:, None]).float()  # |corr| = 1 within a group, up to round-off
    for distance in ("correlation", "euclidean"):
        found = cluster(history, modes=10, distance=distance)
        assert found.num_modes == 3, distance
        assert all(len(set(found.labels[group.numpy() == k])) == 1 for k in range(3))


# ------------------------------------------------------------------------------------------ 6
def damaged(kind: str, state: dict) -> dict:
    """``state`` (version 3: a packed meta, per-parameter statistics) with one field damaged."""
    meta = read_meta(state)
    stats = {key: dict(value) for key, value in state["stats"].items()}
    stats["comoment"] = {mode: dict(tensors) for mode, tensors in stats["comoment"].items()}
    first = next(iter(stats["mean"]))
    if kind == "comoment_size":
        stats["comoment"]["mode_1"][first] = stats["comoment"]["mode_1"][first][:-1]
    elif kind == "mean_size":
        stats["mean"][first] = torch.zeros(3)
    elif kind == "missing_row_of_p":
        del stats["comoment"]["mode_2"]
    elif kind == "history_none":
        meta["history"] = None
    elif kind == "references_rows":
        meta["references"] = meta["references"][:-1]
    elif kind == "reference_index_range":
        meta["reference_index"] = meta["reference_index"].clone().fill_(10 ** 6)
    elif kind == "reference_index_negative":
        meta["reference_index"] = -meta["reference_index"] - 1
    elif kind == "reference_index_float":
        meta["reference_index"] = meta["reference_index"].double()
    elif kind == "ref_sumsq_length":
        meta["ref_sumsq"] = torch.zeros(7)
    elif kind == "count":
        meta["count"] = 2
    elif kind == "num_records_type":
        meta["num_records"] = "seven"
    elif kind == "nan_statistics":
        stats["sumsq"][first] = stats["sumsq"][first].clone().fill_(float("nan"))
    elif kind == "negative_sumsq":
        stats["sumsq"][first] = -stats["sumsq"][first] - 1
    elif kind == "compact_in_the_full_form":
        meta["compact"] = True
    elif kind == "rows_of_another_rank":
        stats["rows"][first] = stats["rows"][first] + 1
    elif kind == "meta_not_bytes":
        return {**state, "meta": meta}
    return {"meta": pack(meta), "stats": stats}


@pytest.mark.parametrize("kind", ["comoment_size", "mean_size", "missing_row_of_p", "history_none",
                                  "references_rows", "reference_index_range", "reference_index_negative",
                                  "reference_index_float", "ref_sumsq_length", "count", "num_records_type",
                                  "nan_statistics", "negative_sumsq", "compact_in_the_full_form",
                                  "rows_of_another_rank", "meta_not_bytes"])
def test_6_a_damaged_state_is_refused_before_anything_changes(kind):
    def recorder(records):
        model = mlp()
        # the full form: its rows of P are what several kinds damage
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=30, warmup=3,
                               freeze_modes_after=None)
        return random_walk(model, records, rec), model

    source, _ = recorder(7)
    state = damaged(kind, source.state_dict())
    target, model = recorder(5)
    before = io.BytesIO()
    torch.save(target.state_dict(), before)
    with pytest.raises(ValueError, match="state"):
        target.load_state_dict(state)
    after = io.BytesIO()
    torch.save(target.state_dict(), after)
    assert before.getvalue() == after.getvalue()
    assert target.num_records == 5
    random_walk(model, 1, target)  # and it keeps recording
    assert target.num_records == 6


# ------------------------------------------------------------------------------------------ 7
def test_7_records_from_two_threads_are_serialised():
    def run(threads: int):
        model = mlp()
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=30, warmup=4)
        g = torch.Generator().manual_seed(0)
        barrier = threading.Barrier(threads)
        errors = []

        def worker():
            try:
                barrier.wait()
                rec.record()
            except Exception as e:  # noqa: BLE001 - any failure is the test's failure
                errors.append(e)

        for _ in range(12):  # every weight state is recorded twice: by two threads at once, or one after the other
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
            if threads == 2:
                pool = [threading.Thread(target=worker) for _ in range(2)]
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
            else:
                rec.record()
                rec.record()
        assert not errors
        return rec

    serial, concurrent = run(1), run(2)
    assert concurrent.num_records == serial.num_records == 24 and concurrent.phase == "tracking"
    a, b = serial.trajectory(), concurrent.trajectory()
    for name in ("references", "a", "b", "modes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------------------ 9
def test_9_clustering_is_none_after_loading_a_state():
    model = mlp()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=30, warmup=3)
    random_walk(model, 5, rec, seed=1)
    other = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=30, warmup=3)
    random_walk(model, 5, other, seed=2)
    assert other.clustering is not None
    other.load_state_dict(rec.state_dict())
    assert other.clustering is None and torch.equal(other.reference_index, rec.reference_index)


# ------------------------------------------------------------------------------------------ 10
def test_10_a_float64_weight_that_never_moves_comes_back_bit_exact():
    model = mlp(dtype=torch.float64)
    frozen = torch.nn.Parameter(torch.tensor([0.1, 1 / 3, 1e-300, 123456.7891234567], dtype=torch.float64))
    model.register_parameter("constant", frozen)  # in the optimizer, never moves
    params = list(model.parameters())
    rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.1), model, modes=2, samples=20, warmup=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                if p is not frozen:
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64), alpha=0.1)
        rec.record()
    cmd = rec.cmd_parameters()[rec.layout.names.index("constant")]
    assert cmd.dtype == torch.float64 and torch.equal(cmd, frozen.detach())
    assert torch.equal(rec.trajectory().state_dict()["constant"], frozen.detach())


def test_10_a_finite_float64_weight_of_1e300_is_recorded_not_skipped():
    model = mlp(dtype=torch.float64)
    with torch.no_grad():
        model[0].bias[0] = 1e300
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=20, warmup=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random_walk(model, 5, rec)
    assert rec.num_records == 5 and rec.skipped_records == 0
    assert rec.cmd_parameters()[1][0].item() == 1e300


def test_10_outputs_follow_the_parameters_current_dtype():
    model = mlp()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=20, warmup=3)
    random_walk(model, 4, rec)
    model.to(torch.float64)  # the same Parameter objects, float64 data
    random_walk(model, 2, rec, seed=1)
    assert all(c.dtype == torch.float64 for c in rec.cmd_parameters())
    assert all(v.dtype == torch.float64 for v in rec.cmd_state_dict().values())


# ------------------------------------------------------------------------------------------ 14
def test_14_a_sparse_parameter_is_refused_at_construction():
    sparse = torch.nn.Parameter(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="sparse_coo.*dense"):
        cmdo.CMDRecorder(torch.optim.SGD([sparse], lr=0.1), modes=1, samples=2, warmup=3)


def test_14_statistics_that_overflow_float32_are_warned_about():
    # float32 weights near 3e38 cannot move by a representable step without their squares overflowing
    ref = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    rec = cmdo.CMDRecorder(torch.optim.SGD([ref], lr=0.1), modes=1, samples=2, warmup=3)
    for r in (1.0, 2.0, 3.0, 3.3, 3.1):
        with torch.no_grad():
            ref.copy_(torch.tensor([r * 1e38, r]))
        rec.record()
    with pytest.warns(RuntimeWarning, match=r"statistics of param_groups.0.params.0 overflowed"):
        rec.cmd_parameters()
    with pytest.warns(RuntimeWarning, match="overflowed"):
        rec.trajectory()


# ------------------------------------------------------------------------------------------ distance
def test_the_euclidean_distance_reproduces_the_authors_clustering():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = cmdo.CMDRecorder(opt, model, modes=6, samples=300, warmup=6, distance="euclidean")
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_epoch(model, opt, g)
        rec.record()
    found = rec.clustering
    varying = found.varying
    H = found.abs_corr  # |corr| among the varying samples, as the authors compute it (NaN → 0)
    authors = fcluster(linkage(pdist(H), method="complete"), 6, criterion="maxclust")  # rbetser/CMD cluster_corr
    ours = found.labels[varying]
    pairs = np.triu_indices(len(varying), 1)
    assert np.array_equal(ours[pairs[0]] == ours[pairs[1]], authors[pairs[0]] == authors[pairs[1]])
    assert rec.num_modes == len(np.unique(authors))


# ------------------------------------------------------------------------------------------ fidelity
def dead_reference_trajectory(T=20, F=6, seed=0):
    """300 float32 weights over T records: 150 follow one signal all along; 150 follow another (with a
    little noise) during the warm-up, then keep only a small noise of their own — except their mode's
    reference, which stops and jitters by one float32 step of its value (a unit that died).

    Returns the trajectory and the dead reference's index (the references are chosen from the warm-up,
    so the window is planted once they are known)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float64)
    live = torch.randn(T, generator=g, dtype=torch.float64).cumsum(0)
    a = torch.randn(300, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64)
    W = a[:, None] * live + b[:, None]
    W[150:] = a[150:, None] * torch.sin(t) + b[150:, None] + 1e-2 * torch.randn(150, T, generator=g, dtype=torch.float64)
    W = W.float()
    reference = torch.from_numpy(cluster(W[:, :F], modes=2).reference)
    dead = int(reference[reference >= 150][0])
    W[150:, F:] = W[150:, F - 1:F] + 1e-3 * torch.randn(150, T - F, generator=g)  # the dying mode stops moving ...
    steps = torch.randint(-1, 2, (T - F,), generator=g)
    value = W[dead, F - 1]
    W[dead, F:] = torch.where(steps > 0, torch.nextafter(value, torch.tensor(float("inf"))),  # ... its reference
                              torch.where(steps < 0, torch.nextafter(value, torch.tensor(-float("inf"))), value))
    return W, dead


def test_a_dead_reference_is_set_aside_at_its_own_dtypes_resolution_in_a_model_with_a_float64_parameter():
    """A float64 parameter makes the statistics float64; the float32 reference that jitters by one float32
    step must still be set aside (at float64 resolution it moves: slopes of 1e5 followed)."""
    F = 6
    W, dead_index = dead_reference_trajectory(F=F)
    p32, p64 = torch.nn.Parameter(W[:, 0].clone()), torch.nn.Parameter(W[:2, 0].double())  # two live copies
    rec = cmdo.CMDRecorder(torch.optim.SGD([p32, p64], lr=0.1), modes=2, samples=302, warmup=F)
    for column in W.T:
        with torch.no_grad():
            p32.copy_(column)
            p64.copy_(column[:2].double())
        rec.record()
    traj = rec.trajectory()
    dead = traj.reference_index.tolist().index(dead_index)
    assert traj.set_aside.tolist() == [m == dead for m in range(2)]
    others = torch.ones(302, dtype=torch.bool)
    others[traj.reference_index] = False
    dying = torch.tensor([i for i in range(150, 300) if i != dead_index])
    assert (traj.modes[others] != dead).all() and traj.a[dying].abs().max() < 1  # small slopes, as in float32


def test_the_same_parameter_twice_in_the_optimizer_is_refused_naming_both():
    model = torch.nn.Linear(4, 3)
    with pytest.warns(UserWarning):  # torch itself only warns about a duplicate inside one group
        opt = torch.optim.SGD([model.weight, model.bias, model.weight], lr=0.1)
    for kwargs in ({}, {"model": model}):
        with pytest.raises(ValueError, match="optimizer parameter 2 is the same tensor as parameter 0"):
            cmdo.CMDRecorder(opt, modes=2, samples=8, warmup=3, **kwargs)


def recorded_dead_reference(F: int):
    """The planted dead-reference trajectory recorded online: it, the dead index, the recorder and its parameter."""
    W, dead_index = dead_reference_trajectory(F=F)
    weights = torch.nn.Parameter(W[:, 0].clone())
    rec = cmdo.CMDRecorder(torch.optim.SGD([weights], lr=0.1), modes=2, samples=300, warmup=F)
    for column in W.T:
        with torch.no_grad():
            weights.copy_(column)
        rec.record()
    return W, dead_index, rec, weights


def test_a_set_aside_reference_has_r2_0_online_as_post_hoc():
    F = 6
    W, dead_index, rec, _ = recorded_dead_reference(F)
    online, post = rec.trajectory(), cmdo.decompose(W, modes=2, samples=300, warmup=F)
    assert rec.r2()[0][dead_index] == 0.0  # it moved only by rounding: R² 0, as a weight that does not move
    dead = online.reference_index.tolist().index(dead_index)
    assert online.mode_r2[dead] == post.mode_r2[dead] == 0.0
    assert torch.allclose(online.mode_r2.double(), post.mode_r2.double(), rtol=1e-5)


def test_a_reference_that_stops_moving_is_set_aside_online_and_post_hoc():
    F = 6
    W, dead_index, rec, _ = recorded_dead_reference(F)
    online = rec.trajectory()
    post = cmdo.decompose(W, modes=2, samples=300, warmup=F)
    assert torch.equal(online.reference_index, post.reference_index)
    for traj in (online, post):
        dead = traj.reference_index.tolist().index(dead_index)
        assert traj.set_aside.tolist() == [m == dead for m in range(2)]
        others = torch.ones(300, dtype=torch.bool)
        others[traj.reference_index] = False
        assert (traj.modes[others] != dead).all()  # its weights went to the mode that still moves ...
        assert traj.a[others][150:].abs().max() < 1  # ... with small slopes (3e5 without the rule)
    oracle = cmdo.fit_affine(W.double(), online.reference_index, window_start=F - 1)
    assert oracle.set_aside.tolist() == [False, False]  # in float64 the stopped reference still moves
    exact = cmdo.fit_affine(W, online.reference_index, window_start=F - 1)  # float32 values: the same rule
    assert torch.equal(exact.set_aside, online.set_aside) and torch.equal(exact.modes, online.modes)
    for at in range(F - 1, 20):
        scale = W[:, F - 1:].abs().amax(1).double() + 1
        assert ((online.reconstruct(at).double() - exact.reconstruct(at).double()).abs() <= 1e-5 * scale).all()


def test_the_set_aside_references_are_saved_and_inspect_reports_them(tmp_path):
    F = 6
    W, dead_index = dead_reference_trajectory(F=F)
    traj = cmdo.decompose(W, modes=2, samples=300, warmup=F)
    traj.save(tmp_path / "t.pt")
    loaded = cmdo.CMDTrajectory.load(tmp_path / "t.pt")
    assert torch.equal(loaded.set_aside, traj.set_aside) and loaded.set_aside.sum() == 1
    out = subprocess.run([sys.executable, "-m", "cmd_online.cli", "inspect", str(tmp_path / "t.pt")],
                         capture_output=True, text=True, check=True).stdout
    dead = traj.reference_index.tolist().index(dead_index)
    assert f"set aside    1 of 2 references (mode {dead}: the reference moved only by rounding" in out


def test_record_every_does_not_count_steps_a_grad_scaler_skipped_in_a_fused_optimizer():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=20, warmup=3, record_every=2)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for blow_up in (1.0, 1.0, math.inf, 1.0, 1.0):  # the third step's gradients are infinite: it is skipped
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y) * blow_up).backward()
        scaler.step(optimizer)  # a fused optimizer's step() runs with found_inf set, and changes nothing
        scaler.update()
    assert read_meta(rec.state_dict())["steps"] == 4 and rec.num_records == 2


@pytest.mark.parametrize("offload", [False, True])
def test_freeze_modes_after_1_freezes_at_the_windows_first_record_and_its_state_loads(offload):
    # found by tests/test_properties.py: the freeze waited for a second record of the window, so a state
    # saved in between said "full form" after 1 record, which the state check (rightly) refused
    def build(model):
        with pytest.warns(UserWarning, match="freeze_modes_after=1"):
            return cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=20,
                                    warmup=3, freeze_modes_after=1, offload=offload)

    model, twin = mlp(), mlp(seed=1)
    rec = random_walk(model, 3, build(model))
    assert rec.moments.compact and rec.moments.count == 1
    twin.load_state_dict(model.state_dict())
    fresh = build(twin)
    fresh.load_state_dict(rec.state_dict())
    assert fresh.moments.compact
    random_walk(model, 2, rec, seed=1)
    random_walk(twin, 2, fresh, seed=1)
    for a, b in zip(rec.cmd_parameters(), fresh.cmd_parameters()):
        assert torch.equal(a, b)
    rec.close()
    fresh.close()


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value", [np.True_, np.False_, np.bool_(True)])
def test_numpy_bools_are_taken_where_a_bool_is(value):
    from cmd_online.config import check_bool

    assert check_bool("check_finite", value) is bool(value)  # NumPy 2 names the type "bool": it was refused
    model = torch.nn.Linear(3, 2)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=1, samples=4, warmup=3,
                           check_finite=value)
    assert rec.check_finite is bool(value)
    with pytest.raises(TypeError, match="^check_finite must be True or False; got int"):
        check_bool("check_finite", 1)


def test_config_replace_switches_between_modes_and_threshold():
    config = cmdo.CMDConfig()  # modes defaults to 10
    switched = config.replace(threshold=0.2)
    assert (switched.modes, switched.threshold) == (None, 0.2)
    bounded = config.replace(threshold=0.2, max_modes=5)
    assert (bounded.modes, bounded.threshold, bounded.max_modes) == (None, 0.2, 5)
    back = bounded.replace(modes=4)
    assert (back.modes, back.threshold, back.max_modes) == (4, None, None)
    assert config.replace(seed=3).modes == 10
    with pytest.raises(ValueError, match="give either modes or threshold, not both"):
        config.replace(modes=3, threshold=0.2)
