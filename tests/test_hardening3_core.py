"""Third hardening round (issue 22), the recorder's lifecycle: re-entrant observers with offload, records
that must reach the observers by exit, a dropped recorder, ranks that must agree, swapped() and training,
copies, and parameters replaced after construction. Each test fails on the code before the round."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import cmd_online as cmdo
import cmd_online.recording as recording_module
from _spawn import run_ranks
from _states import assert_same, leaves
from cmd_online.offload import OffloadError
from cmd_online.stats import StreamingMoments
from cmd_online.window import SnapshotMoments

ROOT = Path(__file__).resolve().parent.parent


def linear(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(8, 5)).pow(2).mean().backward()
    optimizer.step()


def within(seconds, fn):
    """fn() in a thread; its result, or a test failure (not a hung suite) if it takes longer."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s (hung)")
    if "error" in out:
        raise out["error"]
    return out["value"]


def slow_worker(monkeypatch, seconds=0.01):
    """The offload worker behind training: records are still pending when observers are told (both forms of
    the statistics: the default keeps snapshots, SnapshotMoments, whose update is its own)."""
    for kind in (StreamingMoments, SnapshotMoments):
        update = kind.update

        def slow(stats, *args, update=update, **kwargs):
            if threading.current_thread().name == "cmd_online-offload":
                time.sleep(seconds)
            return update(stats, *args, **kwargs)

        monkeypatch.setattr(kind, "update", slow)


def assert_same_state(a, b):
    assert_same(leaves(a.state_dict()), leaves(b.state_dict()))


# ------------------------------------------------------------------ 1. re-entrancy in the offload hand-off
@pytest.mark.parametrize("offload", [False, True])
def test_1_an_observer_that_records_at_the_end_of_the_warmup_does_not_hang(offload):
    """The issue's reproducer: with offload it spun forever in Offload.settle."""
    def run():
        model, optimizer = linear()

        class Extra:
            done = False

            def on_record(self, rec, i):
                if i == 1 and not self.done:
                    self.done = True
                    rec.record()

        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=offload,
                               callbacks=[Extra()])
        for _ in range(5):
            step(model, optimizer)
            rec.record()
        return rec.num_records

    assert within(60, run) == 6


@pytest.mark.parametrize("at, times", [(1, 1), (2, 1), (4, 3), (0, 5)])
def test_1_records_taken_by_an_observer_with_offload_equal_the_same_records_without(monkeypatch, at, times):
    """An observer that takes ``times`` records when told of record ``at`` (at the warm-up's end, in tracking;
    three at once used to wait forever for a staging buffer): each record is told once, in order, the
    observer reads the state of its own records, and the statistics are bit-identical to a recorder without
    offload that records at the same moments."""
    slow_worker(monkeypatch)

    def run():
        model, optimizer = linear()
        mirror = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, freeze_modes_after=4)
        told, seen = [], []

        class Extra:
            done = False

            def on_record(self, rec, i):
                told.append(i)
                if i == at and not self.done:
                    self.done = True
                    for _ in range(times):
                        mirror.record()
                        rec.record()
                        seen.append(rec.num_records == told[-1] + 1)  # its own record, applied and told

        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, freeze_modes_after=4,
                               offload=True, callbacks=[Extra()])
        for _ in range(8):
            step(model, optimizer)
            mirror.record()
            rec.record()
        rec.close()
        return rec, mirror, told, seen

    rec, mirror, told, seen = within(120, run)
    assert rec.num_records == mirror.num_records == 8 + times
    assert told == list(range(8 + times)) and seen == [True] * times
    assert_same_state(rec, mirror)


