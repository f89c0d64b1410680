"""CMDRecorder: online CMD equals the float64 post-hoc oracle, resumes bit-identically, holds what it says."""

import io
import warnings

import pytest
import torch

import cmd_online as cmdo
from _devices import DEVICES
from _digits import accuracy, flat, small_cnn, train_epoch
from cmd_online.stats import BLOCK, compact_block
from _states import edit_meta


def _optimizer(name, params):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=3e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    raise ValueError(name)


def _run(opt_name="sgd_momentum", epochs=12, device="cpu", **rec_kwargs):
    """Train on digits with augmentation, one record per epoch; a test-only list keeps the full history."""
    model = small_cnn(0).to(device)
    opt = _optimizer(opt_name, model.parameters())
    kwargs = dict(modes=5, samples=500, warmup=5) | rec_kwargs
    rec = cmdo.CMDRecorder(opt, model, **kwargs)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(epochs):
        train_epoch(model, opt, g, device=device)
        rec.record()
        history.append(flat(model).cpu())
    return model, opt, rec, torch.stack(history, dim=1)


def _assert_matches_oracle(rec, W, rtol=1e-5):
    traj = rec.trajectory().to("cpu")
    oracle = cmdo.fit_affine(W, traj.reference_index.cpu(), window_start=traj.window_start)
    # Modes must agree wherever the choice is clear; a weight whose two best |ρ| are within float32
    # round-off may pick either, and its reconstruction is then equally good.
    P = W[:, traj.window_start:] - W[:, traj.window_start:].mean(1, keepdim=True)
    R = P[traj.reference_index.cpu()]
    rho = (P @ R.T).abs() / (P.norm(dim=1, keepdim=True) * R.norm(dim=1)).clamp_min(1e-300)
    top2 = rho.topk(2, dim=1).values if rho.shape[1] > 1 else torch.cat([rho, torch.zeros_like(rho)], 1)
    clear = ((top2[:, 0] - top2[:, 1]) > 1e-4) | (top2[:, 0] == 0)  # all-zero ρ: a constant weight, mode 0
    assert clear.float().mean() > 0.95
    assert torch.equal(traj.modes.cpu()[clear].long(), oracle.modes[clear].long())
    same = traj.modes.cpu().long() == oracle.modes.long()
    scale_a = oracle.a.abs().max()
    torch.testing.assert_close(traj.a.cpu().double()[same], oracle.a[same], rtol=rtol, atol=rtol * scale_a)
    scale_b = oracle.b.abs().max()
    torch.testing.assert_close(traj.b.cpu().double()[same], oracle.b[same], rtol=rtol, atol=rtol * scale_b)
    for at in (0, traj.window_start, -1):
        online = torch.cat([p.reshape(-1) for p in rec.cmd_parameters(at)]).cpu().double()
        # ŵ = a·r + b: float32 a and b carry round-off relative to |a·r| and |b|, which can cancel
        magnitude = (oracle.a * oracle.references[oracle.modes, at]).abs() + oracle.b.abs()
        error = (online - oracle.reconstruct(at)).abs()
        assert (error[same] <= rtol * magnitude[same] + 1e-7).all(), error.max()
    # where a near-tie picked another mode, the online fit is as good as the oracle's over the window
    window = W[~same, traj.window_start:]
    online_fit = torch.stack([traj.reconstruct(s)[~same].double() for s in range(traj.window_start, W.shape[1])], 1)
    oracle_fit = torch.stack([oracle.reconstruct(s)[~same] for s in range(traj.window_start, W.shape[1])], 1)
    assert ((online_fit - window).norm(dim=1) <= (oracle_fit - window).norm(dim=1) * 1.01 + 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_online_equals_posthoc_oracle(opt_name, device):
    _, _, rec, W = _run(opt_name, device=device, freeze_modes_after=None)  # the full form
    assert rec.moments.mean.device.type == device
    _assert_matches_oracle(rec, W)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_other_optimizers_equal_posthoc_oracle(opt_name):
    _, _, rec, W = _run(opt_name, epochs=10, freeze_modes_after=None)
    _assert_matches_oracle(rec, W)


def test_online_references_equal_posthoc_decompose_with_same_warmup():
    _, _, rec, W = _run(epochs=8)
    post = cmdo.decompose(W, modes=5, samples=500, warmup=5, layer_sizes=rec.layout.sizes)
    assert torch.equal(post.reference_index, rec.reference_index)
    assert torch.equal(post.references.float(), rec.trajectory().references)


def test_compact_form_equals_oracle_with_frozen_modes():
    _, _, rec, W = _run(epochs=12, freeze_modes_after=3)
    traj = rec.trajectory()
    # the oracle: the same modes, fixed, and least squares over the whole window
    oracle = cmdo.fit_affine(W, traj.reference_index, window_start=traj.window_start)
    Wc = W[:, traj.window_start:]
    R = Wc[traj.reference_index][traj.modes.long()]
    Rc = R - R.mean(1, keepdim=True)
    a = ((Wc - Wc.mean(1, keepdim=True)) * Rc).sum(1) / (Rc * Rc).sum(1)
    torch.testing.assert_close(traj.a.double(), a, rtol=1e-5, atol=1e-5 * a.abs().max())
    # the frozen modes are the oracle's modes over the first 3 records of the window
    early = cmdo.fit_affine(W[:, :traj.window_start + 3], traj.reference_index, window_start=traj.window_start)
    assert (traj.modes.long() == early.modes).float().mean() > 0.99
    assert (traj.modes.long() != oracle.modes).any()  # and they are not re-chosen later


@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_small_motion_keeps_float32_precision(device):
    """Weights of mean 1e3 moving by 1e-3: raw float32 sums of squares would lose every digit. The full form
    keeps its shift for this (the compact form's cost: tests/test_lean.py)."""
    g = torch.Generator().manual_seed(0)
    N, T = 2000, 40
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    profile = torch.stack([torch.sin(3 * t), torch.cos(5 * t)])
    modes = torch.randint(0, 2, (N,), generator=g)
    a = torch.randn(N, generator=g, dtype=torch.float64)
    W = (1e3 + 1e-3 * (a[:, None] * profile[modes] + 0.05 * torch.randn(N, T, generator=g, dtype=torch.float64)))
    W = W.float()  # what the parameters actually hold
    p = torch.nn.Parameter(W[:, 0].clone().to(device))
    rec = cmdo.CMDRecorder(torch.optim.SGD([p], lr=0.0), modes=2, samples=200, warmup=4, freeze_modes_after=None)
    for s in range(T):
        with torch.no_grad():
            p.copy_(W[:, s])
        rec.record()
    traj = rec.trajectory()
    oracle = cmdo.fit_affine(W.double(), traj.reference_index.cpu(), window_start=traj.window_start)
    assert torch.equal(traj.modes.cpu().long(), oracle.modes)
    torch.testing.assert_close(traj.a.cpu().double(), oracle.a, rtol=1e-4, atol=1e-4 * oracle.a.abs().max())
    # b = mean − a·ν is a difference of numbers near 1e3: its precision is relative to those terms
    terms = oracle.a.abs() * oracle.references.mean(1)[oracle.modes].abs() + oracle.b.abs()
    eps = torch.finfo(torch.float32).eps
    assert ((traj.b.cpu().double() - oracle.b).abs() <= 1e-4 * oracle.b.abs() + 4 * eps * terms).all()
    # and the CMD weights agree to the float32 round-off of a·r + b (a few ulps of |b| ≈ 1e3)
    for at in (0, -1):
        magnitude = (oracle.a * oracle.references[oracle.modes, at]).abs() + oracle.b.abs()
        assert ((traj.reconstruct(at).cpu().double() - oracle.reconstruct(at)).abs() <= 2 * eps * magnitude).all()


def _deterministic_run(records, state=None, stop_at=None, **kw):
    """Train with per-epoch seeded data order; optionally start from a saved (model, opt, rec) state."""
    model = small_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = cmdo.CMDRecorder(opt, model, modes=4, samples=300, warmup=4, **kw)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rec.load_state_dict(state["rec"])
        start = rec.num_records
    for epoch in range(start, records):
        train_epoch(model, opt, torch.Generator().manual_seed(epoch))
        rec.record()
        if stop_at == epoch + 1:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rec": rec.state_dict()}, buf)
            buf.seek(0)
            return torch.load(buf, weights_only=True)
    return rec


@pytest.mark.parametrize("stop_at", [2, 7], ids=["during_warmup", "after_warmup"])
@pytest.mark.parametrize("compact", [None, 2], ids=["full", "compact"])
def test_resume_continues_bit_identically(stop_at, compact):
    whole = _deterministic_run(10, freeze_modes_after=compact)
    saved = _deterministic_run(10, stop_at=stop_at, freeze_modes_after=compact)
    resumed = _deterministic_run(10, state=saved, freeze_modes_after=compact)
    a, b = whole.trajectory(), resumed.trajectory()
    assert resumed.num_records == whole.num_records == 10
    for name in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(whole.cmd_parameters(3), resumed.cmd_parameters(3)):
        assert torch.equal(x, y)


def _seeded_motion_run(records, device, state=None, stop_at=None, **kw):
    """Parameters on ``device`` moved by seeded random steps (the same on every device and every run)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(60, 40).to(device)), torch.nn.Parameter(torch.randn(90).to(device))]
    rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.1), modes=3, samples=200, warmup=4, **kw)
    start = 0
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        rec.load_state_dict(state["rec"])
        start = rec.num_records
    for t in range(start, records):
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(device) * 0.1)
        rec.record()
        if stop_at == t + 1:
            buf = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "rec": rec.state_dict()}, buf)
            buf.seek(0)
            return torch.load(buf, weights_only=True)
    return rec


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop_at", [2, 7], ids=["during_warmup", "after_warmup"])
@pytest.mark.parametrize("compact", [None, 5], ids=["full", "compact"])
def test_resume_on_the_parameters_device_continues_bit_identically(compact, stop_at, device):
    whole = _seeded_motion_run(10, device, freeze_modes_after=compact)
    saved = _seeded_motion_run(10, device, stop_at=stop_at, freeze_modes_after=compact)
    resumed = _seeded_motion_run(10, device, state=saved, freeze_modes_after=compact)
    assert resumed.moments.comoment[0].device.type == device
    a, b = whole.trajectory(), resumed.trajectory()
    for name in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for at in (4, -1):
        for x, y in zip(whole.cmd_parameters(at), resumed.cmd_parameters(at)):
            assert torch.equal(x, y)


def _random_records(rec, model, records):
    """``records`` times: move every parameter by a standard normal step, then record."""
    for _ in range(records):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        rec.record()


def _model_with_numel(N=5001):
    model = torch.nn.Sequential(torch.nn.Linear(49, 50), torch.nn.Linear(50, 49), torch.nn.Linear(1, 1))
    assert sum(p.numel() for p in model.parameters()) == N
    return model


def _scratch_floats(device: str, N: int, compact: bool) -> int:
    """dx (and, compact, each weight's own y − ν and an int32 mode): one block on CPU, N on an accelerator."""
    if device == "cpu":
        return min(compact_block(N), N) * 3 if compact else min(BLOCK, N)
    return N * (2 if compact else 1)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_after_warmup_equals_the_full_form_formula(device):
    model = _model_with_numel().to(device)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), modes=6, samples=100, warmup=3,
                           freeze_modes_after=None)
    _random_records(rec, model, 3)
    M, N, K, F = rec.num_modes, 5001, 100, 3
    assert M == 6
    nbytes = rec.nbytes()
    assert nbytes["statistics"] == (M + 3) * N * 4 + 3 * M * 4  # c, μ, S, P (M × N) + 3 M-vectors
    assert nbytes["history"] == K * F * 4
    assert nbytes["references"] == M * 64 * 4  # preallocated M × T table, grows by doubling
    owned = [t for v in rec.moments.tensors().values() for t in (v if isinstance(v, list) else [v])]
    assert sum(t.numel() * t.element_size() for t in owned) == nbytes["statistics"]
    assert all(t.device.type == device and t.dtype == torch.float32 for t in owned)
    assert nbytes["scratch"] == _scratch_floats(device, N, compact=False) * 4  # preallocated once


