"""Records applied in the background from host copies of the weights (``CMDRecorder(offload=True)``).

The training thread copies the weights (and the few gathered reference or sample values) into a
staging buffer in host memory — pinned, with non-blocking copies on a side stream on CUDA — and
hands the record to one worker thread, which applies it to statistics held in host memory. The
training stream only waits for the copy (``wait_stream``, on the device), never the host for the
device. A fixed number of staging buffers bounds the records in flight: a record waits for a free
buffer. :meth:`Offload.drain` waits for every pending record; an exception in the worker is kept and
raised by the next :meth:`Offload.check` or :meth:`Offload.drain` on the training thread.
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

SLOTS = 2  # staging buffers: records in flight at most


@dataclass
class Job:
    """One record handed to the worker: host copies, ready once ``event`` (CUDA) has completed."""

    weights: list[torch.Tensor]
    values: torch.Tensor
    finite: torch.Tensor | None  # the finite check made on the device (sharded runs), else None
    tracking: bool  # the values are reference values (else sampled weights of the warm-up)
    event: torch.cuda.Event | None
    slot: int


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
        self._thread = threading.Thread(target=_work, name="cmd_online-offload", daemon=True,
                                        args=(self._jobs, self._free, weakref.WeakMethod(apply), self.errors))
        self._thread.start()

    def nbytes(self) -> int:
        """Bytes of the host staging buffers."""
        tensors = [t for slot in self._weights for t in slot] + self._values + self._finite
        return sum(t.numel() * t.element_size() for t in tensors)

    def submit(self, weights: Sequence[torch.Tensor], values: torch.Tensor, finite: torch.Tensor | None,
               tracking: bool) -> None:
        """Copy one record into a free staging buffer (waiting for one if all are in flight) and queue it."""
        self.check()
        slot = self._free.get()
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
        self._jobs.put(Job(staged, staged_values, staged_finite, tracking, event, slot))

    def is_worker(self) -> bool:
        """True on the worker thread."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Let the worker thread end once the queued records are applied (when the owner is freed)."""
        self._jobs.put(None)

    def pending(self) -> int:
        """Records queued or being applied (an estimate: the worker may finish one meanwhile)."""
        return self._jobs.unfinished_tasks

    def check(self) -> None:
        """Raise the worker's first exception since the last check, if any (``OffloadError``)."""
        if self.errors:
            error = self.errors.popleft()
            self.errors.clear()
            raise OffloadError(f"a record applied in the background failed: {error!r}; the statistics hold every "
                               f"record before it, and the records after it") from error

    def drain(self) -> None:
        """Wait until every queued record is applied, then :meth:`check`."""
        self._jobs.join()
        self.check()

    def close(self) -> None:
        """Drain, then stop the worker thread."""
        try:
            self.drain()
        finally:
            self._jobs.put(None)
            self._thread.join()


def _work(jobs: queue.Queue, free: queue.Queue, apply_ref: weakref.WeakMethod, errors: collections.deque) -> None:
    """The worker thread: apply each job once its copies have landed; keep exceptions for the training thread."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if job.event is not None:
                job.event.synchronize()
            apply = apply_ref()
            if apply is None:  # the recorder was freed
                return
            apply(job)
        except BaseException as e:  # noqa: BLE001 - everything is reported on the training thread
            errors.append(e)
        finally:
            if job is not None:
                free.put(job.slot)
            jobs.task_done()
