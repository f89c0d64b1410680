"""offload=True: the same statistics as without, from a background worker; and the flat kernel's device-side skips."""

from __future__ import annotations

import gc
import threading
import time
import warnings
import weakref

import pytest
import torch

import cmd_online as cmdo
import cmd_online.recording as recording_module
from _devices import DEVICES
from _states import assert_same, leaves
from cmd_online.offload import OffloadError
from cmd_online.stats import StreamingMoments


def model_and_walk(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))
    g = torch.Generator().manual_seed(seed + 1)
    steps = [[torch.randn(p.shape, generator=g) * 0.1 for p in model.parameters()] for _ in range(40)]
    return model, steps


def walk(model, rec, steps, start=0, stop=None):
    for step in steps[start:stop]:
        with torch.no_grad():
            for p, d in zip(model.parameters(), step):
                p.add_(d)
        rec.record()


def run(records, resume_at=None, nan_at=(), **kwargs):
    model, steps = model_and_walk()
    make = lambda: cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3,  # noqa: E731
                                    samples=40, warmup=4, **kwargs)
    rec = make()
    for t, step in enumerate(steps[:records]):
        with torch.no_grad():
            for p, d in zip(model.parameters(), step):
                p.add_(d)
            if t in nan_at:
                model[0].bias[0] += float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings are tested elsewhere
            rec.record()
            if t in nan_at:
                with torch.no_grad():
                    model[0].bias[0] = 0.0
        if t == resume_at:
            state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in rec.state_dict().items()}
            rec.close()
            rec = make()
            rec.load_state_dict(state)
    return rec


def assert_same_state(a, b):
    assert_same(leaves(a.state_dict()), leaves(b.state_dict()))


@pytest.mark.parametrize("records", [3, 4, 9], ids=["warmup", "first_tracking", "tracking"])
def test_offload_keeps_bit_identical_statistics(records):
    assert_same_state(run(records), run(records, offload=True))


def test_offload_freeze_and_resume_are_bit_identical():
    plain = run(20, freeze_modes_after=3)
    offloaded = run(20, freeze_modes_after=3, offload=True)
    resumed = run(20, freeze_modes_after=3, offload=True, resume_at=8)
    assert offloaded.moments.compact
    assert_same_state(plain, offloaded)
    assert_same_state(plain, resumed)
    for at in (5, -1):
        for x, y in zip(plain.cmd_parameters(at), resumed.cmd_parameters(at)):
            assert torch.equal(x, y)


def test_offload_skips_non_finite_records_and_warns_at_the_next_call():
    plain = run(12, nan_at=(2, 7))
    offloaded = run(12, nan_at=(2, 7), offload=True)
    assert offloaded.skipped_records == plain.skipped_records == 2
    assert_same_state(plain, offloaded)
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True, freeze_modes_after=None)  # the full form: its update is held above
    walk(model, rec, steps, 0, 5)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    assert rec.record() is True  # known only later: the check runs in the background
    with pytest.warns(RuntimeWarning, match=r"record 5 skipped \(offloaded\).*2\.weight"):
        assert rec.num_records == 5


def test_offload_tells_observers_on_the_training_thread_in_order():
    events = []

    class Journal:
        def on_tracking_start(self, rec):
            events.append(("start", threading.current_thread() is threading.main_thread()))

        def on_record(self, rec, index):
            events.append((index, threading.current_thread() is threading.main_thread()))

    rec = run(6, offload=True, callbacks=[Journal()])
    rec.close()
    assert events == [(0, True), (1, True), (2, True), ("start", True), (3, True), (4, True), (5, True)]


class Gate:
    """Holds the offload worker inside the statistics update until opened (a real thread, a real update)."""

    def __init__(self, monkeypatch):
        self.entered, self.opened = threading.Event(), threading.Event()
        update = StreamingMoments.update

        def held(stats, *args, **kwargs):
            self.entered.set()
            assert self.opened.wait(120)
            return update(stats, *args, **kwargs)

        monkeypatch.setattr(StreamingMoments, "update", held)


def in_thread(fn):
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("value", fn()))
    thread.start()
    return thread, done


