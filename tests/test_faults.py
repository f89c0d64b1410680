"""Training faults: the recorder never crashes the job, never poisons its statistics, never half-loads."""

import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import cmd_online as cmdo
from _states import assert_same, edit_meta, leaves
from _digits import digits

WARMUP = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: extra intra-op threads only contend for the 2 shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0, hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 10))


def train_step(model, optimizer, step: int, batch: int = 32):
    x, y, _, _ = digits()
    start = (step * batch) % (len(y) - batch)
    optimizer.zero_grad()
    F.cross_entropy(model(x[start:start + batch]), y[start:start + batch]).backward()
    optimizer.step()


tensors_of = leaves
assert_same_state = assert_same


# ---------------------------------------------------------------------------------- NaN / Inf weights
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("phase", ["warmup", "tracking"])
def test_non_finite_record_is_skipped_with_a_warning_and_stats_intact(bad, phase):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=40, warmup=WARMUP)
    for step in range(1 if phase == "warmup" else WARMUP + 2):
        train_step(model, opt, step)
        assert rec.record()
    before = tensors_of(rec.state_dict())
    records = rec.num_records
    saved = model[3].bias.detach().clone()
    with torch.no_grad():
        model[3].bias[4] = bad
    with pytest.warns(RuntimeWarning, match=r"record \d+ skipped: non-finite.*3\.bias"):
        assert rec.record() is False
    assert rec.num_records == records and rec.skipped_records == 1
    after = tensors_of(rec.state_dict())
    assert after.pop("meta.skipped_records") == 1 and before.pop("meta.skipped_records") == 0
    assert_same_state(before, after)
    # the fault goes away: later records are taken and the statistics stay finite
    with torch.no_grad():
        model[3].bias.copy_(saved)
    for step in range(10, 10 + WARMUP + 2):
        train_step(model, opt, step)
        assert rec.record()
    assert rec.num_records == records + WARMUP + 2
    assert all(torch.isfinite(p).all() for p in rec.cmd_parameters())
    assert torch.isfinite(rec.trajectory().references).all()


def test_non_finite_weights_in_a_hooked_record_do_not_stop_training():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=40, warmup=WARMUP, record_every=1)
    for step in range(WARMUP + 1):
        train_step(model, opt, step)
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # no gradients: the step leaves the NaN; the hook must warn, not raise
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "1.weight" in messages[0]
    assert rec.num_records == WARMUP + 1 and rec.skipped_records == 1


def test_huge_but_finite_weights_are_recorded_not_skipped():
    # |w| = 1e20: the squared L2 norm overflows float32, yet every value is finite
    p = torch.nn.Parameter(torch.full((6,), 1e20))
    opt = torch.optim.SGD([p], lr=1.0)
    rec = cmdo.CMDRecorder(opt, modes=1, samples=2, warmup=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(4):
            with torch.no_grad():
                p.add_(1e13 * t)
            assert rec.record()
    assert rec.num_records == 4 and rec.skipped_records == 0


# ---------------------------------------------------------------------------------- missing gradients
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_parameter_without_gradient_for_the_whole_run_reconstructs_exactly(optimizer):
    model = mlp()
    unused = torch.nn.Parameter(torch.randn(5, 3))  # in the optimizer, never in the loss: grad stays None
    params = list(model.parameters()) + [unused]
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd_momentum"
           else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2))
    rec = cmdo.CMDRecorder(opt, modes=3, samples=60, warmup=WARMUP, record_every=5)
    start = unused.detach().clone()
    for step in range(5 * (WARMUP + 20)):
        train_step(model, opt, step)
    assert unused.grad is None and torch.equal(unused, start)
    assert rec.num_records == WARMUP + 20
    traj = rec.trajectory()
    for at in (0, WARMUP - 1, -1):
        assert torch.equal(rec.cmd_parameters(at)[-1], start)
        assert torch.equal(traj.state_dict(at)[traj.layout.names[-1]], start)
    assert torch.equal(rec.r2()[-1], torch.zeros(15))  # no motion: nothing to explain, R² = 0


def test_parameter_whose_gradient_stops_before_the_window_reconstructs_exactly_over_it():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=40, warmup=WARMUP, record_every=1)
    moving_until = None
    for step in range(WARMUP + 30):
        if step == WARMUP - 1:  # frozen before the record that opens the fit window: grad None from here on
            model[3].bias.requires_grad_(False)
            model[3].bias.grad = None
            moving_until = model[3].bias.detach().clone()
        train_step(model, opt, step)
    assert rec.num_records == WARMUP + 30
    bias = model[3].bias.detach()
    assert torch.equal(bias, moving_until)
    for at in range(rec.window_start, rec.num_records):
        assert torch.equal(rec.cmd_parameters(at)[3], bias)
    assert not torch.equal(rec.trajectory().references[:, 0], rec.trajectory().references[:, -1])


