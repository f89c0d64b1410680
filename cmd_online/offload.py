"""Records applied in the background from host copies of the weights (``CMDRecorder(offload=True)``).

The training thread copies the weights (and the few gathered reference or sample values) into a
staging buffer in host memory — pinned, with non-blocking copies on a side stream on CUDA — and
hands the record to one worker thread, which applies it to statistics held in host memory. The
training stream only waits for the copy (``wait_stream``, on the device), never the host for the
device. A fixed number of staging buffers bounds the records in flight: a record waits for a free
buffer. :meth:`Offload.settle` waits for every pending record; an exception in the worker is kept and
raised by the next :meth:`Offload.check` on the training thread.

The owner is told of each applied record on the training thread, later (``settle``'s ``deliver``). While
``hold`` is set (the owner has observers), the worker applies a record only once the one before it has
been told, so that whoever is told of record i reads the state of record i exactly.
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

SLOTS = 2  # staging buffers: records in flight at most
EXIT_WAIT = 60.0  # seconds the interpreter's exit waits for the records in flight
_LIVE: "weakref.WeakSet[Offload]" = weakref.WeakSet()


@dataclass
class Job:
    """One record handed to the worker: host copies, ready once ``event`` (CUDA) has completed."""

    weights: list[torch.Tensor]
    values: torch.Tensor
    finite: torch.Tensor | None  # the finite check made on the device (sharded runs), else None
    tracking: bool  # the values are reference values (else sampled weights of the warm-up)
    event: torch.cuda.Event | None
    slot: int
    check_finite: bool = True  # the owner's setting when the record was taken


class OffloadError(RuntimeError):
    """A record applied in the background failed; ``__cause__`` is the worker's exception."""