def test_offload_bounds_the_records_in_flight_and_queries_wait(monkeypatch):
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True, freeze_modes_after=None)  # the full form: its update is held above
    walk(model, rec, steps, 0, 4)  # to the end of the warm-up
    reference = run(8, freeze_modes_after=None)
    gate = Gate(monkeypatch)
    staging = rec.nbytes()["staging"]

    def three_records():
        walk(model, rec, steps, 4, 7)
        return True

    thread, done = in_thread(three_records)
    assert gate.entered.wait(60)  # the worker holds the first of them
    thread.join(0.5)
    assert thread.is_alive()  # two staging buffers: the third record waits for one to be free
    gate.opened.set()
    thread.join(60)
    assert done["value"] and not thread.is_alive()
    walk(model, rec, steps, 7, 8)
    query, result = in_thread(lambda: rec.cmd_parameters())
    query.join(60)
    assert all(torch.equal(x, y) for x, y in zip(result["value"], reference.cmd_parameters()))
    assert rec.nbytes()["staging"] == staging  # the staging memory is fixed
    assert rec.num_records == 8


def fail_the_first_clustering(monkeypatch):
    """The clustering at the end of the warm-up raises MemoryError once (in the worker, with offload)."""
    cluster, failures = recording_module.cluster, []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise MemoryError("no room for the clustering")
        return cluster(*args, **kwargs)

    monkeypatch.setattr(recording_module, "cluster", flaky)


def test_a_failure_in_the_worker_surfaces_at_the_next_call_and_loses_nothing(monkeypatch):
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True)
    fail_the_first_clustering(monkeypatch)
    walk(model, rec, steps, 0, 4)  # the fourth record ends the warm-up: its clustering fails in the worker
    with pytest.raises(OffloadError, match="no room for the clustering") as error:
        rec.num_records
    assert isinstance(error.value.__cause__, MemoryError)
    assert rec.num_records == 3 and rec.phase == "warmup"  # the three records before it are kept
    walk(model, rec, steps, 4, 8)  # and recording goes on: the next record ends the warm-up
    assert rec.phase == "tracking" and rec.num_records == 7


@pytest.mark.parametrize("device", DEVICES)
def test_the_flat_kernel_skips_on_the_device_and_counts_lazily(device):
    def recorder(kernel):
        model, steps = model_and_walk()
        model.to(device)
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                               kernel=kernel)
        for t, step in enumerate(steps[:14]):
            with torch.no_grad():
                for p, d in zip(model.parameters(), step):
                    p.add_(d.to(device))
                if t == 9:
                    model[0].bias[1] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                assert rec.record() is (kernel == "flat" or t != 9)
            with torch.no_grad():
                model[0].bias[1] = 0.0 if t == 9 else model[0].bias[1]
        return rec

    blocks = recorder("blocks")
    flat = recorder("flat")
    with pytest.warns(RuntimeWarning, match="1 record.s. skipped"):
        assert flat.num_records == blocks.num_records == 13
    assert flat.skipped_records == 1
    a, b = blocks.trajectory(), flat.trajectory()
    assert torch.equal(a.references, b.references) and torch.equal(a.modes, b.modes)
    torch.testing.assert_close(b.a, a.a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.b, a.b, rtol=1e-5, atol=1e-6)


def test_offload_and_the_flat_kernel_do_not_combine():
    model, _ = model_and_walk()
    with pytest.raises(ValueError, match="kernel='flat'.*offload=True"):
        cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, kernel="flat", offload=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_records_after_the_warmup_never_synchronise():
    model, steps = model_and_walk()
    model.cuda()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4)
    assert rec.moments is None
    walk(model, rec, [[d.cuda() for d in s] for s in steps], 0, 5)
    assert rec.moments.kernel == "flat"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps[5:15]:
            with torch.no_grad():
                for p, d in zip(model.parameters(), step):
                    p.add_(d.cuda(non_blocking=True))
            rec.record()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rec.num_records == 15


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_offload_adds_no_device_memory_and_never_synchronises():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 100)).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=10, samples=1000, warmup=3,
                           offload=True)
    for t in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device="cuda"), alpha=1e-3)
        if t == 5:
            torch.cuda.set_sync_debug_mode("error")
        rec.record()
    torch.cuda.set_sync_debug_mode("default")
    assert rec.num_records == 10 and rec.device.type == "cpu"
    N = sum(p.numel() for p in model.parameters())
    added = torch.cuda.max_memory_allocated() - base
    print(f"offload: device memory added {added} bytes = {added / (4 * N):.4f} float32 per weight")
    assert added < 0.01 * 4 * N  # transient gathers only: no statistics, no scratch on the device


