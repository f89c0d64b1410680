"""A long run: 10,000 records with record_every=1 keep memory flat and the statistics float64-exact to 1e-4."""

import sys

import pytest
import torch

import cmd_online as cmdo
from _digits import digits

STEPS = 10_000
WARMUP = 20
MODES = 4
CHECKPOINTS = (WARMUP, 1_000, 5_000, STEPS)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def long_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train_and_record()
    torch.set_num_threads(threads)


def train_and_record(steps: int = STEPS):
    """A least-squares digits classifier (650 weights) trained by minibatch SGD with momentum, recorded every step.

    The gradient is written in closed form instead of autograd: 10,000 steps then take seconds, not minutes.
    """
    x, y, _, _ = digits()
    x = x.flatten(1)
    target = torch.nn.functional.one_hot(y, 10).float()
    batch = 64
    batches = [(x[i:i + batch], target[i:i + batch]) for i in range(0, len(y) - batch, batch)]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    with torch.no_grad():
        model.bias.add_(3.0)  # a mean far from the motion: the case float32 moments get wrong unshifted
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    # the full form (its free modes and shift are what the checks below compare with float64)
    rec = cmdo.CMDRecorder(opt, model, modes=MODES, samples=200, warmup=WARMUP, record_every=1,
                           freeze_modes_after=None)
    N = rec.layout.numel
    history = torch.full((N, steps), float("nan"), dtype=torch.float64)  # allocated (and touched) up front

    def keep(optimizer, args, kwargs):  # registered after the recorder's hook: runs after its record
        history[:, rec.num_records - 1] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    handle = opt.register_step_post_hook(keep)
    sizes, rss = {}, {}
    for step in range(steps):
        xb, tb = batches[step % len(batches)]
        residual = (model(xb).detach() - tb) * (2.0 / len(xb))  # d(mean squared error)/d(output)
        model.weight.grad = residual.T @ xb
        model.bias.grad = residual.sum(0)
        opt.step()
        if rec.num_records in CHECKPOINTS:
            sizes[rec.num_records] = rec.nbytes()
            rss[rec.num_records] = rss_bytes()
    handle.remove()
    rec.close()
    return rec, history, sizes, rss


def test_every_step_was_recorded(long_run):
    rec, history, _, _ = long_run
    assert rec.num_records == STEPS and rec.skipped_records == 0
    assert not torch.isnan(history).any()
    assert torch.equal(rec.trajectory().references.double(), history[rec.reference_index])


def test_recorder_tensors_do_not_grow_beyond_the_reference_table(long_run):
    rec, _, sizes, _ = long_run
    N, M = rec.layout.numel, rec.num_modes
    assert M == MODES
    for records, size in sizes.items():
        # full form: shift, mean, S and M co-moments per weight; shift, mean, S per reference
        assert size["statistics"] == 4 * ((M + 3) * N + 3 * M), records
        assert size["history"] == sizes[WARMUP]["history"] == 4 * 200 * WARMUP
        assert size["indices"] == sizes[WARMUP]["indices"]
        # the M × T reference table, grown by doubling: never more than twice what is filled
        assert 4 * M * records <= size["references"] <= 4 * M * max(2 * records, 64), records
    growth = sizes[STEPS]["total"] - sizes[WARMUP]["total"]
    assert growth == sizes[STEPS]["references"] - sizes[WARMUP]["references"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_process_memory_is_flat(long_run):
    rec, _, sizes, rss = long_run
    table_growth = sizes[STEPS]["references"] - sizes[1_000]["references"]
    # 9,000 records later the process holds at most the reference table's growth and 1 MiB of slack
    assert rss[STEPS] - rss[1_000] <= table_growth + (1 << 20), (rss, table_growth)
    print(f"records 1,000 -> {STEPS:,}: RSS {rss[1_000] / 2**20:.1f} -> {rss[STEPS] / 2**20:.1f} MiB, "
          f"recorder {sizes[1_000]['total']:,} -> {sizes[STEPS]['total']:,} bytes "
          f"(statistics {sizes[STEPS]['statistics']:,}, references {sizes[STEPS]['references']:,})")


def oracle_moments(history: torch.Tensor, rec):
    W = history[:, rec.window_start:]
    R = W[rec.reference_index]
    Wc, Rc = W - W.mean(1, keepdim=True), R - R.mean(1, keepdim=True)
    S, Q = (Wc * Wc).sum(1), (Rc * Rc).sum(1)
    rho = (Rc @ Wc.T) / torch.sqrt(Q[:, None] * S[None, :])
    return W.mean(1), S, Q, rho


def test_streaming_moments_match_float64_to_1e4_relative(long_run):
    rec, history, _, _ = long_run
    mean, S, Q, rho = oracle_moments(history, rec)
    stats = rec.moments
    online_mean = stats.shift.double() + stats.mean.double()
    online_S = stats.sumsq.double()
    online_P = torch.stack(stats.comoment).double()
    online_Q = stats.ref_sumsq.double()
    online_rho = online_P / torch.sqrt(online_Q[:, None] * online_S[None, :])
    assert stats.window_count() == STEPS - rec.window_start
    spread = torch.sqrt(S / stats.window_count())
    assert ((online_mean - mean).abs() <= 1e-4 * (mean.abs() + spread)).all()
    assert ((online_S - S).abs() <= 1e-4 * S).all()
    assert ((online_Q - Q).abs() <= 1e-4 * Q).all()
    moving = S > 0  # constant weights (pixels that are always blank) have no correlation at all
    assert moving.float().mean() > 0.5 and (online_S[~moving] == 0).all()
    assert ((online_rho - rho)[:, moving].abs() <= 1e-4).all()
    print(f"max relative error: S {((online_S - S).abs() / S)[moving].max():.1e}, "
          f"Q {((online_Q - Q).abs() / Q).max():.1e}, rho {(online_rho - rho)[:, moving].abs().max():.1e}")


def test_fit_matches_posthoc_float64_to_1e4_relative(long_run):
    rec, history, _, _ = long_run
    oracle = cmdo.fit_affine(history, rec.reference_index, rec.window_start)
    online = rec.trajectory()
    _, S, Q, rho = oracle_moments(history, rec)
    top2 = rho.abs().topk(2, dim=0).values
    clear = top2[0] - top2[1] > 1e-3
    assert clear.float().mean() > 0.9  # the comparison below covers most weights
    assert torch.equal(online.modes[clear], oracle.modes[clear])
    same = online.modes.long() == oracle.modes.long()
    # a's natural scale is sqrt(S/Q) (= |a|/|rho|); b's is the weight's mean and spread
    scale_a = torch.sqrt(S / Q[oracle.modes.long()])
    assert ((online.a.double() - oracle.a)[same].abs() <= 1e-4 * scale_a[same]).all()
    assert torch.equal(online.a[S == 0], torch.zeros(int((S == 0).sum())))
    W = history[:, rec.window_start:]
    w_scale = W.abs().amax(1) + W.std(1)
    worst = 0.0
    for at in (rec.window_start, STEPS // 2, -1):
        err = (online.reconstruct(at).double() - oracle.reconstruct(at))[same].abs()
        assert (err <= 1e-4 * w_scale[same]).all(), at
        worst = max(worst, (err / w_scale[same]).max().item())
    print(f"modes: {int(clear.sum())}/{len(clear)} clear, {int(same.sum())} equal; max error: "
          f"a {((online.a.double() - oracle.a).abs() / scale_a)[same & (S > 0)].max():.1e}, reconstruction {worst:.1e}")