class Offload:
    """Staging buffers, a side stream and one worker thread that applies records with ``apply(job)``.

    Args:
        weights (list of tensors): this process's flat weights, one per parameter (shapes, dtypes, device).
        values (int): the most gathered values a record carries (K, the samples).
        values_dtype (torch.dtype): their dtype.
        apply (callable): applies one :class:`Job`; held weakly (a bound method: the owner can be freed).
        slots (int): staging buffers, i.e. records in flight at most (default :data:`SLOTS`).
    """

    def __init__(self, weights: Sequence[torch.Tensor], values: int, values_dtype: torch.dtype,
                 apply: Callable[[Job], None], slots: int = SLOTS):
        self.device = weights[0].device
        cuda = self.device.type == "cuda"
        empty = lambda n, dtype: torch.empty(n, dtype=dtype, pin_memory=cuda)  # noqa: E731
        self._weights = [[empty(w.numel(), w.dtype) for w in weights] for _ in range(slots)]
        self._values = [empty(values, values_dtype) for _ in range(slots)]
        self._finite = [empty(1, torch.bool) for _ in range(slots)]
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._free: queue.Queue = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._jobs: queue.Queue = queue.Queue()
        self.errors: collections.deque = collections.deque()
        self.gate = Gate()
        self._thread = threading.Thread(target=_work, name="cmd_online-offload", daemon=True,
                                        args=(self._jobs, self._free, weakref.WeakMethod(apply), self.errors,
                                              self.gate))
        self._thread.start()
        _LIVE.add(self)

    def nbytes(self) -> int:
        """Bytes of the host staging buffers."""
        tensors = [t for slot in self._weights for t in slot] + self._values + self._finite
        return sum(t.numel() * t.element_size() for t in tensors)

    def submit(self, weights: Sequence[torch.Tensor], values: torch.Tensor, finite: torch.Tensor | None,
               tracking: bool, check_finite: bool = True) -> None:
        """Copy one record into a free staging buffer (waiting for one if all are in flight) and queue it.

        If the copy fails or is interrupted, the buffer is free again and nothing is queued."""
        self.check()
        slot = self._free.get()
        try:
            job = self._stage(slot, weights, values, finite, tracking, check_finite)
        except BaseException:
            self._free.put(slot)
            raise
        self._jobs.put(job)

    def _stage(self, slot: int, weights: Sequence[torch.Tensor], values: torch.Tensor, finite: torch.Tensor | None,
               tracking: bool, check_finite: bool) -> Job:
        staged, staged_values = self._weights[slot], self._values[slot][:values.numel()]
        staged_finite = None if finite is None else self._finite[slot]
        event = None
        if self._stream is None:
            for buffer, w in zip(staged, weights):
                buffer.copy_(w)
            staged_values.copy_(values)
            if finite is not None:
                staged_finite.copy_(finite.reshape(1))
        else:
            training = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(training)  # the copies read what the training stream wrote
            with torch.cuda.stream(self._stream):
                for buffer, w in zip(staged, weights):
                    buffer.copy_(w, non_blocking=True)
                staged_values.copy_(values, non_blocking=True)
                if finite is not None:
                    staged_finite.copy_(finite.reshape(1), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            for fresh in (values, finite):  # made on the training stream, read on the side stream
                if fresh is not None:
                    fresh.record_stream(self._stream)
            training.wait_stream(self._stream)  # the next optimizer step must not overwrite the weights first
        return Job(staged, staged_values, staged_finite, tracking, event, slot, check_finite)

    def is_worker(self) -> bool:
        """True on the worker thread."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Let the worker thread end once the queued records are applied (when the owner is freed)."""
        self.gate.open()
        self._jobs.put(None)

    def pending(self) -> int:
        """Records queued or being applied (an estimate: the worker may finish one meanwhile)."""
        return self._jobs.unfinished_tasks

    def settle(self, deliver: Callable[[], None]) -> None:
        """Wait until every queued record is applied and told, telling them with ``deliver()`` (which
        calls :meth:`Gate.told` once per record it tells) as they come; then :meth:`check`."""
        gate = self.gate
        while True:
            deliver()
            with gate.changed:
                if gate.untold > 0:  # told of, not yet delivered
                    continue
                if self._jobs.unfinished_tasks == 0:
                    break
                gate.changed.wait()
        self.check()

    def check(self) -> None:
        """Raise the worker's first exception since the last check, if any (``OffloadError``)."""
        if self.errors:
            error = self.errors.popleft()
            self.errors.clear()
            raise OffloadError(f"a record applied in the background failed: {error!r}; the statistics hold every "
                               f"record before it, and the records after it") from error


class Gate:
    """Records applied but not yet told, and the worker's wait for them while ``hold`` is set."""

    def __init__(self):
        self.changed = threading.Condition()
        self.untold = 0  # may dip below 0 for a moment: a record can be told before the worker counts it
        self.hold = False
        self._open = False

    def pass_(self) -> None:
        """The worker, before it applies a record: wait while ``hold`` and a record is untold."""
        with self.changed:
            while self.hold and self.untold > 0 and not self._open:
                self.changed.wait()

    def applied(self) -> None:
        """The worker: one more record to tell (or one failed: nothing to tell, but the job is done)."""
        with self.changed:
            self.untold += 1
            self.changed.notify_all()

    def told(self) -> None:
        """The training thread: one record told."""
        with self.changed:
            self.untold -= 1
            self.changed.notify_all()

    def finished(self) -> None:
        """The worker: a job is done (applied, failed or skipped)."""
        with self.changed:
            self.changed.notify_all()

    def open(self) -> None:
        """Never hold again (the owner is gone)."""
        with self.changed:
            self._open = True
            self.changed.notify_all()


@atexit.register
def _quiesce() -> None:
    """At the interpreter's exit: let every worker finish the records in flight (unheld), so that no
    thread is inside a torch operation while the interpreter shuts down (a C++ terminate otherwise)."""
    deadline = time.monotonic() + EXIT_WAIT
    for offload in list(_LIVE):
        offload.gate.open()
        while offload.pending() and time.monotonic() < deadline:
            time.sleep(0.005)


def _work(jobs: queue.Queue, free: queue.Queue, apply_ref: weakref.WeakMethod, errors: collections.deque,
          gate: Gate) -> None:
    """The worker thread: apply each job once its copies have landed and the record before it was told;
    keep exceptions for the training thread. Between jobs it holds no reference to its owner."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if job.event is not None:
                job.event.synchronize()
            gate.pass_()
            apply = apply_ref()
            if apply is None:  # the recorder was freed
                return
            try:
                apply(job)
            finally:
                del apply
            gate.applied()
        except BaseException as e:  # noqa: BLE001 - everything is reported on the training thread
            traceback.clear_frames(e.__traceback__)  # keep the lines, not the owner in the frames' locals
            errors.append(e)
        finally:
            if job is not None:
                free.put(job.slot)
            jobs.task_done()
            gate.finished()
            job = None
