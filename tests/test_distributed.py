"""CMDRecorder under torch.distributed: DDP and FSDP2 (fully_shard), 2 processes on gloo.

All scenarios run once, in one pair of processes (tests/_dist_workers.py); each test checks one
behaviour of their output against the single-process run on the same global batches.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401 - loading the FSDP ranks' states (DTensors) needs it

import cmd_online as cmdo
from cmd_online.distributed import ShardInfo, is_writer

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # the worker module must be importable by the children
import _dist_workers as workers  # noqa: E402
from _spawn import run_ranks  # noqa: E402
from _states import leaves  # noqa: E402
from cmd_online.checkpoint import read_meta  # noqa: E402

WORLD = 2
FIT = ("a", "b", "modes", "references", "reference_index")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Run every scenario on 2 gloo processes; the directory of what each rank wrote."""
    out = tmp_path_factory.mktemp("distributed")
    run_ranks(workers.run, (WORLD, f"file://{out}/store", str(out), list(workers.SCENARIOS)), WORLD, 240,
              "the distributed workers")
    return out


@pytest.fixture(scope="module")
def single():
    """The single-process run on the same global batches: (model, recorder); the recorder needs the model alive."""
    return workers.train_single()


def load(out, scenario, rank):
    error = out / f"{scenario}_rank{rank}.error"
    if error.exists():
        pytest.fail(f"rank {rank} failed in {scenario}:\n{error.read_text()}")
    return torch.load(out / f"{scenario}_rank{rank}.pt", weights_only=True)


def assert_same_fit(got, want, rtol=1e-4, atol=1e-6):
    """The CMD fit of two runs of the same training, up to float32 training round-off."""
    assert torch.equal(got["reference_index"], want["reference_index"])
    assert torch.equal(got["modes"], want["modes"])
    torch.testing.assert_close(got["references"], want["references"], rtol=rtol, atol=atol)
    torch.testing.assert_close(got["a"], want["a"], rtol=rtol, atol=atol)
    torch.testing.assert_close(got["b"], want["b"], rtol=rtol, atol=atol)


def flat_state(state):
    """Every tensor of a recorder state_dict (this rank's part of a DTensor), by a path name."""
    return {key: value for key, value in leaves(state).items() if isinstance(value, torch.Tensor)}


# ------------------------------------------------------------------------------------------- DDP
def test_ddp_ranks_hold_identical_states(out):
    r0, r1 = load(out, "ddp", 0), load(out, "ddp", 1)
    s0, s1 = flat_state(r0["state"]), flat_state(r1["state"])
    assert s0.keys() == s1.keys() and len(s0) > 10
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert read_meta(r0["state"])["shards"] == read_meta(r1["state"])["shards"] == {"kind": "whole"}


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_offload_under_ddp_and_fsdp_keeps_each_ranks_statistics_bit_identical(out, scenario):
    for rank in range(WORLD):
        saved = load(out, scenario, rank)
        plain, offloaded = flat_state(saved["state"]), flat_state(saved["offloaded"])
        assert plain.keys() == offloaded.keys() and any(k.startswith("stats.comoment.mode_0.") for k in plain)
        assert all(torch.equal(plain[k], offloaded[k]) for k in plain), scenario
        assert read_meta(saved["offloaded"])["num_records"] == read_meta(saved["state"])["num_records"]
    if scenario == "fsdp":
        saved = load(out, "fsdp", 0)
        assert all(torch.equal(saved[k], saved["offloaded_fit"][k]) for k in FIT)  # gathered: the same model


def test_ddp_fit_equals_single_process_run(out, single):
    _, single = single
    got = load(out, "ddp", 0)
    assert got["num_records"] == single.num_records == workers.STEPS // workers.RECORD_EVERY
    assert_same_fit(got, workers.summary(single))


def test_ddp_export_written_by_rank_0_only_and_equals_single_process(out, single):
    _, single = single
    assert not (out / "ddp_export_1.pt").exists()
    exported = torch.load(out / "ddp_export_0.pt", weights_only=True)
    want = single.cmd_state_dict()
    assert exported.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(exported[key], want[key], rtol=1e-4, atol=1e-6)


