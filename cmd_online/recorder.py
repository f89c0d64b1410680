"""CMDRecorder: online CMD of a training run, attached to any torch optimizer.

The recorder is the façade: it owns the hooks, the options, the lock and the observers, and answers
the public API. What a recording holds — the warm-up history, the references, the statistics and
every counter — is a :class:`~cmd_online.recording.Recording`; the recorded parameters, held weakly,
are :class:`~cmd_online.parameters.RecordedParameters`; the state format is :mod:`cmd_online.checkpoint`'s
(writer and reader); ``offload=True`` hands records to an :class:`~cmd_online.offload.OffloadDriver`.
Its public API comes in three parts: this module (options, records, state, observers), its read side
(:class:`~cmd_online.queries.Queries`) and the swap primitives (:class:`~cmd_online.swap.Swapping`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from typing import Any, Iterator

import torch

from . import distributed as dist_utils
from .checkpoint import read_state, write_state
from .config import CMDConfig, RunOptions, check_bool
from .layout import Layout
from .observers import check_observers, notify
from .offload import EXIT_WAIT, OffloadDriver
from .parameters import RecordedParameters
from .queries import Queries, serialised
from .recording import FIT_BLOCK, FREEZE_BLOCK, Recording  # noqa: F401 (FIT_BLOCK, FREEZE_BLOCK: read by scripts)
from .shortcut import WriterShortcut, flush_writers
from .swap import Swapping


class _StepHook:
    """The optimizer's step post-hook: holds the recorder weakly, so that a dropped recorder is freed (and
    records no more); the recorder removes it when it is freed or closed."""

    def __init__(self, method):
        self.method = weakref.WeakMethod(method)

    def __call__(self, optimizer, args, kwargs) -> None:
        method = self.method()
        if method is not None:
            method(optimizer, args, kwargs)


def _warn_about_tiny_settings(config: CMDConfig) -> None:
    freeze = config.freeze_modes_after
    if freeze is not None and freeze < 3:
        warnings.warn(f"freeze_modes_after={freeze}: modes fixed from fewer than 3 records of the "
                      "window are arbitrary (all correlations are 0 or ±1); use ≥ 3", UserWarning, stacklevel=4)
    if config.warmup == 2:
        warnings.warn("warmup=2: any two records are perfectly correlated, so the clustering finds a "
                      "single mode; use warmup ≥ 3 for more than one", UserWarning, stacklevel=4)


class CMDRecorder(Queries, Swapping):
    """Records the CMD model of a training run online, with bounded memory.

    Attaches to ``optimizer`` through its step hooks: the optimizer, LR schedulers, GradScaler,
    gradient clipping and closures keep working unchanged. During a warm-up of ``warmup`` records it
    keeps the history of ``samples`` sampled weights only; at the last warm-up record it clusters them
    into modes and fixes one reference weight per mode; from then on it keeps streaming statistics of
    every weight, from which the CMD weights at any record come out without the trajectory.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer whose parameters are recorded, in its order.
        model (torch.nn.Module): the model, for ``cmd_state_dict``, ``export`` and names (default None).
            Every recorded parameter must be one of its parameters. Only a weak reference is kept.
        modes (int): number of modes M (default 10 when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]; M then follows from the data.
        samples (int): K, weights whose warm-up history is clustered; modes ≤ K ≤ N (default 1000; the
            default on a model of fewer weights becomes N, with a UserWarning; any other K > N is refused).
        warmup (int): F ≥ 2, number of warm-up records (default 20).
        record_every (int): record after every k-th optimizer step; None (default): call :meth:`record`.
        freeze_modes_after (int): after this many records of tracking, fix each weight's mode and keep
            only its own co-moment: the compact form, 3.25 float32 per weight (default 3; for k ≤ 4 the
            full form is never built: the window's first records are kept in the compact form's own
            buffers until the freeze). None keeps the full form, M + 3 float32 per weight.
        distance (str): the clustering distance: ``"correlation"``, 1 − |C_ij| (default), or
            ``"euclidean"`` between rows of |C|, the distance of the paper authors' code (docs/concepts.md).
        writer (SummaryWriter): shortcut for ``callbacks=[TensorBoardLogger(writer, every=log_every)]``
            (default None; see docs/tensorboard.md).
        log_every (int): the shortcut logger's interval for mode statistics, in records (default 10).
        callbacks (list): observers told about the records (``cmd_online.observers``; default none).
        seed (int): seed of the sampling (default 0).
        check_finite (bool): skip (with a warning) records whose weights hold NaN/Inf (default True).
        compile_update (bool): deprecated spelling of ``kernel="compiled"`` (a FutureWarning; default False).
        kernel (str): the statistics kernel: ``"blocks"`` (CPU default), ``"flat"`` (accelerator
            default; the finite check and record count stay on the device, so a record after the
            warm-up never synchronises), ``"compiled"`` (the update through ``torch.compile``); None picks by
            device (default None).
        offload (bool): keep the statistics in host memory, updated on a worker thread (default False).
        check_finite, kernel and offload are held, validated, as ``rec.run_options`` (:class:`RunOptions`).
    """

    def __init__(self, optimizer, model: torch.nn.Module | None = None, *, modes: int | None = None,
                 threshold: float | None = None, samples: int = 1000, warmup: int = 20,
                 record_every: int | None = None, freeze_modes_after: int | None = 3,
                 distance: str = "correlation", writer=None, log_every: int = 10, callbacks=None, seed: int = 0,
                 check_finite: bool = True, compile_update: bool = False, kernel: str | None = None,
                 offload: bool = False, max_modes: int | None = None):
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if warmup is None:
            raise TypeError("warmup must be an int ≥ 2; got NoneType")
        self.config = CMDConfig(modes=modes, threshold=threshold, samples=samples, warmup=warmup,
                                record_every=record_every, freeze_modes_after=freeze_modes_after, seed=seed,
                                distance=distance, max_modes=max_modes)
        self.run_options = RunOptions.of(check_finite=check_finite, kernel=kernel, offload=offload,
                                         compile_update=compile_update)
        shortcut = WriterShortcut(writer, log_every)
        self._parameters = RecordedParameters(optimizer, model)  # checked, held weakly
        _warn_about_tiny_settings(self.config)
        params = self._parameters.live()
        self._shards = self._parameters.shards
        local = self._shards.local(params)
        devices = {p.device for p in local}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device; got {sorted(map(str, devices))}")
        param_device = devices.pop()
        self.device = torch.device("cpu") if self.offload else param_device  # where the statistics live
        self.layout = Layout.of_tensors(params, self._parameters.names)
        self.config = self.config.for_weights(self.layout.numel, "CMDRecorder")  # samples > N: all N, with a warning
        self._recording = Recording(self.config, self.layout, self._shards, [w.shape for w in local], param_device,
                                   self.device, self.run_options.kernel)
        self._auto = False  # the step hook is recording now
        self._after_auto = False  # the last thing that happened was an automatic record (no optimizer step since)
        self._warned_duplicate = False
        self._callbacks = check_observers(callbacks)
        self._closed = False  # close() told the observers, and nothing was recorded since
        self._shortcut = shortcut  # writer=, log_every and log(writer)
        self._lock = threading.RLock()  # records, queries and state changes happen one at a time
        Swapping.__init__(self)
        self._offload: OffloadDriver | None = None
        if self.offload:
            self._offload = OffloadDriver(self._recording, local, drain=self._drain_at_exit)
            weakref.finalize(self, self._offload.stop).atexit = False  # the worker ends with its recorder
        # nothing outside holds the recorder strongly: the hook holds it weakly, and goes when it goes
        self._hook = optimizer.register_step_post_hook(_StepHook(self._after_step))
        weakref.finalize(self, self._hook.remove).atexit = False

    @contextlib.contextmanager
    def _locked(self, flush: bool = False) -> Iterator[None]:
        """Hold the lock, once the offload worker's pending records are applied and told: the one place the
        façade waits for the worker. Inside an observer it waits for nothing (the worker waits for the
        observers), unless ``flush``: a change of state applies and tells every pending record first."""
        with self._lock:
            if self._offload is not None:
                self._offload.wait(self._tell, flush)
            yield

    # ----------------------------------------------------------------------------- state
    @property
    @serialised
    def phase(self) -> str:
        """``"warmup"`` until the clustering is done, then ``"tracking"`` (with offload, waits for pending records)."""
        return "tracking" if self._recording.tracking else "warmup"

    @property
    def ready(self) -> bool:
        """Whether CMD weights exist: False during the warm-up, True from the record that ends it (the
        same as ``phase == "tracking"``)."""
        return self.phase == "tracking"

    @property
    @serialised
    def num_records(self) -> int:
        """Records taken, skipped ones not counted (flat kernel: reading it synchronises; offload: waits)."""
        self._recording.report_skips()
        return self._recording.records()

    @property
    @serialised
    def skipped_records(self) -> int:
        """Records skipped because of NaN/Inf weights (flat kernel: reading it synchronises; offload: waits)."""
        return self._recording.skips()

    @property
    def num_modes(self) -> int | None:
        """M, known once the warm-up has ended."""
        return self._recording.num_modes

    @property
    def window_start(self) -> int:
        """First record of the fit window (the last warm-up record, F − 1)."""
        return self._recording.window_start

    @property
    def sample_index(self) -> torch.Tensor:
        """The K sampled weights' flat indices (their warm-up history is clustered)."""
        return self._recording.sample_index

    @property
    def reference_index(self) -> torch.Tensor | None:
        """The M reference weights' flat indices (None during the warm-up)."""
        return self._recording.reference_index

    @property
    def clustering(self):
        """The clustering of the samples (None during the warm-up, and for a resumed state until a query needs it)."""
        return self._recording.clustering

    @property
    def params(self) -> list[torch.Tensor]:
        """The recorded parameters, in optimizer order (held weakly)."""
        return self._parameters.live()

    @property
    def check_finite(self) -> bool:
        """Skip records whose weights hold NaN/Inf (``run_options.check_finite``); may be set between records."""
        return self.run_options.check_finite

    @check_finite.setter
    def check_finite(self, on: bool) -> None:
        self.run_options = self.run_options.replace(check_finite=check_bool("check_finite", on))

    @property
    def offload(self) -> bool:
        """Whether the statistics live in host memory, updated on a worker thread (``run_options.offload``)."""
        return self.run_options.offload

    @property
    def compile_update(self) -> bool:
        """Deprecated: ``run_options.kernel == "compiled"``."""
        return self.run_options.kernel == "compiled"

    @property
    def writer(self):
        """The ``writer=`` shortcut's SummaryWriter (None if none); may be set between records."""
        return self._shortcut.writer

    @writer.setter
    def writer(self, writer) -> None:
        self._shortcut.writer = writer

    @property
    def log_every(self) -> int:
        """The ``writer=`` shortcut's interval of mode statistics, in records; may be set between records."""
        return self._shortcut.every

    @log_every.setter
    def log_every(self, every: int) -> None:
        self._shortcut.every = every

    @property
    def callbacks(self) -> list:
        """The observers given as ``callbacks=`` (a list; may be replaced or changed between records)."""
        return self._callbacks

    @callbacks.setter
    def callbacks(self, callbacks) -> None:
        self._callbacks = check_observers(callbacks)

    @property
    def observers(self) -> list:
        """Everything told about the records: ``callbacks``, then the ``writer=`` shortcut's logger."""
        return self.callbacks + self._shortcut.observers()

    # ----------------------------------------------------------------------------- recording
    def _after_step(self, optimizer, args, kwargs) -> None:
        # GradScaler calls step() of optimizers that unscale themselves (fused Adam, AdamW, SGD) even for a
        # step it skips, with found_inf set: such a step changed nothing and does not count (one read)
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf):
            return
        if self._swapped:  # it trained the CMD weights, which the block's exit replaces: nothing to record
            self._warn_swapped_step()
            return
        self._recording.steps += 1
        self._after_auto = False
        every = self.config.record_every
        if every is not None and self._recording.steps % every == 0:
            self._auto = True
            try:
                self.record()
            finally:
                self._auto = False
            self._after_auto = True

    def record(self) -> bool:
        """Take one trajectory point now.

        Returns False if the record was skipped because a weight is NaN/Inf, or, under FSDP2, because it
        failed on another rank (a warning says which; the failing rank raises its error). With the flat
        kernel (accelerators) records after the warm-up are checked on the device, without waiting, and with
        ``offload=True`` in the background: they return True, and a skipped one shows in
        ``skipped_records`` and a warning at the next query. Records work under ``torch.no_grad()``,
        ``torch.inference_mode()`` or neither, from any thread (one at a time), and from an observer.
        Inside :meth:`swapped` (the parameters hold CMD weights) a record is refused.

        With ``record_every``, a call right after an automatic record (no optimizer step in between)
        would record the same weights twice: it is ignored, returns False, and warns once.
        """
        if self._after_auto and not self._auto:
            if not self._warned_duplicate:
                self._warned_duplicate = True
                warnings.warn(f"CMDRecorder: record() right after the automatic record of record_every="
                              f"{self.config.record_every} (no optimizer step in between) is ignored: the same "
                              f"weights would count twice. With record_every, do not call record() yourself "
                              f"(this warning comes once)", UserWarning, stacklevel=2)
            return False
        with self._lock, torch.inference_mode(False), torch.no_grad():
            self._refuse_record_when_swapped()
            self._closed = False
            self._parameters.warn_if_changed()
            weights = [w.detach().reshape(-1) for w in self._shards.local(self.params)]  # views: nothing copied
            if self._offload is not None:
                return self._offload.record(weights, self.check_finite, bool(self.observers), self._tell,
                                            self._submitting)
            recording = self._recording
            started = recording.tracking
            if not recording.record(weights, self.check_finite):
                return False
            try:
                recording.freeze_when_due()  # the record is taken even if the freeze fails: it comes again
            finally:
                self._tell(started, recording.tracking, None)
            return True

    def _submitting(self) -> None:
        """Called as a record is handed to the offload worker (in the order the worker applies them)."""

    def _tell(self, was_tracking: bool, tracking: bool, index: int | None) -> None:
        """The observers: the warm-up ended (if it did at this record), and record ``index`` (default the
        last) was taken."""
        if tracking and not was_tracking:
            notify(self.observers, "on_tracking_start", self)
        if self.observers:
            notify(self.observers, "on_record", self, self._recording.records() - 1 if index is None else index)

    # ----------------------------------------------------------------------------- offload's end
    def _drain(self, timeout: float | None = None, why: str = "dropped") -> None:
        """Apply and tell every record in flight (a recorder dropped, or at the interpreter's exit), and flush
        the TensorBoard loggers' writers, so that what the observers were told reaches the disk. A failure is
        said in a warning, not raised (a finaliser, or the exit)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return  # another thread holds the recorder (a daemon thread at exit): do not hang the exit
        try:
            self._offload.drain(self._tell, timeout)
            flush_writers(self.observers)
        except Exception as e:  # noqa: BLE001 - in a finaliser or at exit: say it, do not raise
            warnings.warn(f"CMDRecorder: {why}; its last records could not all be applied and told: {e!r}",
                          RuntimeWarning, stacklevel=2)
        finally:
            self._lock.release()

    def _drain_at_exit(self) -> None:
        """At the interpreter's exit (a script that ends without close()): every record reaches the observers."""
        self._drain(EXIT_WAIT, "at exit")

    def __del__(self) -> None:
        offload = self.__dict__.get("_offload")
        if offload is None or sys.is_finalizing():
            return
        if offload.is_worker():  # collected on the worker thread (a cycle): drain on another thread
            threading.Thread(target=self._drain, name="cmd_online-drain", daemon=True).start()
        else:
            self._drain()

    def __reduce_ex__(self, protocol):
        raise TypeError("a CMDRecorder cannot be copied or pickled (it is attached to an optimizer, and holds a lock "
                        "and possibly a worker thread): save rec.state_dict() and load it with load_state_dict() "
                        "into a new CMDRecorder")

    def __copy__(self):
        self.__reduce_ex__(4)

    def __deepcopy__(self, memo):
        self.__reduce_ex__(4)

    # ----------------------------------------------------------------------------- checkpoints
    @serialised
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, counters, samples, history, references, statistics.

        ``{"meta": bytes, "stats": {...}}`` (version 4, module ``cmd_online.checkpoint``): ``meta`` holds
        the replicated part, ``stats`` one tensor per parameter and statistic, placed like the parameter
        (DTensors under FSDP2), with P padded to the mode bound. Its structure depends on neither the
        phase nor the modes found, so a freshly built recorder is a ``torch.distributed.checkpoint``
        ``Stateful`` that loads, and reshards, any checkpoint of its configuration.

        As a module's ``state_dict`` does, it holds references to the recorder's tensors, not copies:
        save it (``torch.save``, ``dcp.save``) before the next record changes them. Before the warm-up
        ends the statistics are zeros, allocated for the call. Past it, outside FSDP2, ``meta`` holds a
        checksum of the statistics (``cmd_online.files.checksum``) that :meth:`load_state_dict` checks.
        """
        return write_state(self._recording)

    @serialised(flush=True)
    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` (this version, or 1 to 3 of earlier cmd_online). Every field is
        checked first: a state of another configuration, other parameters, other samples, or one damaged
        (its checksum), is refused with a ValueError that says what differs, and changes nothing. Under
        FSDP2 it is collective: a state refused on one rank is refused on every rank (the others raise a
        ValueError naming it).

        The parameters must be as many, of the same shapes, in the same order, as when the state was
        recorded, and (``strict``, default) of the same names up to wrappers: ``torch.compile``'s
        ``_orig_mod.``, FSDP1's and activation checkpointing's components anywhere, and one leading prefix
        on each side (DDP's ``module.``, a LightningModule's attribute); a recorder built without
        ``model=`` matches any names. ``strict=False`` matches the parameters by position only (for the
        same parameters renamed)."""
        strict = check_bool("strict", strict)
        # the ranks load together or not at all: their phases never differ
        (checked, metrics, fresh), others = self._shards.attempt(lambda: read_state(state, self._recording, strict))
        if others:
            raise ValueError(f"the state was refused on {dist_utils.ranks_text(others)}; nothing was loaded on any "
                             f"rank")
        self._recording.restore(checked, metrics, fresh)  # everything checked, on every rank: now change it
        self._after_auto = False

    @serialised(flush=True)
    def close(self) -> None:
        """Detach from the optimizer (no more records on step) and tell the observers (a writer is flushed),
        once: calling it again before another record does nothing more. With offload, every pending record
        is applied and told first (from an observer too)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if not self._closed:  # once, however often close() is called (frameworks call it again)
            self._closed = True
            notify(self.observers, "on_close", self)

    def __repr__(self) -> str:
        modes = self.num_modes if self.num_modes is not None else self.config.modes
        return (f"CMDRecorder(weights={self.layout.numel}, phase={self.phase!r}, records={self.num_records}, "
                f"modes={modes})")
