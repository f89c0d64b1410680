"""Property-based tests: random layouts, dtypes and settings; online CMD equals the float64 post-hoc oracle."""

import io
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cmd_online as cmdo
from _states import assert_same, leaves

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
EPS32 = torch.finfo(torch.float32).eps
# warmup=2 is drawn on purpose (the smallest allowed); its "single mode" advice is not news here
pytestmark = pytest.mark.filterwarnings("ignore:warmup=2")
# CMD_FUZZ_EXAMPLES=500 explores further, with fresh random examples (the default run is reproducible)
DEEP = int(os.environ.get("CMD_FUZZ_EXAMPLES", 0))
SETTINGS = dict(max_examples=DEEP or 25, deadline=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend for the shared cores
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- strategies
@st.composite
def runs(draw):
    """A parameter layout (groups × tensors, shapes, dtypes), recorder settings and a trajectory seed."""
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        tensors = draw(st.lists(st.tuples(st.lists(st.integers(1, 4), max_size=3).map(tuple),
                                          st.sampled_from(DTYPES)), min_size=1, max_size=3))
        groups.append(tensors)
    N = sum(math.prod(shape) for g in groups for shape, _ in g)
    samples = draw(st.integers(1, min(N, 24)))
    if draw(st.booleans()):
        mode_args = dict(modes=draw(st.integers(1, min(samples, 4))))
    else:
        mode_args = dict(threshold=draw(st.floats(0.02, 1.0)))
    warmup = draw(st.integers(2, 5))
    records = draw(st.integers(warmup, warmup + 9))
    config = dict(samples=samples, warmup=warmup, seed=draw(st.integers(0, 2 ** 16)),
                  record_every=draw(st.one_of(st.none(), st.integers(1, 3))),
                  freeze_modes_after=draw(st.one_of(st.none(), st.integers(1, records - warmup + 2))),
                  **mode_args)
    return groups, config, records, draw(st.integers(0, 2 ** 16))


def make_params(groups, seed):
    g = torch.Generator().manual_seed(seed)
    params = [[torch.nn.Parameter((torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype))
               for shape, dtype in tensors] for tensors in groups]
    opt = torch.optim.SGD([{"params": p} for p in params], lr=1.0)
    return [p for group in params for p in group], opt


def targets(N: int, steps: int, seed: int) -> torch.Tensor:
    """A planted CMD-like trajectory (steps × N, float64): w = a·signal[mode] + b + noise; some weights constant."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    signals = torch.stack([torch.exp(-3 * t), torch.sin(5 * t), torch.randn(steps, generator=g).cumsum(0) / 4])
    mode = torch.randint(0, 3, (N,), generator=g)
    a = torch.randn(N, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) * torch.rand(N, generator=g, dtype=torch.float64) * 10
    noise = torch.randn(steps, N, generator=g, dtype=torch.float64) * 0.05 * torch.rand(N, generator=g)
    W = a * signals[mode].T + b + noise
    constant = torch.rand(N, generator=g) < 0.15
    W[:, constant] = b[constant]
    return W


class Driver:
    """Moves the parameters along a trajectory with a real SGD step; keeps the recorded history."""

    def __init__(self, params, opt, rec, W):
        self.params, self.opt, self.rec, self.W = params, opt, rec, W
        self.sizes = [p.numel() for p in params]
        self.step = 0
        self.history = []  # what the recorder saw at each record (each parameter's own values, in float64)

    def advance(self):
        """One optimizer step to the next trajectory point, then a record if record_every is None."""
        target = self.W[self.step % len(self.W)]
        for p, w in zip(self.params, target.split(self.sizes)):
            p.grad = p.detach() - w.view(p.shape).to(p.dtype)  # SGD with lr = 1 lands on the target
        self.opt.step()
        self.step += 1
        if self.rec.config["record_every"] is None:
            self.rec.record()
        if self.rec.num_records > len(self.history):
            self.history.append(torch.cat([p.detach().double().reshape(-1) for p in self.params]))

    def run_until(self, records: int):
        while self.rec.num_records < records:
            self.advance()


def recorded_run(groups, config, records, seed):
    params, opt = make_params(groups, seed)
    N = sum(p.numel() for p in params)
    rec = cmdo.CMDRecorder(opt, **config)
    every = config["record_every"] or 1
    driver = Driver(params, opt, rec, targets(N, every * (records + 2), seed))
    driver.run_until(records)
    return rec, driver


# ---------------------------------------------------------------------------------- the oracle
def correlations(W: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """ρ of every weight (columns of W, T × N) with every reference, float64 (M × N), 0 where undefined."""
    Wc = W - W.mean(0)
    Rc = Wc[:, ref]
    S = torch.where(W.amax(0) > W.amin(0), (Wc * Wc).sum(0), 0.0)
    Q = S[ref]
    denom = torch.sqrt(Q[:, None] * S[None, :])
    return torch.where(denom > 0, Rc.T @ Wc / denom, 0.0)


def least_squares(W: torch.Tensor, ref: torch.Tensor, modes: torch.Tensor, aside: torch.Tensor):
    """a, b of each weight against its given mode's reference, float64, over all rows of W (T × N); a
    reference set aside (``aside``, per mode) counts as not moving, as the recorder has it."""
    R = W[:, ref][:, modes]
    Wc, Rc = W - W.mean(0), R - R.mean(0)
    Q = (Rc * Rc).sum(0)
    moving = (W.amax(0) > W.amin(0)) & (R.amax(0) > R.amin(0)) & ~aside[modes.long()]
    a = torch.where(moving & (Q > 0), (Rc * Wc).sum(0) / Q, 0.0)
    a[ref] = 1.0
    b = W.mean(0) - a * R.mean(0)
    b[ref] = 0.0
    return a, b


def assert_modes_agree_where_clear(modes: torch.Tensor, W: torch.Tensor, ref: torch.Tensor, aside: torch.Tensor,
                                   margin=1e-3):
    """Online modes equal argmax |ρ| (float64) over the references not set aside (``aside``, per mode)
    wherever the best mode beats the second by ``margin``; the references themselves keep their own mode.

    Where two |ρ| are closer than that, float32 may legitimately pick either one: the online choice must
    then be one of the near-best modes.
    """
    if aside.all():  # no reference moves: every weight stays in mode 0
        return
    others = torch.ones(W.shape[1], dtype=torch.bool)
    others[ref] = False
    rho = correlations(W, ref).abs()[:, others]
    modes = modes[others]
    rho[aside] = -1.0
    best = rho.amax(0)
    chosen = rho.gather(0, modes.long().unsqueeze(0)).squeeze(0)
    assert (chosen >= best - margin).all()
    if rho.shape[0] > 1:
        top2 = rho.topk(2, dim=0).values
        clear = top2[0] - top2[1] > margin
        assert torch.equal(modes.long()[clear], rho.argmax(0)[clear])


def tolerance(W, traj):
    """Float32 round-off of the online fit and of the stored model, per weight (N,)."""
    R = traj.references.double().abs().amax(1)[traj.modes.long()]
    stored = W.abs().amax(0) + traj.b.double().abs() + traj.a.double().abs() * R
    return 1e-4 * (W.amax(0) - W.amin(0)) + 8 * EPS32 * stored


# ---------------------------------------------------------------------------------- properties
@settings(**SETTINGS)
@given(runs())
def test_online_equals_posthoc(run):
    groups, config, records, seed = run
    rec, driver = recorded_run(groups, config, records, seed)
    assert rec.num_records == records and rec.skipped_records == 0
    W = torch.stack(driver.history)  # T × N, what the recorder saw
    traj = rec.trajectory()
    ref, start = rec.reference_index, rec.window_start
    assert start == config["warmup"] - 1 and traj.window_start == start
    assert torch.isin(ref, rec.sample_index).all()
    assert torch.equal(traj.references, W[:, ref].T.to(traj.references.dtype))  # the M × T table is exact
    window = W[start:]
    if len(window) == 1:  # one record in the window: every weight is its own value
        assert torch.equal(traj.reconstruct(start), window[0].to(traj.a.dtype))  # float64 layouts: exactly
        return
    freeze = config["freeze_modes_after"]
    modes = traj.modes
    assert torch.equal(modes[ref].long(), torch.arange(len(ref)))
    if freeze is None or freeze > len(window):
        oracle = cmdo.fit_affine(W.T, ref, start, rec.layout)  # each reference judged at its own dtype
        assert_modes_agree_where_clear(modes, window, ref, traj.set_aside)
        same = modes == oracle.modes
        for at in range(start, records):
            err = (traj.reconstruct(at).double() - oracle.reconstruct(at))[same].abs()
            assert (err <= tolerance(window, traj)[same]).all()
    elif freeze == 1:  # frozen after one record: no correlation is known yet, all but references in mode 0
        others = torch.ones(len(modes), dtype=torch.bool)
        others[ref] = False
        assert (modes[others] == 0).all()
    else:  # compact form: modes frozen from the first `freeze` records of the window
        assert_modes_agree_where_clear(modes, window[:freeze], ref, traj.set_aside)
    # everywhere: a, b are the float64 least squares over the whole window against the chosen mode
    a, b = least_squares(window, ref, modes, traj.set_aside)
    for at in range(start, records):
        expected = a * W[at, ref][modes.long()] + b
        assert ((traj.reconstruct(at).double() - expected).abs() <= tolerance(window, traj)).all()


@settings(**SETTINGS)
@given(runs(), st.integers(-30, 30))
def test_reconstruction_has_the_parameters_shapes_and_dtypes(run, at):
    groups, config, records, seed = run
    rec, driver = recorded_run(groups, config, records, seed)
    traj = rec.trajectory()
    if not -records <= at < records:
        for call in (rec.cmd_parameters, traj.reconstruct, traj.state_dict):
            with pytest.raises(ValueError, match=f"at={at} is out of range"):
                call(at)
        return
    cmd = rec.cmd_parameters(at)
    assert [(c.shape, c.dtype) for c in cmd] == [(p.shape, p.dtype) for p in driver.params]
    flat = traj.reconstruct(at)
    coefficients = torch.float64 if torch.float64 in rec.layout.dtypes else torch.float32
    assert flat.shape == (rec.layout.numel,) and flat.dtype == coefficients
    sd = traj.state_dict(at)
    assert [(v.shape, v.dtype) for v in sd.values()] == [(p.shape, p.dtype) for p in driver.params]
    assert torch.equal(torch.cat([c.reshape(-1).float() for c in cmd]),
                       torch.cat([p.reshape(-1).float() for p in traj.layout.split(flat).values()]))
    with rec.swapped(at):
        assert all(torch.equal(p, c) for p, c in zip(driver.params, cmd))
    assert torch.equal(torch.stack(driver.history)[-1].float(),
                       torch.cat([p.detach().float().reshape(-1) for p in driver.params]))


@settings(**SETTINGS)
@given(runs(), st.floats(0, 1))
def test_state_dict_round_trip_continues_identically(run, where):
    groups, config, records, seed = run
    extra = 4
    cut = int(where * records)
    params, opt = make_params(groups, seed)
    rec = cmdo.CMDRecorder(opt, **config)
    every = config["record_every"] or 1
    W = targets(sum(p.numel() for p in params), every * (records + extra + 2), seed)
    first = Driver(params, opt, rec, W)
    first.run_until(cut)
    buffer = io.BytesIO()
    torch.save(rec.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # a fresh process: new parameters with the same values, a new optimizer and recorder
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    sizes = [len(group) for group in groups]
    split = [clones[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    opt2 = torch.optim.SGD([{"params": p} for p in split], lr=1.0)
    rec2 = cmdo.CMDRecorder(opt2, **config)
    rec2.load_state_dict(state)
    second = Driver(clones, opt2, rec2, W)
    second.step, second.history = first.step, list(first.history)
    first.run_until(records + extra)
    second.run_until(records + extra)
    assert_same(leaves(rec.state_dict()), leaves(rec2.state_dict()))
    if rec.phase == "tracking":
        t1, t2 = rec.trajectory(), rec2.trajectory()
        for name in ("references", "reference_index", "a", "b", "modes"):
            assert torch.equal(getattr(t1, name), getattr(t2, name)), name


# ---------------------------------------------------------------------------------- bad arguments
ARBITRARY = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.integers(2 ** 31, 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.lists(st.integers(0, 3), max_size=2), st.just(np.int64(3)), st.just(object()),
)
ARGUMENTS = ("modes", "threshold", "samples", "warmup", "record_every", "freeze_modes_after", "log_every",
             "seed", "check_finite", "model", "optimizer")
# an error caused by one argument may rightly name the one it conflicts with
RELATED = {"modes": ("modes", "samples", "threshold"), "threshold": ("threshold", "modes"),
           "samples": ("samples", "modes", "N")}


@settings(max_examples=DEEP or 100, deadline=None, derandomize=not DEEP)
@given(st.sampled_from(ARGUMENTS), ARBITRARY)
def test_constructor_raises_only_value_or_type_errors_naming_the_argument(name, value):
    model = torch.nn.Linear(3, 2)
    kwargs = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), model=model, modes=2, samples=5,
                  warmup=3)
    if name == "threshold":
        kwargs.pop("modes")
    # the K × F warm-up history is allocated up front: a warmup of 2**31 is a 40 GB request by design
    assume(not (name == "warmup" and isinstance(value, int) and value > 10 ** 4))
    kwargs[name] = value
    try:
        rec = cmdo.CMDRecorder(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(n in str(e) for n in RELATED.get(name, (name,))), (name, value, str(e))
    else:
        rec.close()