@pytest.mark.parametrize("device", DEVICES)
def test_memory_in_the_compact_form_is_three_floats_and_a_mode_per_weight(device):
    model = _model_with_numel().to(device)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), modes=6, samples=100, warmup=3,
                           freeze_modes_after=2)
    _random_records(rec, model, 5)
    assert rec.moments.compact
    N = 5001
    mode_bytes = 1 if device == "cpu" else 4  # uint8 for the CPU blocks, int32 for the flat kernel
    assert rec.nbytes()["statistics"] == 3 * N * 4 + N * mode_bytes + 3 * 6 * 4  # μ, S, own P + mode
    assert rec.nbytes()["scratch"] == _scratch_floats(device, N, compact=True) * 4
    assert rec.moments.modes.device.type == device and rec.moments.modes.element_size() == mode_bytes
    # a query keeps nothing: no fit is cached between records
    before = rec.nbytes()
    rec.cmd_parameters()
    rec.trajectory()
    assert rec.nbytes() == before


def test_trajectory_reconstruct_equals_cmd_parameters():
    model, _, rec, _ = _run(epochs=8)
    traj = rec.trajectory()
    for at in (0, 4, -1):
        assert torch.equal(traj.reconstruct(at), torch.cat([p.reshape(-1) for p in rec.cmd_parameters(at)]))


