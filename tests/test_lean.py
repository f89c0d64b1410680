"""The default recorder in ≤ 3.5 float32 per weight: the snapshot freeze (cmd_online.window), its memory,
the compact form's precision, resuming within the snapshots, and states of version 3."""

from __future__ import annotations

import io
import pathlib
import sys

import pytest
import torch

import cmd_online as cmdo
from _digits import digits, small_cnn, train_epoch
from _states import assert_same, leaves
from cmd_online.window import SNAPSHOT_LIMIT, SnapshotMoments

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from live_bytes import recorder_peaks  # noqa: E402 - the tracker benchmarks/cost.py reports with

V3_STATES = pathlib.Path(__file__).parent / "data" / "v3_states.pt"


def _pair(freeze: int, kernel: str | None = None, warmup: int = 4):
    """A digits CNN and two recorders on its optimizer: the full form, and ``freeze_modes_after=freeze``."""
    model = small_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(modes=5, samples=400, warmup=warmup, kernel=kernel)
    return model, opt, cmdo.CMDRecorder(opt, model, freeze_modes_after=None, **kw), \
        cmdo.CMDRecorder(opt, model, freeze_modes_after=freeze, **kw)


def _full_modes(rec) -> torch.Tensor:
    modes = torch.empty(sum(rec.moments.sizes), dtype=torch.int64)
    for block in rec.fit_blocks():
        modes[block.flat] = block.fit.modes
    return modes


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5) -> None:
    """Equal to float32 round-off, relative to the largest value."""
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.filterwarnings("ignore:freeze_modes_after=")
@pytest.mark.parametrize("freeze, kernel", [(k, "blocks") for k in range(1, SNAPSHOT_LIMIT + 1)] + [(3, "flat")])
def test_snapshot_freeze_equals_the_full_form_frozen_at_k(freeze, kernel):
    model, opt, full, snap = _pair(freeze, kernel)
    g = torch.Generator().manual_seed(0)
    for _ in range(full.config.warmup - 1 + freeze):
        train_epoch(model, opt, g)
        full.record()
        snap.record()
        if snap.phase == "tracking" and not snap.moments.compact:  # before the freeze: the fit from the snapshots
            for name, w in full.cmd_state_dict().items():
                _close(snap.cmd_state_dict()[name], w)
    assert isinstance(snap.moments, SnapshotMoments) and snap.moments.compact
    assert snap.moments.window_count() == freeze and torch.equal(snap.reference_index, full.reference_index)
    stats = full.moments
    _close(snap.moments.mean_of(), stats.mean_of(), 1e-6)
    _close(snap.moments.sumsq_of(), stats.sumsq_of())
    if freeze >= 3:  # from 1 or 2 records every |ρ| is 0 or 1: the modes are ties, decided by round-off
        modes = _full_modes(full)
        assert torch.equal(snap.moments.modes.long(), modes)  # the same modes, references pinned alike
        own = torch.stack(stats.comoment).gather(0, modes.unsqueeze(0)).squeeze(0)
        _close(snap.moments.comoment[0], own)
    for name, w in full.cmd_state_dict().items():  # and so the CMD weights at record k
        _close(snap.cmd_state_dict()[name], w)


def test_default_recorder_holds_at_most_three_and_a_half_floats_per_weight_at_a_million():
    """N = 1e6: statistics, scratch and the warm-up's leftovers after the warm-up, and the freeze's own
    temporaries at its record on top, stay ≤ 3.5 float32 per weight."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 1000)
    N = sum(p.numel() for p in model.parameters())
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, warmup=4, modes=10)
    g = torch.Generator().manual_seed(0)
    peaks = []
    for t in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=1e-2)
        before, added = recorder_peaks(rec, rec.record)
        if rec.phase == "tracking":  # what it held before, and what the record added at its most
            peaks.append((before + added) / (4 * N))
    assert rec.moments.compact and rec.num_modes == 10
    held = rec.nbytes()["total"] / (4 * N)
    assert 3.25 <= held <= 3.35, held  # μ, S, p and a one-byte mode; the scratch, history, table on top
    assert max(peaks) <= 3.5, peaks


def test_saved_state_of_the_default_recorder_is_at_most_three_and_a_half_model_copies():
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 300)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, warmup=3, modes=5, samples=300)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(7):
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=g), alpha=1e-2)
        rec.record()
        buffer = io.BytesIO()
        torch.save(rec.state_dict(), buffer)
        sizes.append(buffer.tell())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert max(sizes[2:]) <= 3.5 * model_bytes, [s / model_bytes for s in sizes]
    rows = rec.state_dict()["stats"]["rows"]  # one int64 marker per first-dimension row (docs/concepts.md)
    assert [(r.dtype, r.shape) for r in rows.values()] == [(torch.int64, (300,)), (torch.int64, (300,))]


def _records(T: int, offset: float, motion: float, n: int = 400):
    """T records of n weights (float32): offset + motion × (a·r_m(t) + noise), two random-walk profiles r_m."""
    g = torch.Generator().manual_seed(0)
    profile = torch.randn(2, T, generator=g, dtype=torch.float64).cumsum(1)
    modes = torch.arange(n) % 2
    a = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    W = offset + motion * (a[:, None] * profile[modes] + 0.05 * torch.randn(n, T, generator=g, dtype=torch.float64))
    return W.float()


def _slope_errors(W: torch.Tensor, freeze) -> tuple[float, float]:
    """Median and largest relative error of the recorder's slopes a against float64 least squares with the
    recorder's modes."""
    p = torch.nn.Parameter(W[:, 0].clone())
    rec = cmdo.CMDRecorder(torch.optim.SGD([p], lr=0.0), modes=2, samples=W.shape[0], warmup=4,
                           freeze_modes_after=freeze)
    for s in range(W.shape[1]):
        with torch.no_grad():
            p.copy_(W[:, s])
        rec.record()
    traj = rec.trajectory()
    window = W[:, traj.window_start:].double()
    R = window[traj.reference_index.long()][traj.modes.long()]  # each weight's own reference, float64
    Wc, Rc = window - window.mean(1, keepdim=True), R - R.mean(1, keepdim=True)
    a = (Wc * Rc).sum(1) / (Rc * Rc).sum(1)  # the least-squares slope with the recorder's modes
    error = (traj.a.double() - a).abs() / a.abs()
    return float(error.median()), float(error.max())


