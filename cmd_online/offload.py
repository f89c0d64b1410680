"""Records applied in the background from host copies of the weights (``CMDRecorder(offload=True)``).

The training thread copies the weights (and the few gathered reference or sample values) into a
staging buffer in host memory — pinned, with non-blocking copies on a side stream on CUDA — and
hands the record to one worker thread, which applies it to statistics held in host memory. The
training stream only waits for the copy (``wait_stream``, on the device), never the host for the
device. A fixed number of staging buffers bounds the records in flight: a record waits for a free
buffer. :meth:`Offload.settle` waits for every pending record; an exception in the worker is kept and
raised by the next :meth:`Offload.check` on the training thread.

What ``apply`` returns for a record goes to :attr:`Offload.done`; the owner tells it on the training
thread, later, with :meth:`Offload.deliver` or :meth:`Offload.settle`. While ``hold`` is set (the owner
has observers), the worker applies a record only once the one before it has been told, so that whoever
is told of record i reads the state of record i exactly. A tell may call back into the owner
(re-entrancy): a query then waits for nothing and tells nothing (:attr:`Offload.telling`); a change of
state (a record, a load) calls :meth:`Offload.settle`, which first counts the records being told as
told, so that the worker can go on instead of waiting for a tell that waits for it.

The worker holds only the recording it applies records to, and that weakly; it never reaches the
recorder. At the interpreter's exit each owner still alive is drained (``drain``, held weakly): its
records in flight are applied and told before the interpreter shuts down.

:class:`OffloadDriver` is the whole hand-off for a :class:`~cmd_online.recording.Recording`: it submits
records (:meth:`OffloadDriver.record`), has the worker apply them (:func:`apply_job`), hands the
completed-record events (:class:`RecordEvent`) back in order, and waits (:meth:`OffloadDriver.wait`,
the one place the façade waits for the worker).
"""

from __future__ import annotations

import atexit
import collections
import math
import queue
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

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

    @classmethod
    def of(cls, error: BaseException) -> "OffloadError":
        if isinstance(error, AfterRecordError):
            out = cls(f"in the background: {error}")
        else:
            out = cls(f"a record applied in the background failed: {error!r}; the statistics hold every record "
                      f"before it, and the records after it")
        out.__cause__ = error
        return out


class AfterRecordError(RuntimeError):
    """What ``apply`` reports of a record it took all the same (a step after it failed; ``__cause__``)."""