def test_swapped_puts_cmd_weights_in_and_restores_even_after_an_error():
    model, _, rec, _ = _run(epochs=8)
    before = [p.detach().clone() for p in model.parameters()]
    cmd = rec.cmd_parameters(-1)
    with pytest.raises(KeyError):
        with rec.swapped(-1):
            assert all(torch.equal(p, c) for p, c in zip(model.parameters(), cmd))
            cmd_acc = accuracy(model)
            raise KeyError("boom")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert cmd_acc > 80


def test_export_is_a_normal_checkpoint(tmp_path):
    model, _, rec, _ = _run(epochs=8)
    rec.export(tmp_path / "cmd.pt", at=-2)
    fresh = small_cnn(1)
    fresh.load_state_dict(torch.load(tmp_path / "cmd.pt", weights_only=True), strict=True)
    assert all(torch.equal(p.detach(), c) for p, c in zip(fresh.parameters(), rec.cmd_parameters(-2)))
    assert list(torch.load(tmp_path / "cmd.pt", weights_only=True)) == list(model.state_dict())


def test_cmd_state_dict_keeps_live_buffers():
    model = small_cnn(0, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=200, warmup=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        train_epoch(model, opt, g)
        rec.record()
    sd = rec.cmd_state_dict()
    assert torch.equal(sd["1.running_mean"], model.state_dict()["1.running_mean"])
    assert torch.equal(sd["0.weight"], rec.cmd_parameters()[0])


def test_querying_during_warmup_says_how_many_records_remain():
    model = small_cnn(0)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, warmup=6)
    rec.record()
    rec.record()
    assert rec.phase == "warmup"
    queries = {"cmd_parameters": rec.cmd_parameters, "trajectory": rec.trajectory,
               "cmd_state_dict": rec.cmd_state_dict, "export": lambda: rec.export("unused.pt"),
               "swapped": lambda: rec.swapped(at=0).__enter__()}  # swapped() itself falls back: test_messages.py
    for name, query in queries.items():
        with pytest.raises(RuntimeError, match=f"^{name} is not available during the warm-up: 4 more record"):
            query()