# measured (40 records, 400 weights): median, max relative error of a in the compact form
# mean 1000, motion 1e-3: 1.4 %, 14 %;  motion 3e-4: 5.6 %, 24 %;  mean 1, motion 1e-3: 8e-6, 5e-5;
# mean 0.05: 5e-7, 4e-6. The full form: ≤ 3e-7 in all four.
@pytest.mark.parametrize("offset, motion, median, largest", [(1e3, 1e-3, 3e-2, 0.3), (1e3, 3e-4, 0.1, 0.5),
                                                            (1.0, 1e-3, 3e-5, 3e-4), (0.05, 1e-3, 2e-6, 2e-5)])
def test_the_compact_form_has_no_shift_so_a_large_mean_costs_slope_precision(offset, motion, median, largest):
    """docs/caveats.md: without the shift, a weight of mean 1000 moving by 1e-3 gets its slope off by about
    a percent; the full form keeps its shift and float32 round-off."""
    W = _records(40, offset, motion)
    compact, full = _slope_errors(W, 3), _slope_errors(W, None)
    assert full[1] <= 2e-6
    assert compact[0] <= median and compact[1] <= largest
    if offset == 1e3:  # the cost is real: far above the full form's
        assert compact[0] >= 1e3 * full[1]


def _saved_between_snapshots():
    """A default recorder (k = 3) two records into its window (the snapshots, no freeze yet), and its state
    as saved and read back. Returns the model, optimizer, generator, recorder and state."""
    model, opt, _, rec = _pair(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(rec.config.warmup + 1):  # the window's records 1 and 2: snapshots
        train_epoch(model, opt, g)
        rec.record()
    assert rec.moments.window_count() == 2 and not rec.moments.compact
    buffer = io.BytesIO()
    torch.save(rec.state_dict(), buffer)
    buffer.seek(0)
    return model, opt, g, rec, torch.load(buffer, weights_only=True)


def test_resume_between_snapshots_equals_the_uninterrupted_run():
    model, opt, g, rec, state = _saved_between_snapshots()
    resumed = cmdo.CMDRecorder(opt, model, modes=5, samples=400, warmup=4, freeze_modes_after=3)
    resumed.load_state_dict(state)
    for _ in range(4):
        train_epoch(model, opt, g)
        rec.record()
        resumed.record()
    assert resumed.moments.compact
    assert_same(leaves(resumed.state_dict()), leaves(rec.state_dict()))


@pytest.mark.parametrize("kernel", ["blocks", "compiled"])
def test_offload_across_the_snapshot_freeze_equals_the_training_thread(kernel):
    model, opt, _, rec = _pair(3, kernel)
    other = cmdo.CMDRecorder(opt, model, modes=5, samples=400, warmup=4, kernel=kernel, offload=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        train_epoch(model, opt, g)
        rec.record()
        other.record()
    other.close()
    assert other.moments.compact
    assert_same(leaves(other.state_dict()), leaves(rec.state_dict()))


# ------------------------------------------------------------------------------------- version 3
def _v3(name: str):
    case = torch.load(V3_STATES, weights_only=True)[name]
    dtype = case["weights"]["0.weight"].dtype
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).to(dtype)
    model.load_state_dict(case["weights"])
    return case, model, torch.optim.SGD(model.parameters(), lr=0.2)


def _v3_recorder(opt, model, freeze):
    return cmdo.CMDRecorder(opt, model, modes=3, samples=200, warmup=8, freeze_modes_after=freeze)


@pytest.mark.parametrize("name, freeze, rtol", [("full", None, 0.0), ("compact", 3, 1e-5), ("before_freeze", 3, 1e-6),
                                                ("compact_float64", 3, 1e-12)])
def test_states_of_version_3_load(name, freeze, rtol):
    """The full form as it was (bit for bit); a compact state with its shift folded into the mean; the full
    form of a freeze_modes_after=3 recorder before its freeze as the snapshots it holds now."""
    case, model, opt = _v3(name)
    rec = _v3_recorder(opt, model, freeze)
    rec.load_state_dict(case["state"])
    for key, want in case["cmd"].items():
        got = rec.cmd_state_dict()[key]
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    x = digits()[0].reshape(-1, 64).to(case["weights"]["0.weight"].dtype)
    for _ in range(3):  # and the recording goes on (the snapshots' freeze included)
        opt.zero_grad()
        model(x[:64]).square().mean().backward()
        opt.step()
        assert rec.record()
    assert rec.moments.compact == (freeze is not None)


def test_state_of_version_3_during_the_warm_up_loads():
    case, model, opt = _v3("warmup")
    rec = _v3_recorder(opt, model, None)
    rec.load_state_dict(case["state"])
    assert rec.phase == "warmup" and rec.num_records == 5


def test_a_full_form_state_of_version_3_into_the_default_recorder_names_the_option():
    case, model, opt = _v3("full")
    with pytest.raises(ValueError, match="freeze_modes_after=None"):
        _v3_recorder(opt, model, 3).load_state_dict(case["state"])


def test_a_freeze_stopped_halfway_refuses_every_later_use(monkeypatch):
    """docs/caveats.md: an exception inside the in-place freeze (an out-of-memory error in its float64
    temporaries) leaves statistics of neither form; the recorder then refuses records, queries and
    state_dict() with the cause, and a recorder that loads the last saved state goes on as an uninterrupted one."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3 * 2048, 1, generator=g) * torch.randn(1, 8, generator=g).cumsum(1)
    W = W + 0.1 * torch.randn(W.shape, generator=g)
    p = torch.nn.Parameter(W[:, 0].clone())
    opt = torch.optim.SGD([p], lr=0.0)

    def recorder():
        return cmdo.CMDRecorder(opt, modes=2, samples=100, warmup=4, seed=0)  # the default: k = 3

    rec, twin = recorder(), recorder()
    for t in range(5):  # the warm-up and the window's first two records
        with torch.no_grad():
            p.copy_(W[:, t])
        rec.record()
        twin.record()
    saved = io.BytesIO()
    torch.save(rec.state_dict(), saved)  # at once: state_dict() holds references to the live tensors
    real, calls = SnapshotMoments._freeze_block, []

    def out_of_memory_on_the_second_block(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("float64 temporaries")
        return real(self, *args)

    monkeypatch.setattr(SnapshotMoments, "_freeze_block", out_of_memory_on_the_second_block)
    with torch.no_grad():
        p.copy_(W[:, 5])
    with pytest.raises(MemoryError):
        rec.record()
    monkeypatch.undo()
    for use in (rec.record, rec.state_dict, rec.trajectory, lambda: rec.cmd_parameters()):
        with pytest.raises(RuntimeError, match=r"freeze of the modes stopped halfway \(MemoryError after 2048 of "
                                               r"6144 weights\).*load the last state_dict"):
            use()
    resumed = recorder()
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for t in range(5, 8):
        with torch.no_grad():
            p.copy_(W[:, t])
        resumed.record()
        twin.record()
    assert resumed.moments.compact
    got, want = resumed.trajectory(), twin.trajectory()
    for name in ("a", "b", "modes", "references"):
        assert torch.equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("damage", ["edited", "shape", "nan"])
def test_a_damaged_state_saved_between_the_snapshots_is_refused_and_changes_nothing(damage):
    """A state of the default recorder before its freeze (the window's first records kept as snapshots):
    an edited snapshot, a snapshot of the wrong shape or a NaN in one is refused with a ValueError naming
    the statistic, and the recorder that refused it is unchanged."""
    model, opt, _, _, state = _saved_between_snapshots()
    name = next(iter(state["stats"]["sumsq"]))  # record 2 − record 1 of the first parameter
    snapshot = state["stats"]["sumsq"][name]
    if damage == "edited":
        snapshot.view(-1)[0] += 1e-3
    elif damage == "shape":
        state["stats"]["sumsq"][name] = snapshot.reshape(-1)[:-1]
    else:
        snapshot.view(-1)[0] = float("nan")
    other = cmdo.CMDRecorder(opt, model, modes=5, samples=400, warmup=4, freeze_modes_after=3)
    before = leaves(other.state_dict())
    with pytest.raises(ValueError, match=r"sumsq|checksum"):
        other.load_state_dict(state)
    assert_same(leaves(other.state_dict()), before)
