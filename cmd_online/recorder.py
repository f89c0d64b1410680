"""CMDRecorder: online CMD of a training run, attached to any torch optimizer.

The recorder owns no math: sampling, clustering, the streaming statistics and the fit live in their
own modules. It turns optimizer steps into records, records into statistics, and statistics into
CMD weights, checkpoints and trajectories, and tells its observers (``cmd_online.observers``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from . import distributed as dist_utils
from .checkpoint import FORMAT, VERSION, check_state, from_per_parameter, per_parameter, stats_checked
from .clustering import Clustering, cluster
from .config import CMDConfig, RunOptions, check_bool
from .files import atomic_save, checksum, pack, unpack
from .layout import RECORDABLE_DTYPES, GatherPlan, Layout
from .observers import check_observers, notify
from .offload import EXIT_WAIT, AfterRecordError, Job, Offload, OffloadError
from .progress import LOG
from .references import ReferenceSlots, ReferenceTable
from .sampling import sample_indices
from .shortcut import WriterShortcut, flush_writers
from .stats import AffineFit, StreamingMoments, mode_dtype, pin_references
from .summary import RecordingSummary
from .window import SnapshotMoments, keeps_snapshots
from .trajectory import CMDTrajectory, normalize_at, parts_checked, reconstruct



# Weights per block of a query's fit on a CPU: its float64 working set of about M + 10 block-sized
# vectors stays in the L2 cache, and the query's extra memory is a few MiB whatever N (docs/benchmarks.md).
FIT_BLOCK = 1 << 15
# Weights per block of the fit that freezes the modes: a one-time pass, so a small working set (a few
# MiB at M = 10) matters more than speed (docs/benchmarks.md, the freeze peak).
FREEZE_BLOCK = 1 << 13


class FitBlock(NamedTuple):
    """The fit of one block of weights: parameter ``tensor``, the block's ``local`` slice inside that
    parameter's (local, flat) weights, its ``flat`` slice of the local flat index, and the ``fit``."""

    tensor: int
    local: slice
    flat: slice
    fit: AffineFit


def _serialised(method):
    """Run the method holding the recorder's lock: records, queries and state changes happen one at a time."""
    @functools.wraps(method)
    def serialised(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return serialised


def _metrics_of_state(table: Any) -> dict[str, dict[int, float]]:
    """The metrics of a state (name → vector, NaN where none) back as name → {record: value}; checked."""
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() == 1
                                              and v.is_floating_point() for k, v in table.items()):
        raise ValueError("state['meta']['metrics'] must map metric names to float vectors; this is not a "
                         "CMDRecorder state_dict of this recorder (damaged or edited?)")
    return {name: {i: float(v) for i, v in enumerate(values.tolist()) if not math.isnan(v)}
            for name, values in table.items()}


class _StepHook:
    """The optimizer's step post-hook: holds the recorder weakly, so that a dropped recorder is freed (and
    records no more); the recorder removes it when it is freed or closed."""

    def __init__(self, method):
        self.method = weakref.WeakMethod(method)

    def __call__(self, optimizer, args, kwargs) -> None:
        method = self.method()
        if method is not None:
            method(optimizer, args, kwargs)


def _ranks(failures: list[tuple[int, str]]) -> str:
    """'rank 1 (MemoryError: ...)' for the failures of other ranks."""
    return ", ".join(f"rank {rank} ({text})" for rank, text in failures)


def _copy_back(params: list[torch.Tensor], saved: list[torch.Tensor], model: torch.nn.Module | None = None) -> None:
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    if model is not None:  # FSDP2: no unsharded copy of the CMD weights may outlive the block
        dist_utils.reshard(model)