def test_record_every_works_with_scheduler_scaler_and_clipping():
    model = small_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=200)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=200, warmup=3, record_every=10)
    from _digits import digits

    x, y, _, _ = digits()
    for step in range(100):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[step:step + 32]), y[step:step + 32])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert rec.num_records == 10 and rec.phase == "tracking"
    assert sched.get_last_lr()[0] != 0.05  # the scheduler still drives the optimizer


@pytest.mark.parametrize("opt_name", ["sgd", "lbfgs"])
def test_a_step_with_a_closure_returns_its_loss_and_records_once(opt_name):
    from _digits import digits

    x, y, _, _ = digits()
    x = x.flatten(1)[:256]
    y = y[:256]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = (torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4) if opt_name == "lbfgs"
           else torch.optim.SGD(model.parameters(), lr=0.5))
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=100, warmup=3, record_every=1)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(6)]
    assert all(isinstance(loss, torch.Tensor) and loss.ndim == 0 for loss in losses)  # the step's return value
    assert losses[-1] < losses[0]
    assert rec.num_records == 6  # once per step, however often the optimizer evaluates the closure
    assert calls == 6 if opt_name == "sgd" else calls > 6
    # the record is taken after the step: its reference values are the live weights
    flat_now = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    traj = rec.trajectory()
    assert torch.equal(traj.references[:, -1], flat_now[traj.reference_index])


