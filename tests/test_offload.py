"""offload=True: the same statistics as without, from a background worker; and the flat kernel's device-side skips."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import cmd_online as cmdo
import cmd_online.recorder as recorder_module
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
                           offload=True)
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
                           offload=True)
    walk(model, rec, steps, 0, 4)  # to the end of the warm-up
    reference = run(8)
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


def test_a_failure_in_the_worker_surfaces_at_the_next_call_and_loses_nothing(monkeypatch):
    model, steps = model_and_walk()
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=40, warmup=4,
                           offload=True)
    cluster = recorder_module.cluster
    failures = []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise MemoryError("no room for the clustering")
        return cluster(*args, **kwargs)

    monkeypatch.setattr(recorder_module, "cluster", flaky)
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