class CMDRecorder:
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
        self._kernel = self.run_options.kernel
        shortcut = WriterShortcut(writer, log_every)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}")
        self._warn_about_tiny_settings()

        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._check_params(params, model)
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
        self._local_shapes = [w.shape for w in local]  # queries need no live parameters
        self._model = None if model is None else weakref.ref(model)
        self.layout = Layout.of_tensors(params, self._names(optimizer, params, model))
        self.config = self.config.for_weights(self.layout.numel, "CMDRecorder")  # samples > N: all N, with a warning

        self.sample_index = sample_indices(self.layout.sizes, self.config.samples, self.config.seed)
        self._sample_plan = self._shards.gather_plan(self.layout, self.sample_index, self._param_device)
        self._history = torch.zeros(self.config.samples, self.config.warmup, dtype=self._coefficient_dtype,
                                    device=self.device)
        self._warmup_records = 0  # records of the warm-up taken so far
        self._skipped = 0  # records skipped by a host-side finite check
        self._device_attempts = 0  # tracking records handed to the flat kernel (their skips are counted there)
        self._skips_reported = 0
        self._steps = 0
        self._warned_new_params = False
        self._auto = False  # the step hook is recording now
        self._after_auto = False  # the last thing that happened was an automatic record (no optimizer step since)
        self._warned_duplicate = self._warned_fallback = False
        self._metrics: dict[str, dict[int, float]] = {}  # add_metrics: name → {record: value}
        self.clustering: Clustering | None = None
        self._foreign_clustering = False  # a resumed state whose references another clustering picked
        self.reference_index: torch.Tensor | None = None
        self._ref_plan: GatherPlan | None = None
        self._slots: ReferenceSlots | None = None
        self._table: ReferenceTable | None = None
        self._stats: StreamingMoments | None = None

        self._callbacks = check_observers(callbacks)
        self._closed = False  # close() told the observers, and nothing was recorded since
        self._shortcut = shortcut  # writer=, log_every and log(writer)
        self._lock = threading.RLock()  # records, queries and state changes happen one at a time
        self._swapped = 0  # swapped() blocks open: the parameters hold CMD weights
        self._stored: list[torch.Tensor] | None = None  # store(): the trained weights (local shards), until restore()
        self._warned_swapped_step = False
        self._warned_replaced = False
        self._offload: Offload | None = None
        if self.offload:
            self._offload = Offload(local, self.config.samples, self._coefficient_dtype, self._apply_offloaded,
                                    drain=self._drain_at_exit)
            stop = weakref.finalize(self, self._offload.stop)  # the worker ends with its recorder
            stop.atexit = False  # at exit the daemon thread just stops
        # nothing outside holds the recorder strongly: the hook holds it weakly, and goes when it goes
        self._hook = optimizer.register_step_post_hook(_StepHook(self._after_step))
        weakref.finalize(self, self._hook.remove).atexit = False

    def _warn_about_tiny_settings(self) -> None:
        freeze = self.config.freeze_modes_after
        if freeze is not None and freeze < 3:
            warnings.warn(f"freeze_modes_after={freeze}: modes fixed from fewer than 3 records of the "
                          "window are arbitrary (all correlations are 0 or ±1); use ≥ 3", UserWarning, stacklevel=3)
        if self.config.warmup == 2:
            warnings.warn("warmup=2: any two records are perfectly correlated, so the clustering finds a "
                          "single mode; use warmup ≥ 3 for more than one", UserWarning, stacklevel=3)

    @staticmethod
    def _check_params(params: list, model: torch.nn.Module | None) -> None:
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

    @staticmethod
    def _names(optimizer, params: list, model: torch.nn.Module | None) -> list[str]:
        names = [f"param_groups.{g}.params.{j}"
                 for g, group in enumerate(optimizer.param_groups) for j in range(len(group["params"]))]
        if model is not None:  # the model's names where it has the parameter
            by_id = {id(p): n for n, p in model.named_parameters()}
            names = [by_id.get(id(p), name) for p, name in zip(params, names)]
        return names

    # ----------------------------------------------------------------------------- state
    @property
    def phase(self) -> str:
        """``"warmup"`` until the clustering is done, then ``"tracking"`` (with offload, waits for pending records)."""
        self._sync()
        return "warmup" if self._stats is None else "tracking"

    @property
    def ready(self) -> bool:
        """Whether CMD weights exist: False during the warm-up, True from the record that ends it (the
        same as ``phase == "tracking"``)."""
        return self.phase == "tracking"

    @property
    def num_records(self) -> int:
        """Records taken, skipped ones not counted (flat kernel: reading it synchronises; offload: waits)."""
        self._sync()
        self._report_skips()
        return self._records()

    @property
    def skipped_records(self) -> int:
        """Records skipped because of NaN/Inf weights (flat kernel: reading it synchronises; offload: waits)."""
        self._sync()
        return self._skips()

    def _records(self) -> int:
        return self._warmup_records if self._stats is None else self.window_start + self._stats.window_count()

    def _skips(self) -> int:
        if self._stats is None or self._stats.kernel != "flat":
            return self._skipped
        return self._skipped + self._device_attempts + 1 - self._stats.window_count()

    def _sync(self, flush: bool = False) -> None:
        """With offload, on the training thread: wait for pending records and tell what they did. Inside an
        observer it returns at once (the worker waits for the observers, so the state is the record told),
        unless ``flush``: a change of state made by an observer (a record, a load, close) applies and tells
        every pending record first."""
        if self._offload is None or self._offload.is_worker():
            return
        with self._lock:
            if flush or not self._offload.telling:  # only the thread that holds the lock can be telling
                self._offload.settle(self._tell_item)

    @property
    def num_modes(self) -> int | None:
        """M, known once the warm-up has ended."""
        return None if self.reference_index is None else self.reference_index.numel()

    @property
    def window_start(self) -> int:
        """First record of the fit window (the last warm-up record, F − 1)."""
        return self.config.warmup - 1

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
    def references(self) -> torch.Tensor:
        """The reference values, M × num_records (a view: do not modify; it changes with the next record)."""
        self._require_tracking("references")
        return self._table.columns(self.num_records)

    @property
    def reference_slots(self) -> ReferenceSlots | None:
        """Where the reference weights this process holds sit in its flat index (None during the warm-up;
        with offload, waits for pending records)."""
        self._sync()
        return self._slots

    @property
    def summary(self) -> RecordingSummary | None:
        """What observers read of the statistics: a frozen :class:`~cmd_online.summary.RecordingSummary` of them
        now (None during the warm-up; with offload, waits for pending records)."""
        self._sync()
        return None if self._stats is None else RecordingSummary.of(self._stats)

    @property
    def moments(self) -> StreamingMoments | None:
        """Internal: the live streaming statistics, for tests and benchmarks (None during the warm-up; with
        offload, waits for pending records). They change with every record and may change shape between
        versions; observers read :attr:`summary`."""
        self._sync()
        return self._stats

    def fit_blocks(self, block: int | None = None, tensors: list[int] | None = None) -> Iterator[FitBlock]:
        """The fit of every local weight, block by block: extra memory of a few blocks, whatever N.

        Each block lies inside one parameter; references are pinned to a = 1, b = 0 in their mode.

        Args:
            block (int): weights per block (default: a cache-sized block on CPU, larger on accelerators).
            tensors (list of int): only the blocks of these parameters (default all).
        """
        self._require_tracking("fit_blocks")
        self._report_skips()
        return self._fit_blocks(block, tensors)

    def _fit_blocks(self, block: int | None = None, tensors: list[int] | None = None) -> Iterator[FitBlock]:
        """:meth:`fit_blocks` of the statistics as they are (the freeze, on the worker or before a record is
        told, must not wait for pending records)."""
        stats = self._stats
        size = block or (FIT_BLOCK if self.device.type == "cpu" else 1 << 22)
        resolved = stats.resolved_references()
        moving = resolved.tolist()
        overflowed = [] if bool(torch.isfinite(stats.ref_sumsq).all()) else list(self.layout.names)
        for tensor, local, flat in stats.block_plan(size):
            if tensors is not None and tensor not in tensors:
                continue
            fit = stats.fit(flat, resolved)
            pin_references(fit, *self._slots.within(flat.start, flat.stop), moving)
            name = self.layout.names[tensor]
            # S ≥ 0: its largest value is finite exactly when all are (and |P| ≤ √(SQ) then is too)
            if name not in overflowed and flat.stop > flat.start and not bool(stats.sumsq_of(flat).max() < math.inf):
                overflowed.append(name)
            yield FitBlock(tensor, local, flat, fit)
        if overflowed:
            warnings.warn(f"CMDRecorder: the statistics of {', '.join(overflowed[:5])}{' …' if len(overflowed) > 5 else ''}"
                          f" overflowed "
                          f"float32 (weights near its largest value, or moving by more than ~1e19 between "
                          f"records): their CMD weights are not meaningful", RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------------------- recording
    def _after_step(self, optimizer, args, kwargs) -> None:
        # GradScaler calls step() of optimizers that unscale themselves (fused Adam, AdamW, SGD) even for a
        # step it skips, with found_inf set: such a step changed nothing and does not count (one read)
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf):
            return
        if self._swapped:  # it trained the CMD weights, which the block's exit replaces: nothing to record
            if not self._warned_swapped_step:
                self._warned_swapped_step = True
                warnings.warn("CMDRecorder: optimizer.step() inside swapped(): it changes the CMD weights, which "
                              "the end of the block replaces by the trained ones, so the step is lost (during the "
                              "warm-up, where swapped() keeps the trained weights, it trains them); it is not "
                              "counted for record_every and no record is taken inside the block. Train outside "
                              "swapped()", RuntimeWarning, stacklevel=4)
            return
        self._steps += 1
        self._after_auto = False
        every = self.config.record_every
        if every is not None and self._steps % every == 0:
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
            if self._swapped:
                raise RuntimeError("record() inside swapped(): the parameters hold the CMD weights, not the trained "
                                   "ones, and would enter the statistics as a point of the trajectory (during the "
                                   "warm-up swapped() keeps the trained weights, and still nothing is recorded "
                                   "inside it); record after the block")
            self._closed = False
            self._warn_if_params_changed()
            weights = self._local_weights()
            if self._offload is not None:
                try:
                    self._deliver()  # may raise the failure of an earlier record: this one is still taken
                finally:
                    taken = self._submit(weights)
                return taken
            started = self._stats is not None
            if started and self._stats.kernel == "flat":
                self._flat_record(weights)
            else:
                values = self._shards.assemble((self._ref_plan if started else self._sample_plan)(weights))
                if self.check_finite and not self._finite_now(weights):
                    return False
                if not self._take_agreed(weights, values):
                    return False
            try:
                self._freeze_when_due()  # the record is taken even if the freeze fails: it comes again
            finally:
                self._tell(started, self._stats is not None, None)
            return True

    def _take_agreed(self, weights: list[torch.Tensor], values: torch.Tensor) -> bool:
        """:meth:`_take`; under FSDP2 the record that ends the warm-up is taken on every rank or on none."""
        if not (self._stats is None and self._warmup_records == self.config.warmup - 1):
            self._take(weights, values)
            return True
        _, others = self._attempt(lambda: self._take(weights, values))
        return self._undo_warmup_end(others)

    def _undo_warmup_end(self, others: list[tuple[int, str]]) -> bool:
        """True if no other rank failed the record that ends the warm-up; otherwise the record is undone here:
        False, and a warning naming the ranks."""
        if not others:
            return True
        self._to_warmup()
        self._warmup_records = self.config.warmup - 1
        warnings.warn(f"CMDRecorder: record {self._warmup_records} (the end of the warm-up) was not taken on any "
                      f"rank: it failed on {_ranks(others)}; the next record ends the warm-up", RuntimeWarning,
                      stacklevel=4)
        return False

    def _attempt(self, work: Callable[[], Any]) -> tuple[Any, list[tuple[int, str]]]:
        """``work()`` on this process, agreed with the other ranks: under FSDP2 every rank learns whether it
        failed on any (one small all-reduce; one process or DDP: nothing to agree), so that no rank goes on
        alone into a collective or another phase. This rank's error is raised once the ranks agreed; returns
        the result and the other ranks' failures (empty where none failed)."""
        error = result = None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then raised
            error = e
        return result, self._agree(error)

    def _agree(self, error: BaseException | None) -> list[tuple[int, str]]:
        """Tell the other ranks whether this one failed (``error``) and learn which of them did; this rank's
        error is raised then. The other ranks' failures, as (rank, text)."""
        others = self._shards.agree(error)
        if error is not None:
            raise error
        return others

    def _agreed(self, what: str, work):
        """``work()``, this process's part of a collective query (:meth:`_attempt`); another rank's failure raises a
        RuntimeError naming it."""
        result, others = self._attempt(work)
        if others:
            raise RuntimeError(f"CMDRecorder.{what} failed on {_ranks(others)}; nothing was gathered on any rank")
        return result

    def _tell(self, was_tracking: bool, tracking: bool, index: int | None) -> None:
        """The observers: the warm-up ended (if it did at this record), and record ``index`` (default the
        last) was taken."""
        if tracking and not was_tracking:
            notify(self.observers, "on_tracking_start", self)
        if self.observers:
            notify(self.observers, "on_record", self, self._records() - 1 if index is None else index)

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
        """Which recorded parameters the model (else the optimizer) no longer holds — replaced after the
        recorder was built, e.g. by ``model.load_state_dict(sd, assign=True)`` — as a sentence; "" if none."""
        model = None if self._model is None else self._model()
        holder = model if model is not None else self._optimizer()
        if holder is None:
            return ""
        if model is not None:
            if self._shards.sharded:  # FSDP2 holds its sharded parameters once its modules are resharded
                dist_utils.reshard(model)
            held = {id(p) for p in model.parameters()}
        else:
            held = {id(p) for group in holder.param_groups for p in group["params"]}
        params = [ref() for ref in self._param_refs]
        gone = [name for name, p in zip(self.layout.names, params) if p is not None and id(p) not in held]
        if not gone:
            return ""
        names = ", ".join(repr(n) for n in gone[:5]) + (" …" if len(gone) > 5 else "")
        return (f"parameter(s) {names} of the {'model' if model is not None else 'optimizer'} are no longer the "
                f"tensors recorded (replaced after the recorder was built, e.g. by load_state_dict(..., "
                f"assign=True) or a new nn.Parameter)")

    def _refuse_if_replaced(self, what: str) -> None:
        """``swapped``, ``cmd_state_dict`` and ``export`` would write into, or label as CMD, tensors the model
        no longer uses: refused."""
        replaced = self._replaced()
        if replaced:
            raise ValueError(f"{what}: {replaced}, so the CMD weights would go to tensors the model no longer "
                             f"uses; build a new recorder for the new parameters")

    def _local_weights(self) -> list[torch.Tensor]:
        """This process's part of every parameter, flat, in its own dtype (views: nothing is copied)."""
        return [w.detach().reshape(-1) for w in self._shards.local(self.params)]

    def _take(self, weights: list[torch.Tensor], values: torch.Tensor) -> None:
        """Apply one checked record (on the training thread, or the offload worker with host copies):
        ``values`` are the sampled weights during the warm-up, the reference values after it. The freeze
        that may be due after it is the caller's (:meth:`_freeze_when_due`)."""
        if self._stats is None:
            t = self._warmup_records
            self._history[:, t] = values
            if t == self.config.warmup - 1:
                self._start_tracking(weights)  # if it fails, the record is not taken: it can come again
            self._warmup_records = t + 1
            return
        self._table.write(self.window_start + self._stats.count, values)
        self._stats.update(weights, values)

    def _flat_record(self, weights: list[torch.Tensor]) -> None:
        """A record of the flat kernel after the warm-up: nothing here waits for the device."""
        stats = self._stats
        refs = self._shards.assemble(self._ref_plan(weights))
        ok = self._finite_flags(weights, exact=True)[0].all() if self.check_finite else None
        self._table.reserve(self.window_start + self._device_attempts + 2)
        self._table.write(stats.count_t.long() + self.window_start, refs)  # overwritten if skipped
        stats.update(weights, refs, ok)
        self._device_attempts += 1

    # ----------------------------------------------------------------------------- offload
    def _submit(self, weights: list[torch.Tensor]) -> bool:
        """Hand one record to the offload worker: host copies of the weights and of the gathered values.

        An observer's record (re-entrant: a record is being told) first applies and tells every pending
        record, and is applied and told itself before it returns, as without offload. Under FSDP2 the record
        that ends the warm-up or freezes the modes is agreed between the ranks (:meth:`_agree_offloaded`).
        False if it was not taken because it failed on another rank."""
        offload = self._offload
        pending = offload.pending()  # first: it goes down only after the counters it is added to went up
        nested = offload.telling
        error = None
        if nested or self._may_change(pending):
            try:  # the phase (which values the record gathers) must be known, and no one waits for the worker
                offload.settle(self._tell_item)
            except OffloadError as e:  # an earlier record's failure: raised below, this one is still taken
                error = e
        tracking = self._stats is not None
        values = self._shards.assemble((self._ref_plan if tracking else self._sample_plan)(weights))
        finite = None
        if self.check_finite and self._shards.sharded:  # the ranks must agree: check their shards together
            finite = self._finite_flags(weights, exact=True)[0].all()
        # the same on every rank: the counters agree, and a pending record can change nothing that matters here
        critical = self._shards.sharded and self._is_critical() and (finite is None or bool(finite))
        offload.gate.hold = bool(self.observers)
        self._submitting()
        offload.submit(weights, values, finite, tracking, self.check_finite)
        taken = True
        if critical:
            taken = self._agree_offloaded(tracking)
        elif nested:  # the observer that took it reads its state next, as without offload
            offload.settle(self._tell_item)
        if error is not None:
            raise error
        return taken

    def _submitting(self) -> None:
        """Called as a record is handed to the offload worker (in the order the worker applies them)."""

    def _may_change(self, pending: int) -> bool:
        """Whether this record or one of the ``pending`` ones may end the warm-up (the values a record gathers
        change), or, under FSDP2, freeze the modes (which the ranks do together, on the training thread)."""
        if self._stats is None:
            return self._warmup_records + pending >= self.config.warmup - 1
        return self._shards.sharded and self._freeze_within(pending + 1)

    def _freeze_within(self, records: int) -> bool:
        due = self.config.freeze_modes_after
        return due is not None and not self._stats.compact and self._stats.count + records >= due

    def _is_critical(self) -> bool:
        """Under FSDP2 with offload, once nothing pending can change the phase: this record ends the warm-up
        or is due to freeze the modes."""
        if self._stats is None:
            return self._warmup_records == self.config.warmup - 1
        return self._freeze_within(1)

    def _agree_offloaded(self, tracking: bool) -> bool:
        """FSDP2 with offload, a record that ends the warm-up or freezes the modes: wait for the worker to apply
        it (telling nothing yet), take it on every rank or on none, freeze on every rank or on none (here, on
        the training thread: collectives never run on the worker), then tell it."""
        offload = self._offload
        offload.wait()
        error = offload.take_error()
        try:
            if not tracking:
                others = self._agree(None if error is None else OffloadError.of(error))
                if not self._undo_warmup_end(others):
                    offload.discard()
                    return False
            elif error is not None:
                raise OffloadError.of(error)
            self._freeze_when_due()
            return True
        finally:
            offload.settle(self._tell_item)

    def _apply_offloaded(self, job: Job) -> tuple:
        """The worker thread: check and apply one record from host copies. Returns what to tell the training
        thread later, ``("skip", parameters, index)`` or ``("record", (was tracking, tracking), index)``, and
        the failure of the freeze after a record taken (None if none)."""
        weights = job.weights
        if job.finite is not None:
            bad = [] if bool(job.finite) else ["(a shard of another rank)"]
        else:  # the setting when the record was taken (sharded runs checked on submit: no collective here)
            bad = self._nonfinite(weights) if job.check_finite else []
        if bad:
            self._skipped += 1
            return ("skip", bad, self._records()), None
        started = self._stats is not None
        if job.tracking != started:
            raise RuntimeError("offload: a record's values were gathered for another phase")
        self._take(weights, job.values.to(self._coefficient_dtype))
        item = "record", (started, self._stats is not None), self._records() - 1
        failure = None
        if not self._shards.sharded:  # under FSDP2 the ranks freeze together, on the training thread
            try:
                self._freeze_when_due()
            except Exception as e:  # noqa: BLE001 - the record is taken and told; the freeze comes again
                failure = AfterRecordError(f"the freeze of the modes after record {item[2]} failed ({e!r}); the "
                                           f"record was taken, and the freeze comes again at the next record")
                failure.__cause__ = e
        return item, failure

    def _deliver(self) -> None:
        """On the training thread: raise a failure of the worker, warn about skipped records, tell observers,
        in order (inside an observer: nothing, the records are told one after the other)."""
        if self._offload.telling:
            return
        try:
            self._offload.check()
        finally:
            self._offload.deliver(self._tell_item)

    def _tell_item(self, item: tuple) -> None:
        """Tell one thing the worker did (:meth:`_apply_offloaded`): a skipped record, or a record taken."""
        kind, detail, index = item
        if kind == "skip":
            self._warn_skipped(index, detail, " (offloaded)")
        else:
            self._tell(*detail, index)

    def _drain(self, timeout: float | None = None) -> None:
        """Apply and tell every record in flight (a recorder dropped, or at the interpreter's exit), and flush
        the TensorBoard loggers' writers, so that what the observers were told reaches the disk."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return  # another thread holds the recorder (a daemon thread at exit): do not hang the exit
        try:
            if self._offload.owner_alive():
                self._offload.settle(self._tell_item, timeout)
            else:  # freed by the garbage collector in a cycle: the worker stopped; tell what it applied
                self._offload.deliver(self._tell_item)
            flush_writers(self.observers)
        finally:
            self._lock.release()

    def _drain_at_exit(self) -> None:
        """At the interpreter's exit (a script that ends without close()): every record reaches the observers."""
        try:
            self._drain(EXIT_WAIT)
        except Exception as e:  # noqa: BLE001 - at exit: say it, do not raise
            warnings.warn(f"CMDRecorder: at exit, its last records could not all be applied and told: {e!r}",
                          RuntimeWarning, stacklevel=2)

    def __del__(self) -> None:
        offload = self.__dict__.get("_offload")
        if offload is None or sys.is_finalizing():
            return
        if offload.is_worker():  # the worker let go of the last reference: drain on another thread
            threading.Thread(target=self._drain_dropped, name="cmd_online-drain", daemon=True).start()
        else:
            self._drain_dropped()

    def _drain_dropped(self) -> None:
        """A recorder dropped without close(): its records in flight reach the observers first."""
        try:
            self._drain()
        except Exception as e:  # noqa: BLE001 - in a finaliser: say it, do not raise
            warnings.warn(f"CMDRecorder: dropped; its last records could not all be applied and told: {e!r}",
                          RuntimeWarning, stacklevel=2)

    # ----------------------------------------------------------------------------- copies
    def __reduce_ex__(self, protocol):
        raise TypeError("a CMDRecorder cannot be copied or pickled (it is attached to an optimizer, and holds a lock "
                        "and possibly a worker thread): save rec.state_dict() and load it with load_state_dict() "
                        "into a new CMDRecorder")

    def __copy__(self):
        self.__reduce_ex__(4)

    def __deepcopy__(self, memo):
        self.__reduce_ex__(4)

    def _finite_flags(self, weights: list[torch.Tensor], exact: bool) -> tuple[torch.Tensor, list[int]]:
        """Device flags, one per parameter, that all its values on every rank are finite, and the
        parameter of each flag (one multi-tensor kernel per dtype).

        ``exact``: read the largest |w| of each tensor, which never overflows (the flat kernel's check,
        fast on accelerators); else the L2 norm, fast everywhere, which also flags finite values of
        |w| ≳ 1e19 in float32: :meth:`_finite_now` then looks at those tensors again, exactly.
        """
        groups: dict[torch.dtype, list[int]] = {}
        for i, w in enumerate(weights):
            groups.setdefault(w.dtype, []).append(i)
        order = [i for group in groups.values() for i in group]
        flags = []
        for group in groups.values():
            nonempty = [weights[i] if weights[i].numel() else weights[i].new_zeros(1) for i in group]
            norms = torch._foreach_norm(nonempty, float("inf")) if exact else torch._foreach_norm(nonempty)
            flags.append(torch.isfinite(torch.stack(norms)))
        return self._shards.all_ranks(torch.cat(flags)), order

    def _nonfinite(self, weights: list[torch.Tensor]) -> list[str]:
        """The parameters holding NaN/Inf (checked on the host; empty for a record that may be taken)."""
        finite, order = self._finite_flags(weights, exact=False)
        if bool(finite.all()):
            return []
        finite, order = self._finite_flags(weights, exact=True)  # rare: an overflowing norm, or a real NaN/Inf
        return [self.layout.names[order[j]] for j in torch.nonzero(~finite).flatten().tolist()]

    def _finite_now(self, weights: list[torch.Tensor]) -> bool:
        """The finite check on the host: False (and a warning naming the parameters) for a skipped record."""
        bad = self._nonfinite(weights)
        if not bad:
            return True
        self._skipped += 1
        self._warn_skipped(self._records(), bad)
        return False

    def _warn_skipped(self, index: int, bad: list[str], how: str = "") -> None:
        """Warn about one skipped record, naming (up to five of) the parameters that held NaN/Inf."""
        self._skips_reported += 1
        warnings.warn(f"CMDRecorder: record {index} skipped{how}: non-finite (NaN/Inf) values in "
                      f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; the statistics are unchanged",
                      RuntimeWarning, stacklevel=5)

    def _report_skips(self) -> None:
        """Warn about records the flat kernel skipped since the last report (reads its count)."""
        if self._stats is None or self._stats.kernel != "flat":
            return
        skipped = self._skips()
        if skipped > self._skips_reported:
            warnings.warn(f"CMDRecorder: {skipped - self._skips_reported} record(s) skipped since the last report: "
                          f"non-finite (NaN/Inf) weights; the statistics are unchanged", RuntimeWarning, stacklevel=4)
            self._skips_reported = skipped

    def _start_tracking(self, weights: list[torch.Tensor]) -> None:
        """End of warm-up: cluster the sampled history, fix the references (Algorithm 1, steps 2–4). All or
        nothing: if it fails, the recorder is still in the warm-up."""
        start = time.perf_counter()
        LOG.info("CMDRecorder: warm-up of %d records done; clustering %d sampled weights", self.config.warmup,
                 self.config.samples)
        try:
            found = self._cluster()
            position = torch.from_numpy(found.reference)
            self._set_references(self.sample_index[position], self._history[position.to(self.device)])
            self.clustering = found
            self._stats.update(weights, self._table.columns(self.config.warmup)[:, -1])
        except BaseException:
            self._to_warmup()
            raise
        sizes = np.bincount(found.labels[found.labels >= 0], minlength=found.num_modes).tolist()
        LOG.info("CMDRecorder: %d modes (sampled weights per mode: %s); CMD weights exist from record %d on; "
                 "the end of the warm-up took %.2f s", found.num_modes, sizes, self.window_start,
                 time.perf_counter() - start)

    def _cluster(self) -> Clustering:
        return cluster(self._history, self.config.modes, self.config.threshold, self.config.distance,
                       self.config.max_modes)

    def _to_warmup(self) -> None:
        """Back to the warm-up's last record: no clustering, references or statistics (a failed end of it)."""
        self.clustering = None
        self.reference_index = self._ref_plan = self._slots = self._table = self._stats = None
        self._device_attempts = 0

    def _set_references(self, reference_index: torch.Tensor, values: torch.Tensor, stats: dict | None = None,
                        copy: bool = True) -> None:
        """References, their table and statistics — zeros, or those of a resumed state ``stats`` — all or
        nothing."""
        reference_index = reference_index.long().cpu()
        ref_plan = self._shards.gather_plan(self.layout, reference_index, self._param_device)
        slots = self._shards.reference_slots(self.layout, reference_index)
        table = ReferenceTable(values.to(self.device, self._coefficient_dtype))
        moments = self._new_moments(reference_index.numel(), allocate=stats is None)
        if stats is not None:
            moments.restore(stats, copy)
        # a reference moves by rounding only at the resolution of its own parameter's dtype
        moments.ref_eps = self.layout.resolution(reference_index).to(self.device)
        if isinstance(moments, SnapshotMoments):  # the window's reference values and reference weights
            moments.ref_window = lambda: table.columns(self.window_start + moments.count)[:, self.window_start:]
            moments.pins = slots.within
        self.reference_index, self._ref_plan, self._slots, self._table = reference_index, ref_plan, slots, table
        self._stats, self._device_attempts = moments, 0

    def _new_moments(self, num_modes: int, allocate: bool = True) -> StreamingMoments:
        """Statistics of this recorder's kind: :class:`SnapshotMoments` (the compact form throughout) when
        ``freeze_modes_after`` ≤ 4, else :class:`StreamingMoments` (the full form, frozen after k ≥ 5)."""
        sizes, due = [s.numel() for s in self._local_shapes], self.config.freeze_modes_after
        options = dict(shift_dtype=self._coefficient_dtype, kernel=self._kernel, allocate=allocate)
        if keeps_snapshots(due):
            return SnapshotMoments(sizes, num_modes, self.device, freeze_after=due, **options)
        return StreamingMoments(sizes, num_modes, self.device, **options)

    def _freeze_when_due(self) -> None:
        """Fix each weight's mode once ``freeze_modes_after`` records of the window are taken. If it fails
        it comes again at the next record; under FSDP2 the ranks freeze together or not at all."""
        stats, due = self._stats, self.config.freeze_modes_after
        if stats is None or due is None or stats.compact:
            return
        if stats.kernel == "flat":  # read the device count only once the freeze can be due
            if self._device_attempts + 1 < due or stats.window_count() < due:
                return
        elif stats.count < due:
            return
        def fixed_modes() -> torch.Tensor:
            modes = torch.empty(sum(stats.sizes), dtype=mode_dtype(self.num_modes), device=self.device)
            for block in self._fit_blocks(block=FREEZE_BLOCK):  # small blocks: the freeze adds little to the peak
                modes[block.flat] = block.fit.modes.to(modes.dtype)
            return modes

        modes, others = self._attempt(fixed_modes)
        if others:
            warnings.warn(f"CMDRecorder: the freeze of the modes failed on {_ranks(others)}; no rank froze, and the "
                          f"freeze comes again at the next record", RuntimeWarning, stacklevel=4)
            return
        stats.freeze(modes)

    # ----------------------------------------------------------------------------- queries
    def _require_tracking(self, what: str) -> None:
        self._sync()
        if self._stats is None and self._warmup_records == 0 and self._skipped == 0:
            raise RuntimeError(f"{what} is not available: no record was taken yet ({self._steps} optimizer step(s) "
                               f"so far): call record() after your optimizer steps, or pass record_every "
                               f"(CMD weights exist after warmup={self.config.warmup} records)")
        if self._stats is None:
            remaining = self.config.warmup - self._warmup_records
            raise RuntimeError(f"{what} is not available during the warm-up: {remaining} more record(s) "
                               f"needed (warmup={self.config.warmup}, recorded {self._warmup_records})")

    @property
    def _coefficient_dtype(self) -> torch.dtype:
        """dtype of a and b: float32, or float64 if a parameter is (its weights then come back exactly)."""
        return self.layout.coefficient_dtype

    def _output_dtypes(self) -> list[torch.dtype]:
        """Each parameter's current dtype (the recorded one once the parameters are gone)."""
        params = [ref() for ref in self._param_refs]
        return [self.layout.dtypes[i] if p is None else p.dtype for i, p in enumerate(params)]

    def _cmd_tensors(self, at: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(parameter, its CMD weights at record ``at``), one parameter at a time."""
        self._require_tracking("cmd_parameters")
        at = normalize_at(at, self.num_records)
        column = self._table.columns(self.num_records)[:, at]
        dtypes = self._output_dtypes()
        overflow = []
        for i, shape in enumerate(self._local_shapes):
            out = torch.empty(shape.numel(), dtype=dtypes[i], device=self.device)
            for block in self.fit_blocks(tensors=[i]):
                a, b = (x.to(self._coefficient_dtype) for x in (block.fit.a, block.fit.b))  # as trajectory() holds them
                out[block.local] = reconstruct(a, b, block.fit.modes, column).to(out.dtype)
            if out.numel() and not all(map(math.isfinite, torch.aminmax(out))):  # one pass, no mask
                overflow.append(self.layout.names[i])
            yield i, out.view(shape).to(self._param_device)
        if overflow:
            warnings.warn(f"CMDRecorder: the CMD weights of {', '.join(overflow[:5])}{' …' if len(overflow) > 5 else ''}"
                          f" at record {at} are not all finite: the fit goes beyond the range of "
                          f"{self._coefficient_dtype} (weights near its largest value?)", RuntimeWarning, stacklevel=3)

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
        self._require_tracking("cmd_state_dict")
        self._refuse_if_replaced("cmd_state_dict")
        params = self.params
        full = self._shards.full_tensors(self._agreed("cmd_state_dict()", lambda: self.cmd_parameters(at)), params)
        by_id = {id(p): v for p, v in zip(params, full)}
        sd = model.state_dict(keep_vars=True)
        # the parameters the optimizer does not hold are the live ones, whole (gathered under FSDP2)
        return {k: by_id[id(v)] if id(v) in by_id else dist_utils.whole(v) if isinstance(v, torch.Tensor) else v
                for k, v in sd.items()}

    # ----------------------------------------------------------------------------- swap (torch_ema's primitives)
    @_serialised
    def store(self) -> None:
        """Keep a copy of the trained weights (this process's shards under FSDP2), to be put back by :meth:`restore`.

        From ``store()`` to ``restore()`` the parameters count as swapped, as inside :meth:`swapped`: ``record()``
        is refused and optimizer steps are not counted. One copy at a time: a second ``store()`` before
        ``restore()`` raises a RuntimeError."""
        if self._stored is not None:
            raise RuntimeError("store(): the trained weights are stored already; restore() them first")
        self._sharded_model()  # under FSDP2 the swap needs the model: refused before anything changes
        self._stored = [p.detach().clone() for p in self._shards.local(self.params)]
        self.mark_swapped(True)

    def copy_to(self, at: int = -1) -> None:
        """Write the CMD weights at record ``at`` into the parameters, after :meth:`store` (a RuntimeError
        otherwise: the trained weights would be lost). Under FSDP2 it needs ``model`` and reshards its FSDP
        modules. During the warm-up, ``at=-1`` leaves the trained weights in place (a UserWarning, once), as
        :meth:`swapped` does. On an error the stored weights are put back and the error is raised."""
        self._copy_in(at, "copy_to")

    @_serialised
    def _copy_in(self, at: int, what: str) -> None:
        """:meth:`copy_to`, its errors and notices naming ``what`` (the method the user called)."""
        if self._stored is None:
            raise RuntimeError("copy_to() overwrites the trained weights: call store() first (or use swapped())")
        if at == -1 and self._fallback(what):
            return
        self._require_tracking(what)
        self._refuse_if_replaced(what)
        model = self._sharded_model()
        local = self._shards.local(self.params)
        try:
            with torch.no_grad():
                for i, value in self._cmd_tensors(at):
                    local[i].copy_(value)
        except BaseException:
            _copy_back(local, self._stored, model)
            raise
        if model is not None:
            dist_utils.reshard(model)  # FSDP2's unsharded copies of the trained weights must go

    @_serialised
    def restore(self, keep: bool = False) -> list[torch.Tensor] | None:
        """Put the weights :meth:`store` kept back into the parameters, and end the swap.

        With ``keep``, returns a copy of what each parameter held before (the CMD weights of :meth:`copy_to`), in
        the order of ``params``, copied one parameter at a time (no more memory than the swap itself); else None.
        A RuntimeError if nothing is stored."""
        if self._stored is None:
            raise RuntimeError("restore(): nothing is stored; call store() (and copy_to()) first")
        saved, self._stored = self._stored, None
        local = self._shards.local(self.params)
        kept: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for p in reversed(local):  # each stored copy is freed once it is back
                    value = saved.pop()
                    if keep:
                        kept.append(p.detach().clone())
                    p.copy_(value)
                    del value
            model = self._sharded_model()
            if model is not None:  # FSDP2: no unsharded copy of the CMD weights may outlive the swap
                dist_utils.reshard(model)
        finally:
            self.mark_swapped(False)
        return kept[::-1] if keep else None

    @property
    def stored_parameters(self) -> list[torch.Tensor] | None:
        """The trained weights :meth:`store` kept, in the order of ``params`` (a view: do not modify), or None."""
        return self._stored

    @property
    def is_swapped(self) -> bool:
        """Whether the parameters count as swapped now: inside :meth:`swapped`, between :meth:`store` and
        :meth:`restore`, or between ``mark_swapped(True)`` and ``mark_swapped(False)``."""
        return self._swapped > 0

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """Context manager: CMD weights live in the parameters inside it; the trained ones come back on exit.
        It is :meth:`store`, :meth:`copy_to` and :meth:`restore`.

        During the warm-up (no CMD weights yet) ``swapped()`` with the default ``at=-1`` leaves the
        trained weights in place, so that an evaluation loop needs no guard, and says so once in a
        UserWarning; ``ready`` tells the two apart. An explicit ``at`` during the warm-up, or a query
        before any record, raises a RuntimeError.

        Inside it nothing is recorded: ``record()`` is refused, and an optimizer step (which would train the
        CMD weights, replaced on exit) warns once and is not counted for ``record_every``."""
        if at == -1 and self._fallback("swapped"):
            with self._marked_swapped():  # the trained weights stay; still nothing is recorded inside the block
                yield
            return
        self.store()
        try:
            self._copy_in(at, "swapped")
            yield
        finally:
            self.restore()

    def mark_swapped(self, on: bool = True) -> None:
        """Enter (``on``) or leave (``on=False``) a span in which the parameters hold other weights than the
        trained ones, as inside :meth:`swapped` (which marks itself): ``record()`` is refused and optimizer
        steps are not counted meanwhile. For code that writes other weights into the parameters itself (the
        swap primitives mark themselves); calls nest and must pair up."""
        with self._lock:
            self._swapped += 1 if on else -1
            if on:
                self._warned_swapped_step = False

    @contextlib.contextmanager
    def _marked_swapped(self) -> Iterator[None]:
        self.mark_swapped(True)
        try:
            yield
        finally:
            self.mark_swapped(False)

    def _fallback(self, what: str) -> bool:
        """During the warm-up: True, and a one-time notice that ``what`` runs on the trained weights. False once CMD
        weights exist, and when optimizer steps were taken but never a record without ``record_every`` (the
        query's error says what to do)."""
        if self.ready or (self._records() == 0 and self._skipped == 0 and self._steps > 0
                          and self.config.record_every is None):  # record() forgotten (record_every records later)
            return False
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(f"CMDRecorder: {what}() during the warm-up ({self.config.warmup - self._records()} more "
                          f"record(s) until CMD weights exist) keeps the trained weights in the model; check "
                          f"rec.ready to tell them apart (this notice comes once)", UserWarning, stacklevel=4)
        return True

    def _sharded_model(self) -> torch.nn.Module | None:
        """Under FSDP2, the model (whose FSDP modules ``swapped`` reshards); None otherwise."""
        if not self._shards.sharded:
            return None
        if self._model is None:
            raise ValueError("swapped() under FSDP2 needs the model: pass model= to CMDRecorder, so that FSDP's "
                             "unsharded copies of the trained weights are dropped on entry and exit")
        return self._live_model()

    @_serialised
    def export(self, path, at: int = -1) -> None:
        """Write ``cmd_state_dict(at)`` as a normal checkpoint, atomically (rank 0 only when distributed).

        Load it with ``model.load_state_dict(torch.load(path))``.
        """
        self._require_tracking("export")
        self._refuse_if_replaced("export")
        sd = self.cmd_state_dict(at)
        if dist_utils.is_writer():
            atomic_save(sd, path)

    def _clustered_fit(self) -> tuple[torch.Tensor, ...]:
        """:meth:`_flat_fit`, after the clustering of the samples that a resumed recorder does again from the kept
        warm-up history (for the trajectory's ``sample_modes``): both in the ranks' agreed part of a query."""
        if self.clustering is None and not self._foreign_clustering:
            found = self._cluster()
            # the same clustering as the state's if it picks the same references (a state of an earlier version
            # may have clustered otherwise: its modes are not these labels' modes)
            if torch.equal(self.sample_index[torch.from_numpy(found.reference).long()].cpu(), self.reference_index.cpu()):
                self.clustering = found
            else:
                self._foreign_clustering = True
        return self._flat_fit()

    def _flat_fit(self) -> tuple[torch.Tensor, ...]:
        """a, b and modes of every local weight as flat tensors (a, b float64 if a parameter is), and per
        mode the sum of R² and the number of weights (2 × M) over the weights this process owns."""
        N, dtype, M = sum(self._stats.sizes), self._coefficient_dtype, self.num_modes
        a, b = (torch.empty(N, dtype=dtype, device=self.device) for _ in range(2))
        modes = torch.empty(N, dtype=torch.int32, device=self.device)
        totals = torch.zeros(2, M, dtype=torch.float64, device=self.device)
        for block in self.fit_blocks():
            fit = block.fit
            a[block.flat], b[block.flat], modes[block.flat] = fit.a, fit.b, fit.modes
            owned = range(self._stats.sizes[block.tensor])[self._shards.owned_part(block.tensor)]
            start, stop = max(owned.start, block.local.start), min(owned.stop, block.local.stop)
            if start < stop:  # a weight held by several ranks counts once
                part = slice(start - block.local.start, stop - block.local.start)
                totals[0].index_add_(0, fit.modes[part], fit.r2[part])
                totals[1] += torch.bincount(fit.modes[part], minlength=M)
        return a, b, modes, totals

    @_serialised
    def trajectory(self) -> CMDTrajectory:
        """The CMD model so far, as a :class:`CMDTrajectory` with full tensors.

        Under FSDP2 it is collective: every rank gathers a, b (float32, float64 for a float64 model)
        and the modes (int32) of all N weights, 12 bytes per weight of the whole model, plus as much
        again for a moment; for a model whose a and b do not fit in one process, save
        :meth:`trajectory_state_dict` with torch.distributed.checkpoint instead.
        """
        self._require_tracking("trajectory")
        a, b, modes, totals = self._agreed("trajectory()", self._clustered_fit)
        meta = self._trajectory_meta(totals)
        a, b, modes = (self._shards.gather_flat(x, self._stats.sizes) for x in (a, b, modes))
        return CMDTrajectory(**meta, a=a, b=b, modes=modes)

    def _trajectory_meta(self, totals: torch.Tensor) -> dict[str, Any]:
        """What a trajectory holds besides a, b and the modes: references, their indices and flags, and each
        mode's mean R² from ``totals`` (sums of R² and counts per mode, this process's part)."""
        totals = self._shards.all_sum(totals)
        T = self.num_records
        c = self.clustering  # None: a resumed state whose clustering is not this one (its samples are left out)
        return dict(references=self._table.columns(T).clone(),
                    reference_index=self.reference_index.clone(), window_start=self.window_start, layout=self.layout,
                    mode_r2=(totals[0] / totals[1].clamp_min(1)).float(),
                    set_aside=~self._stats.resolved_references(),
                    sample_index=None if c is None else self.sample_index.clone(),
                    sample_history=None if c is None else self._history.cpu().clone(),
                    sample_modes=None if c is None else torch.from_numpy(c.labels).clone(),
                    metrics=self._metric_table(T))

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
        self._sync()
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict of name → number; got {type(metrics).__name__}")
        records = self._records()
        if records == 0:
            raise RuntimeError("add_metrics needs a record to attach the metrics to, and no record was taken yet: "
                               "call record() after your optimizer steps, or pass record_every")
        at = normalize_at(at, records)
        checked = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"metrics: names must be non-empty str; got {name!r}")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"metrics[{name!r}] must be a number; got {type(value).__name__}")
            checked[name] = float(value)
        for name, value in checked.items():
            self._metrics.setdefault(name, {})[at] = value

    def _metric_table(self, T: int) -> dict[str, torch.Tensor] | None:
        """The metrics as name → float64 tensor of T entries, NaN where none was added; None if there are none."""
        if not self._metrics:
            return None
        table = {}
        for name, values in self._metrics.items():
            column = torch.full((T,), math.nan, dtype=torch.float64)
            for at, value in values.items():
                if at < T:
                    column[at] = value
            table[name] = column
        return table

    @_serialised
    def trajectory_state_dict(self) -> dict[str, Any]:
        """The CMD model as a state_dict for ``torch.distributed.checkpoint``, without gathering anything.

        ``{"meta": bytes, "a", "b", "modes": {parameter name: a tensor shaped like the parameter}}``,
        placed like the parameters (DTensors under FSDP2): ``dcp.save({"trajectory": ...})`` writes each
        rank's part; :func:`cmd_online.checkpoint.load_trajectory` reads it back as a
        :class:`CMDTrajectory` in one process. Collective under FSDP2 (the modes' R² are summed). Outside
        FSDP2 ``meta`` holds a checksum of a, b and the modes, which ``CMDTrajectory.from_state_dict`` checks.
        """
        self._require_tracking("trajectory_state_dict")
        a, b, modes, totals = self._agreed("trajectory_state_dict()", self._clustered_fit)
        a, b, modes = (self._stats.views(x) for x in (a, b, modes))
        meta = {**self._trajectory_meta(totals), "layout": self.layout.to_dict()}
        shapes = [tuple(s) for s in self._local_shapes]
        place = lambda xs: {name: self._shards.like_param(i, x.view(shape))  # noqa: E731
                            for i, (name, x, shape) in enumerate(zip(self.layout.names, xs, shapes))}
        state = {"a": place(a), "b": place(b), "modes": place(modes)}
        if not self._shards.sharded:  # whole tensors: a checksum that holds wherever they are loaded
            meta["checksum"] = checksum(parts_checked(state, self.layout.names))
        return {"meta": pack(meta), **state}

    @_serialised
    def r2(self) -> list[torch.Tensor]:
        """Each weight's R² (ρ² with its mode's reference) over the window, per parameter (local shards)."""
        self._require_tracking("r2")
        out = torch.empty(sum(self._stats.sizes), dtype=torch.float32, device=self.device)
        for block in self.fit_blocks():
            out[block.flat] = block.fit.r2
        return [v.to(self._param_device) for v in self._stats.views(out)]

    @_serialised
    def nbytes(self) -> dict[str, int]:
        """Bytes held in tensors by this recorder, by part (statistics, scratch, history, references,
        indices, the offload's host ``staging`` buffers) and their ``total``."""
        self._sync()
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        out = {
            "statistics": 0 if self._stats is None else self._stats.nbytes(),
            "scratch": 0 if self._stats is None else self._stats.scratch_nbytes(),
            "history": size(self._history),
            "references": 0 if self._table is None else self._table.nbytes(),
            "indices": size(self.sample_index) + size(self.reference_index),
            "staging": 0 if self._offload is None else self._offload.nbytes(),
        }
        out["total"] = sum(out.values())
        return out

    # ----------------------------------------------------------------------------- logging
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

        ``{"meta": bytes, "stats": {...}}`` (version 3, module ``cmd_online.checkpoint``): ``meta`` holds
        the replicated part, ``stats`` one tensor per parameter and statistic, placed like the parameter
        (DTensors under FSDP2), with P padded to the mode bound. Its structure depends on neither the
        phase nor the modes found, so a freshly built recorder is a ``torch.distributed.checkpoint``
        ``Stateful`` that loads, and reshards, any checkpoint of its configuration.

        As a module's ``state_dict`` does, it holds references to the recorder's tensors, not copies:
        save it (``torch.save``, ``dcp.save``) before the next record changes them. Before the warm-up
        ends the statistics are zeros, allocated for the call. Past it, outside FSDP2, ``meta`` holds a
        checksum of the statistics (``cmd_online.files.checksum``) that :meth:`load_state_dict` checks.
        """
        self._sync()
        stats, meta = self._per_parameter_stats(), self._meta()
        if self._stats is not None and not self._shards.sharded:  # whole tensors: a checksum that holds anywhere
            meta["checksum"] = checksum(stats_checked(stats, self.layout.names, self.num_modes, self._stats.compact,
                                                    keeps_snapshots(self.config.freeze_modes_after)))
        return {"meta": pack(meta), "stats": stats}

    def _mode_bound(self) -> int:
        """Rows of P in a state: the configured bound, else the modes found (0 during the warm-up)."""
        bound = self.config.mode_bound
        return bound if bound is not None else (self.num_modes or 0)

    def _meta(self) -> dict[str, Any]:
        stats = self._stats
        moments = {name: None if stats is None else getattr(stats, name) for name in ("ref_shift", "ref_mean",
                                                                                      "ref_sumsq")}
        return {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(),
                "layout": self.layout.to_dict(), "num_records": self._records(), "skipped_records": self._skips(),
                "steps": self._steps, "sample_index": self.sample_index, "history": self._history,
                "reference_index": self.reference_index,
                "references": None if self._table is None else self._table.columns(self._records()),
                "count": 0 if stats is None else stats.window_count(), "compact": stats is not None and stats.compact,
                "shards": self._shards.describe(), **moments, "metrics": self._metric_table(self._records())}

    def _per_parameter_stats(self) -> dict:
        sizes = [s.numel() for s in self._local_shapes]
        bound = self._mode_bound()
        stats = self._stats
        if stats is None:  # zeros of the final shapes: the template a checkpoint of any phase loads into
            stats = self._new_moments(bound)
        modes = stats.modes
        if modes is None:  # the full form: zeros, as a checkpoint of any phase has modes
            modes = torch.zeros(sum(sizes), dtype=mode_dtype(max(bound, 1)), device=self.device)
        views = lambda flat: None if flat is None else list(torch.split(flat, sizes))  # noqa: E731
        fields = {name: views(getattr(stats, name)) for name in ("mean", "sumsq")}
        if not keeps_snapshots(self.config.freeze_modes_after):  # the full form's layout, in every phase
            fields["shift"] = views(stats.shift) if stats.shift is not None else None
        fields["modes"] = views(modes)
        if keeps_snapshots(self.config.freeze_modes_after):  # one row of P in every phase
            bound = 1
        fields["comoment"] = [views(row) for row in stats.comoment[:bound]]
        rows = [torch.arange(*self._shards.rows(i), device=self.device) for i in range(len(sizes))]
        return per_parameter(list(self.layout.names), [tuple(s) for s in self._local_shapes], fields, rows, bound,
                             self._shards.like_param)

    @_serialised
    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict` (this version, or 1 and 2 of earlier cmd_online). Every field is
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
        self._sync(flush=True)
        self._load_state_dict(state, strict)

    def _load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        def checked_state() -> tuple:
            loaded, metrics, fresh = state, {}, False
            if isinstance(state, dict) and "meta" in state:  # version 3
                meta = unpack(state["meta"])
                metrics = _metrics_of_state(meta.get("metrics"))
                loaded = from_per_parameter(meta, state.get("stats"),
                                            [self._shards.rows(i) for i in range(len(self.layout.names))],
                                            self._shards.from_state, config=self.config, layout=self.layout,
                                            strict=strict)
                fresh = True  # its flat statistics are new tensors: taken, not copied again
            checked = check_state(loaded, config=self.config, layout=self.layout, shards=self._shards.describe(),
                                  sample_index=self.sample_index,
                                  local_size=sum(s.numel() for s in self._local_shapes), strict=strict)
            return checked, metrics, fresh

        # the ranks load together or not at all: their phases never differ
        (checked, metrics, fresh), others = self._attempt(checked_state)
        if others:
            raise ValueError(f"the state was refused on {_ranks(others)}; nothing was loaded on any rank")
        # everything checked, on every rank: now change the recorder
        self._history = checked.history.to(self.device, self._coefficient_dtype).clone()
        self._steps = checked.steps
        self._skipped = self._skips_reported = checked.skipped_records
        self.clustering = None  # the sample correlations are not part of a state
        self._foreign_clustering = False
        self._metrics = metrics
        self._after_auto = False
        if checked.reference_index is None:
            self._warmup_records = checked.num_records
            self.reference_index = self._ref_plan = self._slots = self._table = self._stats = None
            return
        self._warmup_records = self.config.warmup
        self._set_references(checked.reference_index, checked.references, checked.stats, copy=not fresh)
        self._device_attempts = self._stats.window_count() - 1

    @_serialised
    def close(self) -> None:
        """Detach from the optimizer (no more records on step) and tell the observers (a writer is flushed),
        once: calling it again before another record does nothing more. With offload, every pending record
        is applied and told first (from an observer too)."""
        self._sync(flush=True)
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