def test_scaler_skipped_step_records_nothing():
    p = torch.nn.Parameter(torch.ones(50))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    rec = cmdo.CMDRecorder(opt, samples=10, modes=2, warmup=2, record_every=1)
    scaler.scale(p.sum() * float("inf")).backward()
    scaler.step(opt)  # inf gradient: GradScaler skips optimizer.step, so the hook does not fire
    scaler.update()
    assert rec.num_records == 0
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    assert rec.num_records == 1


def test_several_param_groups_and_frozen_parameters_reconstruct_exactly():
    model = small_cnn(0)
    conv, rest = list(model[0].parameters()), [p for p in model.parameters() if p.dim() and p is not model[0].weight
                                                and p is not model[0].bias]
    frozen = torch.nn.Parameter(torch.randn(30))  # in the model and the optimizer, never gets a gradient
    model.register_parameter("frozen", frozen)
    opt = torch.optim.SGD([{"params": conv, "lr": 0.01}, {"params": rest + [frozen], "lr": 0.05, "momentum": 0.9}])
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=300, warmup=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_epoch(model, opt, g)
        rec.record()
    assert rec.layout.names[:2] == ("0.weight", "0.bias")
    assert rec.layout.names[-1] == "frozen"
    assert cmdo.CMDRecorder(opt, modes=3, samples=300, warmup=3).layout.names[-1] == "param_groups.1.params.4"
    for at in (0, 3, -1):
        assert torch.equal(rec.cmd_parameters(at)[-1], frozen.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_weights_skip_the_record_with_a_warning(device):
    model = _model_with_numel().to(device)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=100, warmup=3)
    _random_records(rec, model, 4)
    before = rec.trajectory()
    saved = model[2].bias.detach().clone()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"2\.bias"):
        assert rec.record() is False
    assert rec.num_records == 4 and rec.skipped_records == 1
    after = rec.trajectory()
    assert torch.equal(before.a, after.a) and torch.equal(before.b, after.b)
    with torch.no_grad():
        model[2].bias.copy_(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rec.record() is True
    assert torch.isfinite(rec.trajectory().a).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_parameters_keep_float32_statistics(dtype, device):
    model = _model_with_numel().to(device, dtype)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=100, warmup=3)
    _random_records(rec, model, 5)
    # the compact form's mean has the coefficients' dtype (float64 parameters: float64, exact); S and p float32
    mean_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert rec.moments.mean.dtype == mean_dtype and rec.moments.mean.device.type == device
    assert rec.moments.sumsq.dtype == torch.float32 and rec.moments.comoment[0].dtype == torch.float32
    assert all(c.dtype == dtype and c.device.type == device for c in rec.cmd_parameters())
    assert rec.cmd_state_dict()["0.weight"].dtype == dtype


def test_close_detaches_from_the_optimizer():
    p = torch.nn.Parameter(torch.ones(20))
    opt = torch.optim.SGD([p], lr=0.1)
    rec = cmdo.CMDRecorder(opt, samples=5, modes=1, warmup=2, record_every=1)
    p.grad = torch.ones_like(p)
    opt.step()
    rec.close()
    opt.step()
    assert rec.num_records == 1


def _params():
    return [torch.nn.Parameter(torch.zeros(100))]