# ---------------------------------------------------------------------------------- second probe round
def test_offload_observers_read_the_state_of_the_record_they_are_told_of(monkeypatch):
    """A worker slower than training (several records applied between two calls) must not let an observer
    of record i see later records: the worker waits for the observers."""
    class Journal:
        def __init__(self):
            self.seen = []

        def on_record(self, rec, index):
            if rec.phase == "tracking":
                self.seen.append((index, rec.num_records, rec.references[:, index].clone(),
                                  [t.clone() for t in rec.cmd_parameters()]))
            else:
                self.seen.append((index, rec.num_records))

    plain = Journal()
    run(10, callbacks=[plain]).close()
    update = StreamingMoments.update

    def slow(stats, *args, **kwargs):
        time.sleep(0.02)
        return update(stats, *args, **kwargs)

    monkeypatch.setattr(StreamingMoments, "update", slow)
    offloaded = Journal()
    run(10, offload=True, callbacks=[offloaded]).close()
    assert [e[:2] for e in offloaded.seen] == [e[:2] for e in plain.seen] == [(i, i + 1) for i in range(10)]
    for a, b in zip(plain.seen, offloaded.seen):
        if len(a) > 2:
            assert torch.equal(a[2], b[2]) and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_an_offload_recorder_is_freed_with_its_worker_thread():
    def made():
        model, steps = model_and_walk()
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                               offload=True)
        walk(model, rec, steps, 0, 6)
        assert rec.num_records == 6
        return weakref.ref(rec), [t for t in threading.enumerate() if t.name == "cmd_online-offload"][-1]

    ref, worker = made()
    gc.collect()
    assert ref() is None  # nothing holds the recorder: not its worker either
    worker.join(30)
    assert not worker.is_alive()  # and the worker ended with it


def test_a_record_that_fails_while_staging_gives_its_buffer_back():
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True)
    walk(model, rec, steps, 0, 6)
    weight = model[0].weight
    trained = weight.data
    for _ in range(3):  # more failures than staging buffers
        weight.data = torch.zeros(20, 20)  # a wrong shape for a moment (the copy into the buffer fails)
        with pytest.raises(RuntimeError):
            rec.record()
        weight.data = trained
    thread, done = in_thread(lambda: walk(model, rec, steps, 6, 9) or rec.num_records)
    thread.join(60)
    assert not thread.is_alive() and done["value"] == 9  # a buffer lost per failure would hang here
    expected = run(9)
    assert all(torch.equal(x, y) for x, y in zip(rec.cmd_parameters(), expected.cmd_parameters()))


def test_queries_are_serialised_with_records_of_other_threads(monkeypatch):
    for offload in (False, True):
        model, steps = model_and_walk()
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40,
                               warmup=4, offload=offload)
        walk(model, rec, steps, 0, 8)
        before = rec.cmd_parameters(at=6)
        fit, entered, opened, calls = StreamingMoments.fit, threading.Event(), threading.Event(), []

        def held(stats, *args, **kwargs):  # the query pauses between two parameters' fits
            if threading.current_thread().name == "query":
                calls.append(1)
                if len(calls) == 2:
                    entered.set()
                    assert opened.wait(60)
            return fit(stats, *args, **kwargs)

        monkeypatch.setattr(StreamingMoments, "fit", held)
        out = {}
        query = threading.Thread(target=lambda: out.setdefault("value", rec.cmd_parameters(at=6)), name="query")
        query.start()
        assert entered.wait(60)
        recording, _ = in_thread(lambda: walk(model, rec, steps, 8, 9))
        recording.join(1.0)
        assert recording.is_alive()  # the record waits for the query
        opened.set()
        query.join(60)
        recording.join(60)
        monkeypatch.setattr(StreamingMoments, "fit", fit)
        assert all(torch.equal(x, y) for x, y in zip(out["value"], before))  # one state: the one before
        assert rec.num_records == 9


def test_the_call_that_reports_a_worker_failure_still_takes_its_own_record(monkeypatch):
    fail_the_first_clustering(monkeypatch)
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True)
    raised = 0
    for t in range(8):
        try:
            walk(model, rec, steps, t, t + 1)
        except OffloadError:
            raised += 1
        idle(rec)  # the failure, if any, is then reported by the next record() (no query in between)
    assert raised == 1 and rec.num_records == 7  # only the record whose clustering failed is not taken