class Offload:
    """Staging buffers, a side stream and one worker thread that applies records with ``apply(target, job)``.

    Args:
        weights (list of tensors): this process's flat weights, one per parameter (shapes, dtypes, device).
        values (int): the most gathered values a record carries (K, the samples).
        values_dtype (torch.dtype): their dtype.
        target: what the records are applied to (a recording); held weakly, so that it can be freed.
        apply (callable): ``apply(target, job)`` applies one :class:`Job` and returns ``(item, error)``: what
            to tell of it (put in :attr:`done`) and an exception of a record taken all the same (or None),
            kept for :meth:`check`.
        slots (int): staging buffers, i.e. records in flight at most (default :data:`SLOTS`).
        drain (callable): at the interpreter's exit, called (on the main thread) to apply and tell the
            records in flight; held weakly (default None: the worker just finishes them).
    """

    def __init__(self, weights: Sequence[torch.Tensor], values: int, values_dtype: torch.dtype,
                 target: Any, apply: Callable[[Any, Job], tuple], slots: int = SLOTS,
                 drain: Callable[[], None] | None = None):
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
        self.done: collections.deque = collections.deque()  # what apply returned, not yet told
        self.gate = Gate()
        self._owed: list[list[bool]] = []  # the records being told now, innermost last: [True] while owed
        self._target = weakref.ref(target)
        self._drain = None if drain is None else weakref.WeakMethod(drain)
        self._thread = threading.Thread(target=_work, name="cmd_online-offload", daemon=True,
                                        args=(self._jobs, self._free, self._target, apply, self.errors, self.done,
                                              self.gate))
        self._thread.start()
        _LIVE.add(self)
        # registered now, after whatever the owner's observers registered (atexit runs the last one first)
        atexit.register(_drain_at_exit, weakref.ref(self))

    def nbytes(self) -> int:
        """Bytes of the host staging buffers."""
        tensors = [t for slot in self._weights for t in slot] + self._values + self._finite
        return sum(t.numel() * t.element_size() for t in tensors)

    def submit(self, weights: Sequence[torch.Tensor], values: torch.Tensor, finite: torch.Tensor | None,
               tracking: bool, check_finite: bool = True) -> None:
        """Copy one record into a free staging buffer (waiting for one if all are in flight) and queue it.

        If the copy fails or is interrupted, the buffer is free again and nothing is queued. A failure of the
        worker is not raised here (the record would be lost with it): the owner checks before or after."""
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

    def owner_alive(self) -> bool:
        """False once the target is being freed by the garbage collector (its weak references are cleared)."""
        return self._target() is not None

    def stop(self) -> None:
        """Let the worker thread end once the queued records are applied (when the owner is freed)."""
        self.gate.open()
        self._jobs.put(None)

    def pending(self) -> int:
        """Records queued or being applied (an estimate: the worker may finish one meanwhile). It goes down
        only after what the worker changed is visible: read it before the owner's counters, never after."""
        return self._jobs.unfinished_tasks

    @property
    def telling(self) -> bool:
        """True while a record is being told (inside ``tell``: an observer of the owner runs)."""
        return bool(self._owed)

    def deliver(self, tell: Callable[[object], None]) -> None:
        """Tell what the worker has applied, in order: ``tell(item)`` for each item of :attr:`done`. Inside
        a tell it returns at once: the records are told one after the other, never one inside another."""
        if not self._owed:
            self._tell_all(tell)

    def _tell_all(self, tell: Callable[[object], None]) -> None:
        while self.done:
            item = self.done.popleft()
            owed = [True]
            self._owed.append(owed)
            try:
                tell(item)
            finally:
                self._owed.pop()
                if owed[0]:
                    self.gate.told()

    def settle(self, tell: Callable[[object], None], timeout: float | None = None) -> bool:
        """Wait until every queued record is applied and told, telling each with ``tell(item)`` as it comes;
        then :meth:`check`. False (nothing raised) if ``timeout`` seconds passed first.

        Called inside a tell (an observer that changes the owner's state, e.g. takes a record), the records
        being told are counted as told first, so that the worker goes on: their observers, once this returns,
        read the state of a later record (as they would after a record without offload)."""
        for owed in self._owed:
            if owed[0]:
                owed[0] = False
                self.gate.told()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        gate = self.gate
        while True:
            self._tell_all(tell)
            with gate.changed:
                if self.done:  # applied meanwhile: tell it first
                    continue
                if self._jobs.unfinished_tasks == 0 or not self.owner_alive():  # no owner: nothing more comes
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                gate.changed.wait(None if left == math.inf else left)
        self.check()
        return True

    def wait(self) -> None:
        """Wait until every queued record is applied, telling none (the worker must not wait for a tell)."""
        with self.gate.changed:
            while self._jobs.unfinished_tasks:
                self.gate.changed.wait()

    def discard(self) -> None:
        """Count what the worker applied and nobody will be told of as told (a record undone since)."""
        while self.done:
            self.done.popleft()
            self.gate.told()

    def take_error(self) -> BaseException | None:
        """The worker's first exception since the last check (and forget the others), or None."""
        if not self.errors:
            return None
        error = self.errors.popleft()
        self.errors.clear()
        return error

    def check(self) -> None:
        """Raise the worker's first exception since the last check, if any (``OffloadError``)."""
        error = self.take_error()
        if error is not None:
            raise OffloadError.of(error)

    def drain_at_exit(self) -> None:
        """At the interpreter's exit: the owner applies and tells its records in flight (``drain``); without
        an owner, the worker just finishes them, unheld."""
        drain = None if self._drain is None else self._drain()
        if drain is not None:
            drain()
        self.gate.open()
        deadline = time.monotonic() + EXIT_WAIT
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.005)


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


def _drain_at_exit(ref: "weakref.ref[Offload]") -> None:
    offload = ref()
    if offload is not None:
        offload.drain_at_exit()


@atexit.register
def _quiesce() -> None:
    """At the interpreter's exit, last: let every worker finish the records in flight (unheld), so that no
    thread is inside a torch operation while the interpreter shuts down (a C++ terminate otherwise)."""
    deadline = time.monotonic() + EXIT_WAIT
    for offload in list(_LIVE):
        offload.gate.open()
        while offload.pending() and time.monotonic() < deadline:
            time.sleep(0.005)


def _forget_frames(error: BaseException) -> BaseException:
    """``error`` with the locals of its frames, and of the exceptions it chains, cleared: it keeps the lines,
    not the owner (which a frame's ``self`` would keep alive until the error is reported)."""
    seen, link = set(), error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        traceback.clear_frames(link.__traceback__)
        link = link.__cause__ or link.__context__
    return error