def test_1_load_state_dict_inside_an_observer_applies_the_pending_records_first(monkeypatch):
    """A record pending while an observer loads a state used to be applied on top of the loaded state (a
    record gathered for the tracking phase, applied in the warm-up: OffloadError)."""
    slow_worker(monkeypatch, 0.05)

    def run():
        model, optimizer = linear()
        saved, after = {}, []

        class Loader:
            def on_record(self, rec, i):
                if i == 2:
                    saved["state"] = copy_state(rec)  # the state of the record told: 3 records
                if i == 4 and "loaded" not in saved:
                    saved["loaded"] = True
                    rec.load_state_dict(saved["state"])
                    saved["inside"] = rec.num_records

        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=True, callbacks=[Loader()])
        for _ in range(14):
            step(model, optimizer)
            weights = [p.detach().clone() for p in model.parameters()]
            rec.record()
            if saved.get("loaded"):  # this call's own record comes after the load (its observers ran first)
                after.append(weights)
        rec.close()
        return rec, saved, after

    rec, saved, after = within(120, run)
    assert saved["inside"] == 3 and rec.num_records == 3 + len(after) and len(after) >= 2
    model, optimizer = linear()
    plain = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3)
    plain.load_state_dict(saved["state"])
    for weights in after:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
        plain.record()
    got, want = leaves(rec.state_dict()), leaves(plain.state_dict())
    del got["meta.steps"], want["meta.steps"]  # the optimizer steps, which the plain recorder did not see
    assert_same(got, want)


def copy_state(rec):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in rec.state_dict().items()}


def test_1_close_inside_an_observer_tells_every_pending_record_before_on_close(monkeypatch):
    """close() from an observer used to tell on_close while records taken before it were still pending
    (they were told after on_close)."""
    slow_worker(monkeypatch, 0.1)
    events, calls = [], []

    class Closer:
        def on_record(self, rec, i):
            events.append(i)
            if i == 4:
                calls.append(len(loop))  # records taken before close(): one per record() call begun before
                rec.close()

        def on_close(self, rec):
            events.append("close")

    loop = []

    def run():
        model, optimizer = linear()
        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=True, callbacks=[Closer()])
        for _ in range(6):
            step(model, optimizer)
            rec.record()
            loop.append(1)
        return rec.num_records

    assert within(60, run) == 6
    close = events.index("close")
    assert calls[0] >= 6  # the worker was behind (two in flight at most): record 5 was pending at the close
    assert events[:close] == list(range(calls[0])) and events[close + 1:] == list(range(calls[0], 6))


def test_1_the_record_whose_settle_reports_a_failure_is_still_taken(monkeypatch):
    """The record after the one that ends the warm-up settles first; the worker's failure, reported there,
    used to lose that record too (a failure the record's own first check had not seen yet)."""
    cluster = recording_module.cluster
    calls = []

    def slow_then_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # the next record() starts meanwhile: its first check sees no failure yet
            raise MemoryError("no room for the clustering")
        return cluster(*args, **kwargs)

    monkeypatch.setattr(recording_module, "cluster", slow_then_failing)
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=True)
    for _ in range(3):
        step(model, optimizer)
        rec.record()
    step(model, optimizer)
    with pytest.raises(OffloadError, match="no room for the clustering"):
        rec.record()  # its settle waits for the clustering that fails; this record ends the warm-up instead
    assert rec.num_records == 3 and rec.phase == "tracking"


@pytest.mark.parametrize("offload", [False, True])
def test_1_a_freeze_that_fails_still_tells_its_record_and_comes_again(monkeypatch, offload):
    """The record whose freeze failed was taken but never told to the observers (with offload its failure
    went to the worker before the record was handed over)."""
    dtype, calls = recording_module.mode_dtype, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the modes")
        return dtype(*args, **kwargs)

    monkeypatch.setattr(recording_module, "mode_dtype", flaky)
    told = []

    class Journal:
        def on_record(self, rec, i):
            told.append(i)

    model, optimizer = linear()
    # k ≥ 5: the full form, frozen by the recorder (k ≤ 4 freezes inside the record: tests/test_lean.py)
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, freeze_modes_after=5, offload=offload,
                           callbacks=[Journal()])
    errors = 0
    for _ in range(8):
        step(model, optimizer)
        try:
            rec.record()
        except (MemoryError, OffloadError) as e:
            errors += 1
            assert "no room for the modes" in str(e)
    try:
        rec.close()
    except OffloadError:
        errors += 1
    assert errors == 1 and rec.num_records == 8 and told == list(range(8))
    assert rec.moments.compact  # the freeze came again at the next record