# ---------------------------------------------------------------------------------- GradScaler skips
def test_step_skipped_by_grad_scaler_takes_no_record():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=40, warmup=WARMUP, record_every=1)
    x, y, _, _ = digits()
    skipped = 0
    for step in range(WARMUP + 10):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x[:32]), y[:32])).backward()
        if step % 3 == 1:  # an overflow: GradScaler finds inf gradients and skips optimizer.step()
            model[1].weight.grad[0, 0] = math.inf
            skipped += 1
        before = [p.detach().clone() for p in model.parameters()]
        records = rec.num_records
        scaler.step(opt)
        scaler.update()
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert rec.num_records == records + (0 if unchanged else 1)
    assert skipped == 4 and rec.num_records == WARMUP + 10 - skipped and rec.skipped_records == 0
    assert scaler.get_scale() < 2.0 ** 8  # the scaler did back off: the skip really happened
    assert all(torch.isfinite(p).all() for p in rec.cmd_parameters())


# ---------------------------------------------------------------------------------- load_state_dict mismatch
def trained_recorder(records: int = WARMUP + 4, **config):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = dict(modes=2, samples=40, warmup=WARMUP) | config
    rec = cmdo.CMDRecorder(opt, model, **kwargs)
    for step in range(records):
        train_step(model, opt, step)
        rec.record()
    return rec, model


@pytest.mark.parametrize("change, match", [
    (dict(modes=3), "modes=2.*modes=3"),
    (dict(samples=30), "samples=40.*samples=30"),
    (dict(warmup=WARMUP + 1), f"warmup={WARMUP}.*warmup={WARMUP + 1}"),
    (dict(seed=1), "seed=0.*seed=1"),
    (dict(freeze_modes_after=2), "freeze_modes_after=3.*freeze_modes_after=2"),
    (dict(freeze_modes_after=None), "freeze_modes_after=3.*freeze_modes_after=None"),
    (dict(modes=None, threshold=0.5), "modes=2.*modes=None"),
])
def test_load_state_dict_of_another_configuration_is_refused_and_changes_nothing(change, match):
    source, _ = trained_recorder()
    state = source.state_dict()
    target, _ = trained_recorder(records=WARMUP + 1, **change)
    before = tensors_of(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert_same_state(before, tensors_of(target.state_dict()))


@pytest.mark.parametrize("hidden", [7, 9])
def test_load_state_dict_for_a_model_of_other_shape_is_refused_and_changes_nothing(hidden):
    source, _ = trained_recorder()
    model = mlp(hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = cmdo.CMDRecorder(opt, model, modes=2, samples=40, warmup=WARMUP)
    for step in range(WARMUP + 2):
        train_step(model, opt, step)
        target.record()
    before = tensors_of(target.state_dict())
    with pytest.raises(ValueError, match="other shapes"):
        target.load_state_dict(source.state_dict())
    assert_same_state(before, tensors_of(target.state_dict()))
    assert target.num_records == WARMUP + 2 and torch.isfinite(target.cmd_parameters()[0]).all()


def _shorter_sumsq(state):
    name = next(iter(state["stats"]["sumsq"]))
    state["stats"] = {**state["stats"], "sumsq": {**state["stats"]["sumsq"], name: state["stats"]["sumsq"][name][:-1]}}
    return state


@pytest.mark.parametrize("damage, match", [
    (lambda s: edit_meta(s, lambda m: m.update(format="something else")), "not a CMDRecorder state_dict"),
    (lambda s: edit_meta(s, lambda m: m.update(version=99)), "version 99"),
    (_shorter_sumsq, "statistics"),
    (lambda s: edit_meta(s, lambda m: m.update(sample_index=m["sample_index"].flip(0))), "sampled weights"),
])
def test_load_state_dict_of_a_damaged_state_is_refused_and_changes_nothing(damage, match):
    source, _ = trained_recorder()
    state = damage(source.state_dict())
    target, _ = trained_recorder(records=WARMUP + 1)
    before = tensors_of(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert_same_state(before, tensors_of(target.state_dict()))


def test_load_state_dict_missing_an_entry_raises_value_error_and_changes_nothing():
    source, _ = trained_recorder()
    state = edit_meta(source.state_dict(), lambda meta: meta.pop("config"))
    target, _ = trained_recorder(records=WARMUP + 1)
    before = tensors_of(target.state_dict())
    with pytest.raises(ValueError, match="missing config"):
        target.load_state_dict(state)
    assert_same_state(before, tensors_of(target.state_dict()))


def test_load_state_dict_of_a_non_dict_is_refused():
    rec, _ = trained_recorder(records=1)
    for bad in (None, [1, 2], torch.zeros(3)):
        with pytest.raises(ValueError, match="not a CMDRecorder state_dict"):
            rec.load_state_dict(bad)


# ---------------------------------------------------------------------------------- deleted model
def test_deleted_model_gives_a_clear_error_and_leaves_files_alone(tmp_path):
    rec, model = trained_recorder()
    parameters = list(model.parameters())  # held here, as an optimizer in a training loop would hold them
    target = tmp_path / "cmd.pt"
    target.write_bytes(b"previous")
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="model given to CMDRecorder has been deleted"):
        rec.cmd_state_dict()
    with pytest.raises(RuntimeError, match="has been deleted"):
        rec.export(target)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["cmd.pt"]
    # what needs no model keeps working while the parameters live
    assert rec.trajectory().num_records == WARMUP + 4
    assert len(rec.cmd_parameters()) == 4
    with rec.swapped():
        pass
    del parameters


def test_model_needed_but_never_given_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, modes=2, samples=40, warmup=WARMUP)
    with pytest.raises(ValueError, match="needs the model"):
        rec.cmd_state_dict()