def test_ddp_tensorboard_logs_on_rank_0_only(out):
    pytest.importorskip("cmd_online.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for rank in range(WORLD):
        acc = EventAccumulator(str(out / f"tb_rank{rank}"))
        acc.Reload()
        tags.append(acc.Tags()["scalars"])
    assert "cmd/reference/mode_00" in tags[0]
    assert tags[1] == []


# ----------------------------------------------------------------------------------------- FSDP2
def test_fsdp_fit_equals_unsharded_recorder_of_the_same_weights(out):
    """Fed the gathered weights of the same run, a plain recorder gets the same fit: only the sharding differs."""
    for rank in range(WORLD):
        got = load(out, "fsdp", rank)
        assert_same_fit(got, got["shadow"], rtol=1e-6, atol=1e-7)


def test_fsdp_fit_equals_single_process_run(out, single):
    _, single = single
    for rank in range(WORLD):
        assert_same_fit(load(out, "fsdp", rank), workers.summary(single))


def test_fsdp_export_equals_single_process_and_rank_shards(out, single):
    _, single = single
    exported = torch.load(out / "fsdp_export.pt", weights_only=True)
    want = single.cmd_state_dict()
    assert exported.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(exported[key], want[key], rtol=1e-4, atol=1e-6)
    # each rank's cmd_parameters() are its torch.chunk rows of the exported tensors
    names = [n for n, _ in workers.make_model().named_parameters()]
    for rank in range(WORLD):
        local = load(out, "fsdp", rank)["local_cmd"]
        for name, part in zip(names, local):
            rows = exported[name].chunk(WORLD)  # torch.chunk: a 1-row tensor leaves rank 1 empty
            assert torch.equal(part, rows[rank] if rank < len(rows) else exported[name][:0])


def test_fsdp_swapped_model_evaluates_like_the_export(out):
    exported = torch.load(out / "fsdp_export.pt", weights_only=True)
    model = workers.make_model()
    model.load_state_dict(exported)
    x, y = workers.digits()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    for rank in range(WORLD):
        assert load(out, "fsdp", rank)["swapped_loss"] == pytest.approx(loss, rel=1e-6)


def test_fsdp_swapped_after_an_evaluation_uses_the_cmd_weights_and_leaves_none_behind(out):
    """FSDP2 keeps the root module's own parameters unsharded after a forward without backward: the block must
    not run on those copies of the trained weights, nor leave copies of the CMD weights after it."""
    for rank in range(WORLD):
        got = load(out, "fsdp", rank)
        assert got["swapped_loss"] != got["trained_loss"]
        assert got["after_loss"] == got["trained_loss"]


def test_fsdp_export_of_a_partial_recorder_holds_the_other_parameters_whole(out):
    exported = torch.load(out / "fsdp_partial_export.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in exported.values())  # no DTensor shard of a rank
    model = workers.make_model()
    model.load_state_dict(exported)  # loads into the plain model
    assert torch.equal(exported["scale"], load(out, "fsdp_partial", 0)["scale"])  # the live weight, not recorded


def test_fsdp_swapped_without_the_model_is_refused(out):
    for rank in range(WORLD):
        assert "swapped() under FSDP2 needs the model: pass model=" in load(out, "fsdp_partial", rank)["refused"]


def test_fsdp_each_rank_holds_about_half_the_statistics(out, single):
    _, single = single
    whole = single.nbytes()["statistics"]
    held = [load(out, "fsdp", rank)["statistics_bytes"] for rank in range(WORLD)]
    for b in held:
        assert abs(b - whole / WORLD) < 0.05 * whole
    # the per-weight statistics are split; only the M per-reference values are held on both ranks
    M = workers.CONFIG["modes"]
    assert sum(held) == whole + (WORLD - 1) * 3 * M * 4


def test_fsdp_resume_from_sharded_checkpoint_continues_identically(out):
    for rank in range(WORLD):
        through, resumed = load(out, "fsdp", rank), load(out, "fsdp_resumed", rank)
        assert resumed["num_records"] == through["num_records"]
        s_through, s_resumed = flat_state(through["state"]), flat_state(resumed["state"])
        assert s_through.keys() == s_resumed.keys()
        for key in s_through:
            assert torch.equal(s_resumed[key], s_through[key]), key
        for key in FIT:
            assert torch.equal(resumed[key], through[key]), key


def test_fsdp_state_of_another_rank_is_refused(out):
    for rank in range(WORLD):
        message = load(out, "fsdp_other_shard", rank)["refused"]
        # the rows each statistic holds are part of the state: another rank's rows are named and refused
        assert "a shard saved by another rank, or of another sharding" in message and "this rank holds rows" in message


def test_replicate_and_shard0_dtensors_fit_like_plain_tensors_in_compact_form(out):
    for rank in range(WORLD):
        got = load(out, "replicated", rank)
        assert got["sharded"]["compact"]
        assert_same_fit(got["sharded"], got["plain"], rtol=1e-6, atol=1e-7)
        assert got["sharded"]["statistics_bytes"] < got["plain"]["statistics_bytes"]


def test_nan_on_one_rank_skips_the_record_on_every_rank(out):
    for rank in range(WORLD):
        got = load(out, "replicated", rank)
        assert got["sharded"]["skipped"] == got["plain"]["skipped"] == 1
        assert got["sharded"]["num_records"] == 8
        assert got["skip_warnings"] == 2  # the sharded and the plain recorder each warned once


@pytest.mark.parametrize("case, placement", [("shard1", "Shard(dim=1)"), ("partial", "Partial(sum)"),
                                             ("mesh2d", "2-D device mesh")])
def test_unsupported_placement_is_refused_naming_the_parameter(out, case, placement):
    for rank in range(WORLD):
        message = load(out, "placements", rank)[case]
        assert "parameter 'weight'" in message and placement in message


# ---------------------------------------------------------------------------------- one process
def test_plain_parameters_are_whole_and_this_process_writes():
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    info = ShardInfo.of(params)
    assert type(info) is ShardInfo and info.describe() == {"kind": "whole"}
    assert info.local_offset(0, 5) == 5
    assert is_writer() == (not dist.is_initialized() or dist.get_rank() == 0)
    rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.1), modes=1, samples=2, warmup=2)
    assert read_meta(rec.state_dict())["shards"] == {"kind": "whole"}