# ------------------------------------------------------------------ 2. every record reaches the observers
SCRIPT = """
import sys, time, torch
sys.path.insert(0, {root!r})
import cmd_online as cmdo
from cmd_online.stats import StreamingMoments
from torch.utils.tensorboard import SummaryWriter

update = StreamingMoments.update
def slow(stats, *args, **kwargs):  # the worker behind training: records are in flight at the end
    time.sleep(0.05)
    return update(stats, *args, **kwargs)
StreamingMoments.update = slow

class Journal:
    def on_record(self, rec, index):
        with open({journal!r}, "a") as f:
            f.write(f"{{index}}\\n")

def main():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # the full form: StreamingMoments.update, slowed above, applies every record
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=True, callbacks=[Journal()],
                           writer=SummaryWriter({logdir!r}), log_every=2, freeze_modes_after=None)
    for _ in range(8):
        optimizer.zero_grad(); model(torch.randn(8, 5)).pow(2).mean().backward(); optimizer.step()
        rec.record()
    return rec

{ending}
"""


@pytest.mark.parametrize("ending", ["rec = main()  # a script that ends without close()",
                                    "main()  # the recorder dropped when main returns",
                                    "main(); import gc; gc.collect(); time.sleep(0.5)"])
def test_2_every_record_reaches_the_observers_and_tensorboard_by_exit(tmp_path, ending):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    journal, logdir = tmp_path / "journal.txt", tmp_path / "tb"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT), journal=str(journal), logdir=str(logdir), ending=ending))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, capture_output=True)
    assert journal.read_text().split() == [str(i) for i in range(8)]
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("cmd/reference/mode_00")] == list(range(2, 8))


def test_2_a_recorder_dropped_while_its_worker_applies_a_record_still_tells_its_observers(monkeypatch):
    """The training thread lets go of the recorder while the worker applies its last record. The worker holds
    only the recording it applies records to, never the recorder (it once held the last reference and
    finalised the recorder on its own thread, which cannot wait for itself): the recorder is finalised on the
    training thread, waits there for the record in flight, and tells it before it is freed."""
    entered, release = threading.Event(), threading.Event()
    update = StreamingMoments.update

    def held(stats, *args, **kwargs):
        if threading.current_thread().name == "cmd_online-offload" and stats.count == 2:  # record 4
            entered.set()
            assert release.wait(60)
        return update(stats, *args, **kwargs)

    monkeypatch.setattr(StreamingMoments, "update", held)
    told = []

    class Journal:
        def on_record(self, rec, i):
            told.append((i, threading.current_thread().name))

    def made():
        model, optimizer = linear()
        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=True, callbacks=[Journal()],
                               freeze_modes_after=None)  # the full form: StreamingMoments.update is held above
        for _ in range(4):
            step(model, optimizer)
            rec.record()
        assert rec.num_records == 4  # every record told: the worker applies the next one at once
        step(model, optimizer)
        rec.record()
        assert entered.wait(60)  # the worker is inside record 4
        threading.Timer(0.2, release.set).start()  # the worker finishes it while the recorder is being dropped
        return weakref.ref(rec)

    ref = made()  # dropped here: the finaliser waits for record 4
    assert release.is_set() and ref() is None
    assert [i for i, _ in told] == list(range(5))
    assert told[-1][1] == threading.current_thread().name  # told on the training thread, not the worker


