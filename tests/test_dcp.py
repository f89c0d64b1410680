"""torch.distributed.checkpoint: the recorder saved on one number of ranks resumes, resharded, on another.

Each case records a planted trajectory (tests/_dcp_workers.py) on W₁ gloo processes (FSDP2; one plain
process for W = 1), saves model, optimizer and recorder with ``dcp.save``, builds everything afresh on
W₂ processes, ``dcp.load``s into the fresh recorder, records the rest, and must give the CMD model of
an uninterrupted single-process run, bit for bit.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # the worker module must be importable by the children
import _dcp_workers as workers  # noqa: E402
from _spawn import run_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
FIT = ("references", "reference_index", "a", "b", "modes")


def launch(step: str, world_size: int, out, stop: int, kwargs: dict) -> None:
    if world_size == 1:  # a plain single process: no process group, plain tensors
        workers.phase(step, 1, out, stop, kwargs)
        return
    store = out / f"store_{step}"
    run_ranks(workers.run, (world_size, f"file://{store}", str(out), step, stop, kwargs), world_size, 120,
              f"{step} on {world_size} ranks")
    for rank in range(world_size):
        error = out / f"{step}_rank{rank}.error"
        if error.exists():
            pytest.fail(f"rank {rank} failed to {step}:\n{error.read_text()}")


def uninterrupted(kwargs: dict):
    model, _, rec = workers.build(1, **kwargs)
    workers.record(model, rec, workers.trajectory())
    return rec


@pytest.mark.parametrize("saved, resumed, stop, kwargs", [
    (2, 1, 7, {"freeze_modes_after": None}),  # tracking, full form
    (1, 2, 7, {}),  # the default: the compact form, frozen at the window's record 3
    (2, 4, 2, {}),  # saved during the warm-up
    (4, 2, 9, {"freeze_modes_after": 3}),  # compact form
], ids=["2to1", "1to2", "2to4_warmup", "4to2_compact"])
def test_a_fresh_recorder_resumes_resharded_and_records_on_like_an_uninterrupted_run(tmp_path, saved, resumed,
                                                                                      stop, kwargs):
    kwargs = {"modes": 3, **kwargs}
    launch("save", saved, tmp_path, stop, kwargs)
    launch("load", resumed, tmp_path, stop, kwargs)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert got["loaded_records"] == stop  # the fresh recorder took the checkpoint's records ...
    assert got["num_records"] == workers.RECORDS  # ... and the counter went on
    want = uninterrupted(kwargs).trajectory()
    for name in FIT:
        assert torch.equal(got[name], getattr(want, name)), name
    assert got["compact"] == (kwargs.get("freeze_modes_after", 3) is not None)


@pytest.mark.parametrize("stop", [2, 7], ids=["warmup", "tracking"])
def test_per_rank_torch_save_works_on_a_rank_that_holds_no_rows_of_a_parameter(tmp_path, stop):
    """The planted model's last parameter has one row: under FSDP2 on 2 ranks, rank 1 holds none of it."""
    launch("save_per_rank", 2, tmp_path, stop, {"modes": 3})
    launch("load_per_rank", 2, tmp_path, stop, {"modes": 3})
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    want = uninterrupted({"modes": 3}).trajectory()
    assert got["loaded_records"] == stop and got["num_records"] == workers.RECORDS
    assert all(torch.equal(got[name], getattr(want, name)) for name in FIT)


def test_with_a_threshold_the_mode_bound_fixes_the_state(tmp_path):
    kwargs = {"threshold": 0.5, "max_modes": 4}
    launch("save", 2, tmp_path, 8, kwargs)
    launch("load", 1, tmp_path, 8, kwargs)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    want = uninterrupted(kwargs).trajectory()
    assert all(torch.equal(got[name], getattr(want, name)) for name in FIT)


def test_without_a_mode_bound_a_threshold_state_is_refused_by_a_fresh_recorder(tmp_path):
    import torch.distributed.checkpoint as dcp

    W = workers.trajectory()
    model, optimizer, rec = workers.build(1, threshold=0.5, freeze_modes_after=None)  # the full form: M rows of P
    workers.record(model, rec, W[:8])
    dcp.save({"cmd": rec}, checkpoint_id=str(tmp_path / "dcp"))
    _, _, fresh = workers.build(1, threshold=0.5, freeze_modes_after=None)
    with pytest.raises(ValueError, match=r"no max_modes.*max_modes= \(at least \d+\)"):
        dcp.load({"cmd": fresh}, checkpoint_id=str(tmp_path / "dcp"))
    assert fresh.num_records == 0 and fresh.phase == "warmup"  # refused: nothing changed
    # the default (compact) recorder's state holds one row of P whatever M: a fresh one takes it
    model, optimizer, rec = workers.build(1, threshold=0.5)
    workers.record(model, rec, W[:8])
    dcp.save({"cmd": rec}, checkpoint_id=str(tmp_path / "dcp_default"))
    _, _, fresh = workers.build(1, threshold=0.5)
    dcp.load({"cmd": fresh}, checkpoint_id=str(tmp_path / "dcp_default"))
    assert fresh.num_records == 8 and torch.equal(fresh.trajectory().a, rec.trajectory().a)


def test_a_trajectory_saved_sharded_loads_in_one_process_like_the_gathered_one(tmp_path):
    from cmd_online.checkpoint import load_trajectory

    launch("trajectory", 4, tmp_path, workers.RECORDS, {"modes": 3})
    loaded = load_trajectory(tmp_path / "trajectory")
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    for name, value in gathered.items():
        assert torch.equal(getattr(loaded, name), value), name
    assert loaded.layout.names == tuple(workers.SHAPES)
    want = uninterrupted({"modes": 3}).trajectory()  # and it is the single-process model
    assert torch.equal(loaded.a, want.a) and torch.equal(loaded.modes, want.modes)
    torch.testing.assert_close(loaded.mode_r2, want.mode_r2)