@pytest.mark.parametrize("kwargs, name", [
    (dict(modes=0), "modes"),
    (dict(modes=60, samples=50), "modes"),
    (dict(samples=101), "samples"),  # only the default 1000 is clamped to N (with a warning): test_messages.py
    (dict(samples=3.0), "samples"),
    (dict(warmup=1), "warmup"),
    (dict(record_every=0), "record_every"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=2.0), "threshold"),
    (dict(threshold=0.2, modes=3), "threshold"),
    (dict(freeze_modes_after=0), "freeze_modes_after"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cmdo.CMDRecorder(torch.optim.SGD(_params(), lr=0.1), **{"samples": 50} | kwargs)


def test_bad_optimizer_and_model_are_refused():
    with pytest.raises(TypeError, match="optimizer"):
        cmdo.CMDRecorder([torch.zeros(3)])
    opt = torch.optim.SGD(_params(), lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="optimizer has no parameters"):
        cmdo.CMDRecorder(opt)
    with pytest.raises(TypeError, match="model"):
        cmdo.CMDRecorder(torch.optim.SGD(_params(), lr=0.1), model="net", samples=10)


def test_at_out_of_range_and_missing_model_are_clear_errors():
    p = torch.nn.Parameter(torch.zeros(100))
    rec = cmdo.CMDRecorder(torch.optim.SGD([p], lr=0.1), samples=20, modes=2, warmup=2)
    for _ in range(3):
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        rec.record()
    with pytest.raises(ValueError, match=r"at=3 is out of range"):
        rec.cmd_parameters(3)
    with pytest.raises(ValueError, match=r"at=-4"):
        rec.trajectory().reconstruct(-4)
    with pytest.raises(TypeError, match="at must be an int"):
        rec.cmd_parameters(1.0)
    with pytest.raises(ValueError, match="model="):
        rec.cmd_state_dict()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compact", [None, 2], ids=["full", "compact"])
def test_compiled_update_equals_the_eager_one(compact, device):
    def run(compiled):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(40, 30, device=device)),
                  torch.nn.Parameter(torch.randn(70, device=device))]
        rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.1), modes=3, samples=100, warmup=3,
                               freeze_modes_after=compact, kernel="compiled" if compiled else None)
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=g).to(device))
            rec.record()
        assert (rec.moments.kernel == "compiled") is compiled
        return rec.trajectory().to("cpu")

    eager, compiled = run(False), run(True)
    assert torch.equal(eager.modes, compiled.modes)
    torch.testing.assert_close(compiled.a, eager.a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.b, eager.b, rtol=1e-5, atol=1e-6)


def test_a_warmup_of_two_records_warns_that_it_finds_one_mode():
    with pytest.warns(UserWarning, match="single mode"):
        cmdo.CMDRecorder(torch.optim.SGD(_params(), lr=0.1), samples=10, modes=2, warmup=2)


def test_integer_arguments_accept_numpy_integers():
    import numpy as np

    rec = cmdo.CMDRecorder(torch.optim.SGD(_params(), lr=0.1), modes=np.int64(2), samples=np.int32(20),
                           warmup=np.int64(3), seed=np.uint8(1))
    assert rec.config == dict(modes=2, threshold=None, samples=20, warmup=3, record_every=None,
                              freeze_modes_after=3, seed=1, distance="correlation", max_modes=None)


def test_an_incomplete_state_is_refused_with_a_value_error():
    rec = cmdo.CMDRecorder(torch.optim.SGD(_params(), lr=0.1), samples=20, modes=2, warmup=3)
    state = edit_meta(rec.state_dict(), lambda meta: meta.pop("history"))
    with pytest.raises(ValueError, match="missing history"):
        rec.load_state_dict(state)


def test_parameters_added_after_construction_are_reported_once():
    p, q = torch.nn.Parameter(torch.zeros(50)), torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([p], lr=0.1)
    rec = cmdo.CMDRecorder(opt, samples=20, modes=2, warmup=3)
    opt.add_param_group({"params": [q]})
    with pytest.warns(RuntimeWarning, match="add_param_group"):
        rec.record()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.record()
    assert rec.layout.numel == 50


def test_a_query_before_the_freeze_does_not_change_the_frozen_modes():
    def run(query_between):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300))]
        rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.1), modes=3, samples=100, warmup=3, freeze_modes_after=3)
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            with torch.no_grad():
                params[0].add_(torch.randn(300, generator=g))
            rec.record()
            if query_between and rec.phase == "tracking":
                rec.cmd_parameters()  # fills the fit cache between records
        return rec.trajectory()

    plain, queried = run(False), run(True)
    assert torch.equal(plain.modes, queried.modes)
    assert torch.equal(plain.a, queried.a)


def test_dropping_model_and_optimizer_frees_the_parameters_and_keeps_the_trajectory():
    import gc
    import weakref

    model = _model_with_numel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=100, warmup=3)
    _random_records(rec, model, 4)
    before = rec.trajectory()
    alive = weakref.ref(model[0].weight)
    del model, opt
    gc.collect()
    assert alive() is None  # the recorder did not keep the parameters alive
    after = rec.trajectory()
    assert torch.equal(before.a, after.a) and torch.equal(before.references, after.references)
    assert [c.shape for c in rec.cmd_parameters()] == [torch.Size(s) for s in rec.layout.shapes]
    with pytest.raises(RuntimeError, match="parameters recorded by this CMDRecorder have been deleted"):
        rec.record()
    with pytest.raises(RuntimeError, match="have been deleted"):
        with rec.swapped():
            pass