def _work(jobs: queue.Queue, free: queue.Queue, target_ref: weakref.ref, apply: Callable[[Any, Job], tuple],
          errors: collections.deque, done: collections.deque, gate: Gate) -> None:
    """The worker thread: apply each job once its copies have landed and the record before it was told;
    keep what to tell in ``done``, and exceptions for the training thread. Between jobs it holds no
    reference to its target."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if job.event is not None:
                job.event.synchronize()
            gate.pass_()
            target = target_ref()
            if target is None:  # the recording was freed
                return
            try:
                item, error = apply(target, job)
            finally:
                del target  # if this was the last reference, the recording is freed here
            done.append(item)
            gate.applied()
            if error is not None:  # the record was taken; something after it failed
                errors.append(_forget_frames(error))
                error = None
        except BaseException as e:  # noqa: BLE001 - everything is reported on the training thread
            errors.append(_forget_frames(e))
        finally:
            slot, job = (None, None) if job is None else (job.slot, None)  # no staging views held past task_done:
            if slot is not None:  # the owner may be freed, and the interpreter exit, right after it
                free.put(slot)
            jobs.task_done()
            gate.finished()


# ------------------------------------------------------------------------------------------ the driver
class RecordEvent(NamedTuple):
    """What the worker did with one record, told later on the training thread: record ``index`` was skipped
    (``bad`` names the parameters that held NaN/Inf), or taken (``bad`` is None) between the phases
    ``was_tracking`` and ``tracking``."""

    index: int
    bad: list[str] | None
    was_tracking: bool = False
    tracking: bool = False


def apply_job(recording, job: Job) -> tuple[RecordEvent, BaseException | None]:
    """The worker thread: check and apply one record from host copies to ``recording``. Returns its event and
    the failure of the freeze after a record taken (None if none)."""
    weights = job.weights
    if job.finite is not None:
        bad = [] if bool(job.finite) else ["(a shard of another rank)"]
    else:  # the setting when the record was taken (sharded runs checked on submit: no collective here)
        bad = recording.nonfinite(weights) if job.check_finite else []
    if bad:
        return RecordEvent(recording.count_skip(), bad), None
    started = recording.tracking
    if job.tracking != started:
        raise RuntimeError("offload: a record's values were gathered for another phase")
    recording.take(weights, job.values.to(recording.dtype))
    event = RecordEvent(recording.records() - 1, None, started, recording.tracking)
    failure = None
    if not recording.shards.sharded:  # under FSDP2 the ranks freeze together, on the training thread
        try:
            recording.freeze_when_due()
        except Exception as e:  # noqa: BLE001 - the record is taken and told; the freeze comes again
            failure = AfterRecordError(f"the freeze of the modes after record {event.index} failed ({e!r}); the "
                                       f"record was taken, and the freeze comes again at the next record")
            failure.__cause__ = e
    return event, failure


Tell = Callable[[bool, bool, int], None]  # the owner's observers: tell(was_tracking, tracking, index)


class OffloadDriver:
    """The whole offload hand-off of one recording: submit a record, apply it on the worker
    (:func:`apply_job`), deliver what it did, wait.

    ``tell`` (the owner's: ``tell(was_tracking, tracking, index)`` tells its observers of a record taken) is
    given to each call, never kept: the driver holds no reference to its owner. Skipped records are warned
    about by the recording, as they are delivered.

    Args:
        recording (Recording): what the records are applied to (held strongly here, weakly by the worker).
        weights (list of tensors): this process's flat weights (the staging buffers' shapes).
        drain (callable): at the interpreter's exit, the owner's drain (held weakly; see :class:`Offload`).
    """

    def __init__(self, recording, weights: Sequence[torch.Tensor], drain: Callable[[], None] | None = None):
        self.recording = recording
        self.offload = Offload(weights, recording.config.samples, recording.dtype, recording, apply_job, drain=drain)
        self.stop = self.offload.stop  # for the owner's finaliser: the Offload's, not a method of the driver

    def is_worker(self) -> bool:
        return self.offload.is_worker()

    def pending(self) -> int:
        """Records queued or being applied (:meth:`Offload.pending`)."""
        return self.offload.pending()

    def nbytes(self) -> int:
        """Bytes of the host staging buffers."""
        return self.offload.nbytes()

    def _deliverer(self, tell: Tell) -> Callable[[RecordEvent], None]:
        recording = self.recording

        def deliver(event: RecordEvent) -> None:
            if event.bad is not None:
                recording.warn_skipped(event.index, event.bad, " (offloaded)")
            else:
                tell(event.was_tracking, event.tracking, event.index)
        return deliver

    def wait(self, tell: Tell, flush: bool = False) -> None:
        """On the training thread: wait for pending records and tell what they did. Inside an observer it
        returns at once (the worker waits for the observers, so the state is the record told), unless
        ``flush``: a change of state made by an observer (a load, close) applies and tells every pending
        record first. On the worker (a query from the freeze) it returns at once."""
        if self.offload.is_worker():
            return
        if flush or not self.offload.telling:  # only the thread that holds the owner's lock can be telling
            self.offload.settle(self._deliverer(tell))

    def drain(self, tell: Tell, timeout: float | None = None) -> None:
        """Apply and tell every record in flight (the owner dropped, or the interpreter's exit); once the
        recording is being freed by the garbage collector the worker stopped: tell what it applied."""
        if self.offload.owner_alive():
            self.offload.settle(self._deliverer(tell), timeout)
        else:
            self.offload.deliver(self._deliverer(tell))

    def record(self, weights: list[torch.Tensor], check_finite: bool, observed: bool, tell: Tell,
               submitting: Callable[[], None]) -> bool:
        """One record: raise a failure of the worker, warn about skipped records and tell observers, in order
        (inside an observer: nothing, the records are told one after the other); then hand this record over
        (:meth:`_submit`), even if an earlier one's failure is raised. ``observed``: the owner has observers
        (the worker then applies a record only once the one before it was told); ``submitting()`` is called
        as the record is handed over."""
        try:
            if not self.offload.telling:
                try:
                    self.offload.check()
                finally:
                    self.offload.deliver(self._deliverer(tell))
        finally:
            taken = self._submit(weights, check_finite, observed, self._deliverer(tell), submitting)
        return taken

    def _submit(self, weights: list[torch.Tensor], check_finite: bool, observed: bool,
                deliver: Callable[[RecordEvent], None], submitting: Callable[[], None]) -> bool:
        """Hand one record to the worker: host copies of the weights and of the gathered values.

        An observer's record (re-entrant: a record is being told) first applies and tells every pending
        record, and is applied and told itself before it returns, as without offload. Under FSDP2 the record
        that ends the warm-up or freezes the modes is agreed between the ranks (:meth:`_agree`). False if it
        was not taken because it failed on another rank."""
        offload, recording = self.offload, self.recording
        pending = offload.pending()  # first: it goes down only after the counters it is added to went up
        nested = offload.telling
        error = None
        if nested or self._may_change(pending):
            try:  # the phase (which values the record gathers) must be known, and no one waits for the worker
                offload.settle(deliver)
            except OffloadError as e:  # an earlier record's failure: raised below, this one is still taken
                error = e
        tracking, sharded = recording.tracking, recording.shards.sharded
        values = recording.values_of(weights)
        finite = recording.all_finite(weights) if check_finite and sharded else None  # the ranks check together
        # the same on every rank: the counters agree, and a pending record can change nothing that matters here
        critical = sharded and self._is_critical() and (finite is None or bool(finite))
        offload.gate.hold = observed
        submitting()
        offload.submit(weights, values, finite, tracking, check_finite)
        taken = True
        if critical:
            taken = self._agree(tracking, deliver)
        elif nested:  # the observer that took it reads its state next, as without offload
            offload.settle(deliver)
        if error is not None:
            raise error
        return taken

    def _may_change(self, pending: int) -> bool:
        """Whether this record or one of the ``pending`` ones may end the warm-up (the values a record gathers
        change), or, under FSDP2, freeze the modes (which the ranks do together, on the training thread)."""
        recording = self.recording
        if not recording.tracking:
            return recording.ends_warmup_within(pending + 1)
        return recording.shards.sharded and recording.freezes_within(pending + 1)

    def _is_critical(self) -> bool:
        """Under FSDP2, once nothing pending can change the phase: this record ends the warm-up or is due to
        freeze the modes."""
        recording = self.recording
        return recording.freezes_within(1) if recording.tracking else recording.ends_warmup_within(1)

    def _agree(self, tracking: bool, deliver: Callable[[RecordEvent], None]) -> bool:
        """FSDP2, a record that ends the warm-up or freezes the modes: wait for the worker to apply it (telling
        nothing yet), take it on every rank or on none, freeze on every rank or on none (here, on the training
        thread: collectives never run on the worker), then tell it."""
        offload, recording = self.offload, self.recording
        offload.wait()
        error = offload.take_error()
        failure = None if error is None else OffloadError.of(error)
        try:
            if not tracking:
                others = recording.shards.agree(failure)
                if failure is not None:
                    raise failure
                if not recording.undo_warmup_end(others):
                    offload.discard()
                    return False
            elif failure is not None:
                raise failure
            recording.freeze_when_due()
            return True
        finally:
            offload.settle(deliver)
