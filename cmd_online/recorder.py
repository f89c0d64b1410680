"""CMDRecorder: online CMD of a training run, attached to any torch optimizer.

The recorder is the façade: it owns the hooks, the options, the lock and the observers, and answers
the public API. What a recording holds — the warm-up history, the references, the statistics and
every counter — is a :class:`~cmd_online.recording.Recording`; the state format is
:mod:`cmd_online.checkpoint`'s (writer and reader); ``offload=True`` hands records to an
:class:`~cmd_online.offload.OffloadDriver`; the swap primitives are :class:`~cmd_online.swap.Swapping`'s.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings
import weakref
from typing import Any, Iterator

import torch

from . import distributed as dist_utils
from .checkpoint import read_state, write_state, write_trajectory_state
from .config import CMDConfig, RunOptions, check_bool
from .files import atomic_save
from .layout import RECORDABLE_DTYPES, Layout
from .observers import check_observers, notify
from .offload import EXIT_WAIT, OffloadDriver
from .recording import FIT_BLOCK, FREEZE_BLOCK, FitBlock, Recording  # noqa: F401 (FIT_BLOCK, FREEZE_BLOCK: scripts)
from .references import ReferenceSlots
from .shortcut import WriterShortcut, flush_writers
from .stats import StreamingMoments
from .summary import RecordingSummary
from .swap import Swapping
from .trajectory import CMDTrajectory


def _serialised(method=None, *, flush: bool = False):
    """Run the method inside the recorder's :meth:`~CMDRecorder._locked` (``flush``: see there): records,
    queries and state changes happen one at a time."""
    def wrap(method):
        @functools.wraps(method)
        def serialised(self, *args, **kwargs):
            with self._locked(flush):
                return method(self, *args, **kwargs)
        return serialised
    return wrap if method is None else wrap(method)


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


def _check_params(params: list, model: torch.nn.Module | None) -> None:
    """Every optimizer parameter recordable, once, and (given a model) one of the model's."""
    if not params:
        raise ValueError("optimizer has no parameters to record")
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        if first.setdefault(id(p), i) != i:
            raise ValueError(f"optimizer parameter {i} is the same tensor as parameter {first[id(p)]}: each "
                             f"parameter must appear once in the optimizer's param_groups")
    names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(params):
        what = f"parameter {names[id(p)]!r} (optimizer parameter {i})" if id(p) in names \
            else f"optimizer parameter {i}"
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"{what} is an uninitialized parameter of a lazy module (LazyLinear, …): run a "
                             f"forward pass first, then build the optimizer and the recorder")
        if not p.is_floating_point():
            raise TypeError(f"{what} has dtype {p.dtype}; CMD records floating-point parameters")
        if p.dtype not in RECORDABLE_DTYPES:  # float8 and smaller: no arithmetic to record them with
            raise TypeError(f"{what} has dtype {p.dtype}; CMD records float64, float32, float16 and bfloat16 "
                            f"parameters (float8 training keeps master weights in one of these: record those)")
        if p.layout != torch.strided:
            raise TypeError(f"{what} has layout {p.layout}; CMD records dense (strided) parameters")
        if p.is_meta:
            raise ValueError(f"{what} is on the meta device, so it holds no values to record: build the "
                             f"recorder once the parameters are materialised (model.to_empty(device=...) and "
                             f"initialised, or loaded)")
    if model is not None:
        owned = {id(p) for p in model.parameters()}
        foreign = [i for i, p in enumerate(params) if id(p) not in owned]
        if foreign:
            raise ValueError(f"model is not the optimizer's model: optimizer parameter(s) {foreign[:5]}"
                             f"{' …' if len(foreign) > 5 else ''} are not parameters of model; pass the "
                             f"model whose parameters the optimizer steps")


def _param_names(optimizer, params: list, model: torch.nn.Module | None) -> list[str]:
    names = [f"param_groups.{g}.params.{j}"
             for g, group in enumerate(optimizer.param_groups) for j in range(len(group["params"]))]
    if model is not None:  # the model's names where it has the parameter
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = [by_id.get(id(p), name) for p, name in zip(params, names)]
    return names


def _replaced(model: torch.nn.Module | None, optimizer, params: list, names: tuple, sharded: bool) -> str:
    """Which recorded ``params`` the model (else the optimizer) no longer holds — replaced after the recorder
    was built, e.g. by ``model.load_state_dict(sd, assign=True)`` — as a sentence; "" if none."""
    holder = model if model is not None else optimizer
    if holder is None:
        return ""
    if model is not None:
        if sharded:  # FSDP2 holds its sharded parameters once its modules are resharded
            dist_utils.reshard(model)
        held = {id(p) for p in model.parameters()}
    else:
        held = {id(p) for group in holder.param_groups for p in group["params"]}
    gone = [name for name, p in zip(names, params) if p is not None and id(p) not in held]
    if not gone:
        return ""
    listed = ", ".join(repr(n) for n in gone[:5]) + (" …" if len(gone) > 5 else "")
    return (f"parameter(s) {listed} of the {'model' if model is not None else 'optimizer'} are no longer the "
            f"tensors recorded (replaced after the recorder was built, e.g. by load_state_dict(..., "
            f"assign=True) or a new nn.Parameter)")