def idle(rec, timeout=60.0):
    """Wait until the worker has applied every record, without a query (which would report a failure)."""
    deadline = time.monotonic() + timeout
    while rec._offload.pending() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_offload_checks_finiteness_with_the_setting_at_the_record(monkeypatch):
    update = StreamingMoments.update

    def slow(stats, *args, **kwargs):  # a worker behind training: the flag changes before it gets to a record
        time.sleep(0.05)
        return update(stats, *args, **kwargs)

    monkeypatch.setattr(StreamingMoments, "update", slow)
    counts = {}
    for offload in (False, True):
        model, steps = model_and_walk()
        rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40,
                               warmup=4, offload=offload)
        for t in range(8):
            with torch.no_grad():
                for p, d in zip(model.parameters(), steps[t]):
                    p.add_(d)
                if t == 5:
                    model[0].bias[0] = float("nan")
            rec.check_finite = t <= 5  # turned off right after the NaN record, which was taken with it on
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                rec.record()
            rec.check_finite = False
            with torch.no_grad():
                model[0].bias[0] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            counts[offload] = (rec.num_records, rec.skipped_records, bool(torch.isfinite(rec.moments.mean).all()))
    assert counts[True] == counts[False] == (7, 1, True)


def bare_recording(params, kernel=None):
    """A Recording of ``params`` built without a CMDRecorder (the narrow interface the driver uses)."""
    from cmd_online.config import CMDConfig
    from cmd_online.distributed import ShardInfo
    from cmd_online.layout import Layout
    from cmd_online.recording import Recording

    layout = Layout.of_tensors(params, [f"p{i}" for i in range(len(params))])
    config = CMDConfig(modes=3, samples=30, warmup=4, freeze_modes_after=3).for_weights(layout.numel, "test")
    cpu = torch.device("cpu")
    return Recording(config, layout, ShardInfo.of(params), [p.shape for p in params], cpu, cpu, kernel)


def test_the_offload_driver_applies_records_to_a_bare_recording_and_hands_their_events_back():
    """offload.py alone drives a Recording (no recorder): every record is applied on the worker, its event
    (skipped or taken, the phases) comes back in order to the ``tell`` of the call, the statistics equal those
    of the same records taken on this thread, and the worker keeps neither the recording nor its owner alive."""
    from cmd_online.offload import OffloadDriver

    model, steps = model_and_walk()
    params = list(model.parameters())
    direct, offloaded = bare_recording(params), bare_recording(params)
    driver = OffloadDriver(offloaded, [p.detach().reshape(-1) for p in params])
    told = []
    tell = lambda was, now, index: told.append((index, was, now))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, step in enumerate(steps[:9]):
            with torch.no_grad():
                for p, d in zip(params, step):
                    p.add_(d)
                if t == 6:
                    params[0][0, 0] = float("nan")
            weights = [p.detach().reshape(-1).clone() for p in params]
            direct.record(weights, True)
            direct.freeze_when_due()
            driver.record(weights, True, True, tell, lambda: None)
            if t == 6:
                with torch.no_grad():
                    params[0][0, 0] = 0.0
        driver.wait(tell)
    assert [str(w.message) for w in caught if "skipped (offloaded)" in str(w.message)] == [
        "CMDRecorder: record 6 skipped (offloaded): non-finite (NaN/Inf) values in p0; the statistics are unchanged"]
    assert told == [(0, False, False), (1, False, False), (2, False, False), (3, False, True), (4, True, True),
                    (5, True, True), (6, True, True), (7, True, True)]
    assert (offloaded.records(), offloaded.skips()) == (direct.records(), direct.skips()) == (8, 1)
    assert offloaded.stats.compact and torch.equal(offloaded.flat_fit()[0], direct.flat_fit()[0])
    held, stop = weakref.ref(offloaded), driver.stop
    del driver, offloaded
    gc.collect()
    assert held() is None  # the worker, still running, holds the recording weakly
    stop()  # the worker thread ends


def test_a_recording_counts_records_and_skips_alike_on_the_host_and_on_the_device():
    """Recording.records() and skips() are the one count: the blocks kernel counts a skip on the host, the flat
    kernel on the device (attempts minus the device count), and they agree record by record."""
    model, steps = model_and_walk()
    params = list(model.parameters())
    blocks, flat = bare_recording(params, "blocks"), bare_recording(params, "flat")
    counts = {"blocks": [], "flat": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warnings: counted here, not read
        for t, step in enumerate(steps[:10]):
            with torch.no_grad():
                for p, d in zip(params, step):
                    p.add_(d)
            weights = [p.detach().reshape(-1).clone() for p in params]
            if t in (5, 8):  # after the warm-up: the flat kernel checks these on the device
                weights[1][0] = float("inf")
            for name, recording in (("blocks", blocks), ("flat", flat)):
                recording.record(weights, True)
                recording.freeze_when_due()
                counts[name].append((recording.records(), recording.skips()))
    assert flat.counts_on_device and not blocks.counts_on_device
    assert counts["flat"] == counts["blocks"]
    assert counts["blocks"][-1] == (8, 2) and counts["blocks"][5] == (5, 1)