# ------------------------------------------------------------------ 3. a dropped recorder is freed
@pytest.mark.parametrize("cycle", [False, True], ids=["plain", "observer_holds_it"])
@pytest.mark.parametrize("offload", [False, True])
def test_3_a_dropped_recorder_is_freed_and_records_no_more(offload, cycle, tmp_path):
    """The optimizer's step-hook dict held the bound method ``_after_step``: a dropped recorder lived on, its
    worker ran, and with record_every it kept recording. An observer that keeps the recorder (a reference
    cycle) must not keep it alive either: the garbage collector frees the cycle."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model, optimizer = linear()
    writer = SummaryWriter(str(tmp_path))
    told = []

    class Journal:
        def on_record(self, rec, i):
            told.append(i)
            if cycle:
                self.rec = rec

    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=offload, record_every=1,
                           writer=writer, callbacks=[Journal()])
    for _ in range(4):
        step(model, optimizer)
    assert rec.num_records == 4
    worker = [t for t in threading.enumerate() if t.name == "cmd_online-offload"][-1] if offload else None
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert ref() is None
    assert len(optimizer._optimizer_step_post_hooks) == 0  # the hook went with it
    for _ in range(3):
        step(model, optimizer)  # training goes on; nothing records
    assert told == [0, 1, 2, 3]
    if worker is not None:
        worker.join(30)
        assert not worker.is_alive()  # and the worker thread ended
    writer.close()


def test_3_a_closed_recorder_is_freed_too_and_its_hook_removed_once():
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, record_every=1)
    step(model, optimizer)
    rec.close()
    assert len(optimizer._optimizer_step_post_hooks) == 0
    other = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, record_every=1)
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert ref() is None and len(optimizer._optimizer_step_post_hooks) == 1  # the other recorder's hook stays
    step(model, optimizer)
    assert other.num_records == 1


# ------------------------------------------------------------------ 9. training inside swapped()
def test_9_an_optimizer_step_inside_swapped_warns_once_and_takes_no_record():
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, record_every=1)
    for _ in range(5):
        step(model, optimizer)
    trained = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"optimizer.step\(\) inside swapped\(\).*the step is lost") as caught:
        with rec.swapped():
            for _ in range(3):
                step(model, optimizer)
    assert sum("inside swapped" in str(w.message) for w in caught) == 1
    assert rec.num_records == 5  # the CMD weights trained inside never entered the statistics
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))  # the trained weights are back
    step(model, optimizer)
    assert rec.num_records == 6  # and record_every goes on where it was


def test_9_record_inside_swapped_is_refused_and_changes_nothing():
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3)
    for _ in range(5):
        step(model, optimizer)
        rec.record()
    before = leaves(rec.state_dict())
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in before.items()}
    with rec.swapped():
        with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\).*CMD weights"):
            rec.record()
        thread_error = []
        thread = threading.Thread(target=lambda: thread_error.append(pytest.raises(RuntimeError, rec.record)))
        thread.start()
        thread.join(30)
        assert thread_error  # from another thread too: the parameters hold CMD weights for everyone
    assert_same(leaves(rec.state_dict()), before)
    rec.record()  # after the block it records again
    assert rec.num_records == 6


# ------------------------------------------------------------------ 10. copies
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "torch.save"])
def test_10_copying_or_pickling_a_recorder_says_to_use_state_dict(tmp_path, offload, how):
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3, offload=offload)
    step(model, optimizer)
    rec.record()
    do = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps,
          "torch.save": lambda r: torch.save(r, tmp_path / "rec.pt")}[how]
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\).*load_state_dict"):
        do(rec)
    step(model, optimizer)
    rec.record()
    assert rec.num_records == 2


# ------------------------------------------------------------------ 11. parameters replaced after construction
def test_11_parameters_replaced_by_load_state_dict_assign_are_named_and_refused(tmp_path):
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3)
    for _ in range(4):
        step(model, optimizer)
        rec.record()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.warns(RuntimeWarning, match=r"'weight', 'bias' of the model are no longer the tensors recorded"):
        rec.record()
    for what, call in [("swapped", lambda: rec.swapped().__enter__()), ("cmd_state_dict", rec.cmd_state_dict),
                       ("export", lambda: rec.export(tmp_path / "cmd.pt"))]:
        with pytest.raises(ValueError, match=rf"^{what}: parameter\(s\) 'weight', 'bias' of the model .*assign=True"):
            call()
    assert not (tmp_path / "cmd.pt").exists()


def test_11_a_parameter_replaced_in_the_optimizer_of_a_recorder_without_model_is_named():
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, modes=2, samples=10, warmup=3)
    for _ in range(4):
        step(model, optimizer)
        rec.record()
    optimizer.param_groups[0]["params"][1] = torch.nn.Parameter(model.bias.detach().clone())
    with pytest.warns(RuntimeWarning, match=r"param_groups.0.params.1' of the optimizer are no longer"):
        rec.record()
    with pytest.raises(ValueError, match=r"^swapped: parameter\(s\) 'param_groups.0.params.1' of the optimizer"):
        rec.swapped().__enter__()


def test_11_parameters_left_in_place_are_not_reported():
    model, optimizer = linear()
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3)
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})  # copied into the same tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            step(model, optimizer)
            rec.record()
        with rec.swapped():
            pass
        rec.cmd_state_dict()


# ------------------------------------------------------------------ 5. the ranks agree (2 gloo processes)
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import _dist_workers as workers

    out = tmp_path_factory.mktemp("agree")
    run_ranks(workers.run, (WORLD, f"file://{out}/store", str(out), list(workers.LIFECYCLE)), WORLD, 240,
              "the distributed workers (a collective mismatch hangs)")
    return out


def rank_result(out, name, rank):
    error = out / f"{name}_rank{rank}.error"
    if error.exists():
        pytest.fail(f"rank {rank} failed in {name}:\n{error.read_text()}")
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("offload", [False, True])
def test_5_a_record_that_fails_on_one_rank_is_taken_on_none_and_training_goes_on(ranks, offload):
    """FSDP2 on 2 ranks: rank 1's clustering at the end of the warm-up raises once; the user catches it and
    trains on. The record used to be taken on rank 0 only: the next record aborted every rank."""
    got = [rank_result(ranks, "agree_warmup", rank)[offload] for rank in range(WORLD)]
    # rank 1 raised its own error, rank 0 warned that rank 1 failed; neither took the record
    if offload:  # raised as the worker's failure, agreed on the training thread
        assert got[1]["outcomes"][2].startswith("OffloadError: a record applied in the background failed: "
                                                "MemoryError('simulated')")
    else:
        assert got[1]["outcomes"][2] == "MemoryError: simulated"
    assert got[0]["outcomes"][2] is False
    cause = "OffloadError: a record applied" if offload else "MemoryError: simulated"
    assert any(f"(the end of the warm-up) was not taken on any rank: it failed on rank 1 ({cause}" in w
               for w in got[0]["warnings"])
    for g in got:
        assert [o for i, o in enumerate(g["outcomes"]) if i not in (2, 7)] == [True] * 7
        assert g["num_records"] == 8 and g["phase"] == "tracking" and g["compact"]
        assert g["loss_after"] < g["loss_before"]  # training went on
    for key in ("a", "b", "modes", "reference_index", "references"):
        assert torch.equal(got[0]["fit"][key], got[1]["fit"][key]), key  # one CMD model, gathered on both


def test_5_a_freeze_that_fails_on_one_rank_happens_on_none_then_on_both(ranks):
    for offload in (False, True):
        got = [rank_result(ranks, "agree_warmup", rank)[offload] for rank in range(WORLD)]
        assert any("freeze of the modes failed on rank 1" in w for w in got[0]["warnings"])
        assert "no room for the modes" in got[1]["freeze_error"]
        assert got[0]["compact_at"] == got[1]["compact_at"]  # the ranks froze at the same record


def test_5_a_query_that_fails_on_one_rank_raises_on_every_rank_and_the_next_one_works(ranks):
    got = [rank_result(ranks, "agree_queries", rank) for rank in range(WORLD)]
    assert got[1]["trajectory"] == "MemoryError: simulated"
    assert got[0]["trajectory"] == "RuntimeError: CMDRecorder.trajectory() failed on rank 1 (MemoryError: " \
                                   "simulated); nothing was gathered on any rank"
    assert got[0]["again"] == got[1]["again"] == "ok"


def test_5_a_state_refused_on_one_rank_is_loaded_on_none(ranks):
    got = [rank_result(ranks, "agree_queries", rank) for rank in range(WORLD)]
    assert got[1]["load"].startswith("ValueError: ")
    assert got[0]["load"].startswith("ValueError: the state was refused on rank 1 (ValueError: ")
    assert "nothing was loaded on any rank" in got[0]["load"]
    assert got[0]["records_after_load"] == got[1]["records_after_load"] == 7  # both unchanged, and recording