class CMDRecorder(Swapping):
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
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}")
        _warn_about_tiny_settings(self.config)

        params = [p for group in optimizer.param_groups for p in group["params"]]
        _check_params(params, model)
        self._shards = dist_utils.ShardInfo.of(params, model)
        local = self._shards.local(params)
        devices = {p.device for p in local}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device; got {sorted(map(str, devices))}")
        self._param_device = devices.pop()
        self.device = torch.device("cpu") if self.offload else self._param_device  # where the statistics live

        # weak references, as torch_ema keeps: dropping the model and optimizer frees the parameters
        self._optimizer = weakref.ref(optimizer)
        self._param_refs = [weakref.ref(p) for p in params]
        self._model = None if model is None else weakref.ref(model)
        self.layout = Layout.of_tensors(params, _param_names(optimizer, params, model))
        self.config = self.config.for_weights(self.layout.numel, "CMDRecorder")  # samples > N: all N, with a warning
        self.recording = Recording(self.config, self.layout, self._shards, [w.shape for w in local],
                                   self._param_device, self.device, self.run_options.kernel)
        self._warned_new_params = self._warned_replaced = False
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
            self._offload = OffloadDriver(self.recording, local, drain=self._drain_at_exit)
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
    @_serialised
    def phase(self) -> str:
        """``"warmup"`` until the clustering is done, then ``"tracking"`` (with offload, waits for pending records)."""
        return "tracking" if self.recording.tracking else "warmup"

    @property
    def ready(self) -> bool:
        """Whether CMD weights exist: False during the warm-up, True from the record that ends it (the
        same as ``phase == "tracking"``)."""
        return self.phase == "tracking"

    @property
    @_serialised
    def num_records(self) -> int:
        """Records taken, skipped ones not counted (flat kernel: reading it synchronises; offload: waits)."""
        self.recording.report_skips()
        return self.recording.records()

    @property
    @_serialised
    def skipped_records(self) -> int:
        """Records skipped because of NaN/Inf weights (flat kernel: reading it synchronises; offload: waits)."""
        return self.recording.skips()

    @property
    def num_modes(self) -> int | None:
        """M, known once the warm-up has ended."""
        return self.recording.num_modes

    @property
    def window_start(self) -> int:
        """First record of the fit window (the last warm-up record, F − 1)."""
        return self.recording.window_start

    @property
    def sample_index(self) -> torch.Tensor:
        """The K sampled weights' flat indices (their warm-up history is clustered)."""
        return self.recording.sample_index

    @property
    def reference_index(self) -> torch.Tensor | None:
        """The M reference weights' flat indices (None during the warm-up)."""
        return self.recording.reference_index

    @property
    def clustering(self):
        """The clustering of the samples (None during the warm-up, and for a resumed state until a query needs it)."""
        return self.recording.clustering

    @property
    def params(self) -> list[torch.Tensor]:
        """The recorded parameters, in optimizer order (held weakly)."""
        params = [ref() for ref in self._param_refs]
        if any(p is None for p in params):
            raise RuntimeError("the parameters recorded by this CMDRecorder have been deleted (model and optimizer "
                               "dropped); cmd_parameters(), trajectory(), state_dict() and nbytes() still work")
        return params

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

    # ----------------------------------------------------------------------------- read-only views
    @property
    @_serialised
    def references(self) -> torch.Tensor:
        """The reference values, M × num_records (a view: do not modify; it changes with the next record)."""
        self.recording.require_tracking("references")
        return self.recording.table.columns(self.num_records)

    @property
    @_serialised
    def reference_slots(self) -> ReferenceSlots | None:
        """Where the reference weights this process holds sit in its flat index (None during the warm-up;
        with offload, waits for pending records)."""
        return self.recording.slots

    @property
    @_serialised
    def summary(self) -> RecordingSummary | None:
        """What observers read of the statistics: a frozen :class:`~cmd_online.summary.RecordingSummary` of them
        now (None during the warm-up; with offload, waits for pending records)."""
        stats = self.recording.stats
        return None if stats is None else RecordingSummary.of(stats)

    @property
    @_serialised
    def moments(self) -> StreamingMoments | None:
        """Internal: the live streaming statistics, for tests and benchmarks (None during the warm-up; with
        offload, waits for pending records). They change with every record and may change shape between
        versions; observers read :attr:`summary`."""
        return self.recording.stats

    @_serialised
    def fit_blocks(self, block: int | None = None, tensors: list[int] | None = None) -> Iterator[FitBlock]:
        """The fit of every local weight, block by block: extra memory of a few blocks, whatever N.

        Each block lies inside one parameter; references are pinned to a = 1, b = 0 in their mode.

        Args:
            block (int): weights per block (default: a cache-sized block on CPU, larger on accelerators).
            tensors (list of int): only the blocks of these parameters (default all).
        """
        self.recording.require_tracking("fit_blocks")
        self.recording.report_skips()
        return self.recording.fit_blocks(block, tensors)

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
        self.recording.steps += 1
        self._after_auto = False
        every = self.config.record_every
        if every is not None and self.recording.steps % every == 0:
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
            self._warn_if_params_changed()
            weights = [w.detach().reshape(-1) for w in self._shards.local(self.params)]  # views: nothing copied
            if self._offload is not None:
                return self._offload.record(weights, self.check_finite, bool(self.observers), self._tell,
                                            self._submitting)
            recording = self.recording
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
            notify(self.observers, "on_record", self, self.recording.records() - 1 if index is None else index)

    def _warn_if_params_changed(self) -> None:
        optimizer = self._optimizer()
        if (not self._warned_new_params and optimizer is not None
                and sum(len(g["params"]) for g in optimizer.param_groups) != len(self._param_refs)):
            self._warned_new_params = True
            warnings.warn("CMDRecorder: the optimizer's parameters changed after the recorder was built "
                          "(add_param_group?); only the original parameters are recorded", RuntimeWarning,
                          stacklevel=4)
        if not self._warned_replaced and not self._shards.sharded:  # FSDP2 registers unsharded copies meanwhile
            replaced = self._replaced()
            if replaced:
                self._warned_replaced = True
                warnings.warn(f"CMDRecorder: {replaced}; the recorder records the tensors it was built on: build "
                              f"a new recorder (and optimizer) for the new parameters", RuntimeWarning, stacklevel=4)

    def _replaced(self) -> str:
        model = None if self._model is None else self._model()
        return _replaced(model, self._optimizer(), [ref() for ref in self._param_refs], self.layout.names,
                         self._shards.sharded)

    def _refuse_if_replaced(self, what: str) -> None:
        """``swapped``, ``cmd_state_dict`` and ``export`` would write into, or label as CMD, tensors the model
        no longer uses: refused."""
        replaced = self._replaced()
        if replaced:
            raise ValueError(f"{what}: {replaced}, so the CMD weights would go to tensors the model no longer "
                             f"uses; build a new recorder for the new parameters")

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

    # ----------------------------------------------------------------------------- queries
    def _output_dtypes(self) -> list[torch.dtype]:
        """Each parameter's current dtype (the recorded one once the parameters are gone)."""
        params = [ref() for ref in self._param_refs]
        return [self.layout.dtypes[i] if p is None else p.dtype for i, p in enumerate(params)]

    def _cmd_tensors(self, at: int, what: str = "cmd_parameters") -> Iterator[tuple[int, torch.Tensor]]:
        """(parameter, its CMD weights at record ``at``), one parameter at a time."""
        self.recording.require_tracking(what)
        return self.recording.cmd_tensors(at, self._output_dtypes())

    @_serialised
    def cmd_parameters(self, at: int = -1) -> list[torch.Tensor]:
        """CMD weights at record ``at``, one tensor per optimizer parameter (local shards under FSDP)."""
        return [tensor for _, tensor in self._cmd_tensors(at)]

    def _live_model(self) -> torch.nn.Module:
        if self._model is None:
            raise ValueError("this needs the model: pass model= to CMDRecorder(optimizer, model)")
        model = self._model()
        if model is None:
            raise RuntimeError("the model given to CMDRecorder has been deleted; "
                               "keep a reference to it while you use the recorder")
        return model

    @_serialised
    def cmd_state_dict(self, at: int = -1) -> dict[str, Any]:
        """The model's state_dict with CMD weights for the recorded parameters (buffers are live)."""
        model = self._live_model()
        self.recording.require_tracking("cmd_state_dict")
        self._refuse_if_replaced("cmd_state_dict")
        params = self.params
        full = self._shards.full_tensors(self._shards.agreed("cmd_state_dict()", lambda: self.cmd_parameters(at)),
                                         params)
        by_id = {id(p): v for p, v in zip(params, full)}
        sd = model.state_dict(keep_vars=True)
        # the parameters the optimizer does not hold are the live ones, whole (gathered under FSDP2)
        return {k: by_id[id(v)] if id(v) in by_id else dist_utils.whole(v) if isinstance(v, torch.Tensor) else v
                for k, v in sd.items()}

    @_serialised
    def export(self, path, at: int = -1) -> None:
        """Write ``cmd_state_dict(at)`` as a normal checkpoint, atomically (rank 0 only when distributed).

        Load it with ``model.load_state_dict(torch.load(path))``.
        """
        self.recording.require_tracking("export")
        self._refuse_if_replaced("export")
        sd = self.cmd_state_dict(at)
        if dist_utils.is_writer():
            atomic_save(sd, path)

    @_serialised
    def trajectory(self) -> CMDTrajectory:
        """The CMD model so far, as a :class:`CMDTrajectory` with full tensors.

        Under FSDP2 it is collective: every rank gathers a, b (float32, float64 for a float64 model)
        and the modes (int32) of all N weights, 12 bytes per weight of the whole model, plus as much
        again for a moment; for a model whose a and b do not fit in one process, save
        :meth:`trajectory_state_dict` with torch.distributed.checkpoint instead.
        """
        recording = self.recording
        recording.require_tracking("trajectory")
        a, b, modes, totals = self._shards.agreed("trajectory()", recording.clustered_fit)
        meta = recording.trajectory_meta(totals)
        a, b, modes = (self._shards.gather_flat(x, recording.sizes) for x in (a, b, modes))
        return CMDTrajectory(**meta, a=a, b=b, modes=modes)

    @_serialised
    def add_metrics(self, metrics: dict[str, float], at: int = -1) -> None:
        """Keep metrics of record ``at`` — e.g. the trained and the CMD model's test accuracy — for
        :meth:`trajectory` (``CMDTrajectory.metrics``) and so for its report (``cmd-online report``).

        Args:
            metrics (dict): metric name → number (a float, int or one-element tensor). A name
                ``"group/label"`` is drawn with the other labels of its group in one panel of the
                report, e.g. ``{"test accuracy/trained": 0.95, "test accuracy/CMD": 0.97}``.
            at (int): the record they belong to; negative counts from the end (default -1, the last).

        Adding a metric again at the same record replaces it. Metrics are kept in ``state_dict()``.
        """
        self.recording.add_metrics(metrics, at)

    @_serialised
    def trajectory_state_dict(self) -> dict[str, Any]:
        """The CMD model as a state_dict for ``torch.distributed.checkpoint``, without gathering anything.

        ``{"meta": bytes, "a", "b", "modes": {parameter name: a tensor shaped like the parameter}}``,
        placed like the parameters (DTensors under FSDP2): ``dcp.save({"trajectory": ...})`` writes each
        rank's part; :func:`cmd_online.checkpoint.load_trajectory` reads it back as a
        :class:`CMDTrajectory` in one process. Collective under FSDP2 (the modes' R² are summed). Outside
        FSDP2 ``meta`` holds a checksum of a, b and the modes, which ``CMDTrajectory.from_state_dict`` checks.
        """
        self.recording.require_tracking("trajectory_state_dict")
        fit = self._shards.agreed("trajectory_state_dict()", self.recording.clustered_fit)
        return write_trajectory_state(self.recording, fit)

    @_serialised
    def r2(self) -> list[torch.Tensor]:
        """Each weight's R² (ρ² with its mode's reference) over the window, per parameter (local shards)."""
        self.recording.require_tracking("r2")
        return self.recording.r2()

    @_serialised
    def nbytes(self) -> dict[str, int]:
        """Bytes held in tensors by this recorder, by part (statistics, scratch, history, references,
        indices, the offload's host ``staging`` buffers) and their ``total``."""
        out = {**self.recording.nbytes(), "staging": 0 if self._offload is None else self._offload.nbytes()}
        out["total"] = sum(out.values())
        return out

    @_serialised
    def log(self, writer, step: int | None = None) -> None:
        """Log mode statistics to a TensorBoard ``writer`` now, at ``step`` (default: the last record).

        Mode statistics are written every ``log_every`` calls' records, as with ``writer=``; one
        logger per writer keeps that schedule (held weakly with the writer).
        """
        self._shortcut.log(self, writer, self.num_records - 1 if step is None else step)

    # ----------------------------------------------------------------------------- checkpoints
    @_serialised
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
        return write_state(self.recording)

    @_serialised(flush=True)
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
        (checked, metrics, fresh), others = self._shards.attempt(lambda: read_state(state, self.recording, strict))
        if others:
            raise ValueError(f"the state was refused on {dist_utils.ranks_text(others)}; nothing was loaded on any "
                             f"rank")
        self.recording.restore(checked, metrics, fresh)  # everything checked, on every rank: now change it
        self._after_auto = False

    @_serialised(flush=True)
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
