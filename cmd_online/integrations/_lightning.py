"""The hooks of the Lightning callback, apart from Lightning's ``Callback`` base class.

``lightning.py`` and ``pytorch_lightning.py`` each mix this into their namespace's ``Callback``, so the
one implementation serves ``import lightning.pytorch`` and ``import pytorch_lightning``. It imports
neither: it reads the trainer through its public attributes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import weakref
from typing import Any, Iterator

import torch

from ..config import check_bool, check_int
from ..distributed import is_writer
from ..files import atomic_save
from ..recorder import CMDRecorder
from ..tensorboard import MetricsLogger, TensorBoardLogger
from . import _common
from ._common import Options, Schedule

# Sharded strategies: each rank's checkpoint holds its shard, the callback's state is whole.
_SHARDED = {"FSDPStrategy": "strategy='fsdp'", "DeepSpeedStrategy": "strategy='deepspeed'",
            "ModelParallelStrategy": "ModelParallelStrategy", "XLAFSDPStrategy": "XLAFSDPStrategy"}
TRAINED = "trained_weights"  # the callback state's entry for the trained weights of a checkpoint (see on_save_checkpoint)
PREFIX = "cmd/"  # the CMD weights' validation metrics: val_acc → cmd/val_acc


class LightningCMDHooks(_common.CMDAccess):
    """Records the CMD model of a Lightning training run (``trainer.fit``) with a ``CMDRecorder``.

    Created in one line, ``Trainer(callbacks=[CMDCallback(modes=5, warmup=10)])``. When ``fit`` starts it
    builds ``callback.recorder`` on the LightningModule's torch optimizer; it records once at the end of
    every training epoch (default) or after every k-th optimizer step; it logs the mode statistics to
    every logger of the trainer at the trainer's global step; its state goes into Lightning's
    checkpoints, so ``trainer.fit(model, ckpt_path=...)`` continues the same recording. See
    docs/integrations.md.

    Args:
        record_every_n_steps (int): record after every k-th optimizer step that really happens (not micro-batches
            of gradient accumulation, not steps skipped by AMP's GradScaler); None records once at the end of every
            training epoch, after its last batch and before the epoch's validation (default None).
        swap_for_validation (bool): validate on the CMD weights once they exist, in place of the trained ones;
            the trained weights come back after validation. A checkpoint then holds the validated CMD weights in
            its ``state_dict`` (``LitModel.load_from_checkpoint`` loads them) and the trained ones in the
            callback's state, from which ``fit(ckpt_path=...)`` resumes training (default False).
        evaluate_cmd (bool): validate both: the trained weights as usual, and the CMD weights, whose metrics are
            logged again under ``cmd/`` (``val_acc`` and ``cmd/val_acc``); during the warm-up, when no CMD model
            exists, ``cmd/`` metrics are the trained weights' (default False).
        export_path (str or path): at the end of ``fit``, write the CMD model there as a Lightning checkpoint
            (``LitModel.load_from_checkpoint`` loads it), on global rank 0, atomically (default None: no file).
        writer (SummaryWriter): also log the mode statistics there, with histograms and figures, at the trainer's
            global step (global rank 0 only); it must have ``add_scalar`` (default None).
        log_every (int): log the mode statistics to every logger of the trainer every this many records (reference
            values every record); None: no logging (default 10).
        optimizer_index (int): which of the LightningModule's optimizers to record; needed when it has
            several; one callback per optimizer records them all (default None: the only one).
        resume (bool): when ``fit`` resumes from a checkpoint, continue the recording stored in it, and refuse
            a checkpoint without it; False starts a new recording (default True).
        **recorder: passed to :class:`cmd_online.CMDRecorder`: ``modes`` (default 10 unless ``threshold``),
            ``threshold``, ``max_modes``, ``samples`` (default 1000), ``warmup`` (default 20),
            ``freeze_modes_after``, ``seed``, ``distance``, ``offload``, ``kernel``, ``check_finite``,
            ``callbacks`` (observers of your own); the deprecated ``compile_update`` too. Checked now, by the
            recorder's rules; an argument the recorder does not take is a TypeError naming it.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input, and ``ValueError`` at the start of
    ``fit`` for a sharded strategy (FSDP, DeepSpeed, ModelParallel), for several optimizers without
    ``optimizer_index``, and for a resume from a checkpoint that holds no CMD state (with ``resume=True``).
    A second ``fit`` without a checkpoint continues the recording.
    """

    def __init__(self, *, record_every_n_steps: int | None = None, swap_for_validation: bool = False,
                 evaluate_cmd: bool = False, export_path: str | os.PathLike | None = None,
                 writer=None, log_every: int | None = 10, optimizer_index: int | None = None, resume: bool = True, **recorder: Any):
        self.options = Options.of(record_every_n_steps=record_every_n_steps, log_every=log_every, **recorder)
        self.swap_for_validation = check_bool("swap_for_validation", swap_for_validation)
        self.evaluate_cmd = check_bool("evaluate_cmd", evaluate_cmd)
        if self.swap_for_validation and self.evaluate_cmd:
            raise ValueError("swap_for_validation=True validates the CMD weights in place of the trained ones, "
                             "evaluate_cmd=True validates both (the CMD weights' metrics under cmd/): choose one")
        self.export_path = _common.check_path("export_path", export_path)
        self.writer = _common.check_writer(writer)
        self.optimizer_index = check_int("optimizer_index", optimizer_index, 0, allow_none=True)
        self.resume = check_bool("resume", resume)
        self.recorder: CMDRecorder | None = None
        self._schedule = Schedule(self.options.record_every_n_steps)
        self._swapping = False  # the callback has stored the trained weights and copied the CMD ones in
        self._validated: dict[int, torch.Tensor] | None = None  # the CMD weights the last validation ran on
        self._tee: _LoggedMetrics | None = None  # evaluate_cmd in the warm-up: the trained pass's logs, copied
        self._trainer: weakref.ref | None = None
        self._pending: dict[str, Any] | None = None  # state loaded from a checkpoint before the optimizer exists
        self._found_keys: list[str] = []  # CMDCallback state keys of the checkpoint being loaded

    # ------------------------------------------------------------------------------------- set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._refuse_sharded(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning has created the optimizers (strategy.setup) and already called load_state_dict for a
        # checkpoint given as ckpt_path: build the recorder, then load that state into it.
        self._refuse_sharded(trainer)
        state, self._pending = self._pending, None
        if state is None and self.resume and trainer.ckpt_path is not None:
            found, self._found_keys = self._found_keys, []
            if found:
                raise ValueError(f"CMDCallback: fit resumes from {trainer.ckpt_path}, which holds CMDCallback state "
                                 f"under {', '.join(map(repr, found))} but none under this callback's key "
                                 f"{self.state_key!r}: give each callback the optimizer_index it was saved with, "
                                 "or pass CMDCallback(resume=False) to start a new recording from this point")
            raise ValueError(f"CMDCallback: fit resumes from {trainer.ckpt_path}, which holds no CMDCallback state "
                             "(saved without the callback, or with weights_only=True); pass "
                             "CMDCallback(resume=False) to start a new recording from this point")
        optimizer = self._choose_optimizer(trainer)
        self._end_swap()
        self._validated = self._tee = None
        self.recorder, self._schedule = _common.start_recording(
            optimizer, _common.plain_module(pl_module), self.options, clock=self._clock(trainer),
            earlier=self.recorder, schedule=self._schedule,
            saved=None if state is None else (f"the checkpoint {trainer.ckpt_path}", state),
            # fit called again without a checkpoint: go on with the earlier fit's recording
            continue_at=trainer.current_epoch if trainer.ckpt_path is None else None,
            observers=lambda rec: self._loggers(trainer, rec))
        self._trainer = weakref.ref(trainer)

    def _begin_swap(self) -> None:
        """The CMD weights of the last record into the model (the recorder's store and copy_to)."""
        self.recorder.store()
        self._swapping = True
        try:
            self.recorder.copy_to()
        except BaseException:
            self._end_swap()
            raise

    def _end_swap(self, keep: bool = False) -> dict[int, torch.Tensor] | None:
        """The trained weights back, if the callback swapped; with ``keep``, id(parameter) → the CMD value it held."""
        if not self._swapping:
            return None
        self._swapping = False
        kept = self.recorder.restore(keep=keep)
        return None if kept is None else {id(p): value for p, value in zip(self.recorder.params, kept)}

    @property
    def state_key(self) -> str:
        # one key per optimizer, so that a Trainer can hold a callback for each (as ModelCheckpoint does)
        if self.optimizer_index is None:
            return type(self).__qualname__
        return self._generate_state_key(optimizer_index=self.optimizer_index)

    def _refuse_sharded(self, trainer) -> None:
        names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
        sharded = next((_SHARDED[n] for n in names if n in _SHARDED), "")
        _common.refuse_sharded("Lightning", sharded)

    def _choose_optimizer(self, trainer) -> torch.optim.Optimizer:
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("CMDCallback: the LightningModule's configure_optimizers() returned no optimizer")
        if self.optimizer_index is None and len(optimizers) > 1:
            kinds = ", ".join(type(_common.torch_optimizer(o)).__name__ for o in optimizers)
            raise ValueError(f"CMDCallback: the LightningModule has {len(optimizers)} optimizers ({kinds}); pass "
                             "CMDCallback(optimizer_index=i) to say whose parameters to record")
        index = self.optimizer_index or 0
        if index >= len(optimizers):
            raise ValueError(f"optimizer_index={index} is out of range: the LightningModule has "
                             f"{len(optimizers)} optimizer(s)")
        return _common.torch_optimizer(optimizers[index])

    # ------------------------------------------------------------------------------------- logging
    def _clock(self, trainer):
        """The trainer's global step a record belongs to: a record made by the recorder's step hook runs inside
        the optimizer step, before Lightning counts it."""
        ref, inside_step = weakref.ref(trainer), self.options.record_every_n_steps is not None

        def clock() -> int:
            owner = ref()
            return 0 if owner is None else owner.global_step + int(inside_step)

        return clock

    def _loggers(self, trainer, rec) -> list:
        """An observer for every logger of the trainer (rank 0): a TensorBoard logger gets everything
        TensorBoard shows (scalars, histograms, figures, the configuration), the others the scalars through
        ``log_metrics``, and the figures where they have ``log_image`` (W&B)."""
        every = self.options.log_every
        if every is None or not trainer.is_global_zero:
            return []
        step, observers = _common.step_function(rec), []
        for logger in trainer.loggers:
            if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
                try:
                    writer = logger.experiment  # a SummaryWriter
                except Exception as e:  # logging must never stop training
                    _common.warn(f"the TensorBoard logger failed ({e!r}); CMD statistics are not logged to it")
                    continue
                observers.append(TensorBoardLogger(writer, every=every, step=step))
            else:
                log_image = getattr(logger, "log_image", None)
                image = None if not callable(log_image) else (
                    lambda tag, array, at, log_image=log_image: log_image(key=tag, images=[array], step=at))
                observers.append(MetricsLogger(logger.log_metrics, every=every, step=step, image=image))
        if self.writer is not None:
            observers.append(TensorBoardLogger(self.writer, every=every, step=step))
        return observers

    # ------------------------------------------------------------------------------------- recording
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Record an epoch after its last batch, so that the epoch's validation (which Lightning runs before
        # on_train_epoch_end) and any checkpoint written then already include it.
        if self.recorder is None:
            return
        batches = trainer.num_training_batches
        if batches != float("inf") and batch_idx + 1 >= batches:
            self._schedule.end_of_epoch(self.recorder, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # an epoch cut short (max_steps, an iterable loader without a length) is recorded here
        if self.recorder is not None:
            self._schedule.end_of_epoch(self.recorder, trainer.current_epoch)

    # ------------------------------------------------------------------------------------- validation
    @staticmethod
    def _fitting(trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        rec = self.recorder
        if rec is None or not self._fitting(trainer) or rec.is_swapped:
            return
        if self.swap_for_validation and rec.ready:
            self._begin_swap()
        elif self.evaluate_cmd:
            if rec.ready:
                self._validate_cmd(trainer, pl_module)
            else:  # no CMD model yet: the cmd/ metrics are the trained weights', copied from their own pass
                self._tee = _LoggedMetrics(pl_module, len(_dataloaders(trainer)), tee=True)
                self._tee.start()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._tee is not None:
            self._tee.batch, self._tee.dataloader_idx = batch, dataloader_idx

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        tee, self._tee = self._tee, None
        if tee is not None:
            tee.stop()
            tee.log_results(pl_module)
        if self._swapping:
            self._validated = self._end_swap(keep=True)  # for the checkpoints written until the next validation
        elif self.swap_for_validation and self._fitting(trainer):
            self._validated = None  # the warm-up: the trained weights were validated

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._end_swap()
        if self._tee is not None:
            self._tee.stop()
            self._tee = None

    def _validate_cmd(self, trainer, pl_module) -> None:
        """Validate the CMD weights before Lightning validates the trained ones: every validation batch through
        ``validation_step``, whose ``self.log`` calls are reduced over the epoch as Lightning reduces them and
        logged under ``cmd/``."""
        loaders, limits = _dataloaders(trainer), list(trainer.num_val_batches)
        capture = _LoggedMetrics(pl_module, len(loaders), tee=False)
        states = _ModuleState(pl_module)
        capture.start()
        try:
            with self.recorder.swapped(), torch.no_grad():
                for index, (loader, limit) in enumerate(zip(loaders, limits)):
                    for batch_idx, batch in enumerate(_own_iterable(loader)):
                        if batch_idx >= limit:
                            break
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                        capture.batch, capture.dataloader_idx = batch, index
                        trainer.strategy.validation_step(*(batch, batch_idx) + ((index,) if len(loaders) > 1 else ()))
                results = capture.results()
        finally:
            capture.stop()
            states.restore()
        capture.log_results(pl_module, results)

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.recorder is None:
            return {}
        return _common.callback_state(self.recorder, self._schedule)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it creates the optimizer: keep the state for on_fit_start
        self._pending = state_dict if self.resume else None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # a checkpoint of an earlier version holds the state of its one callback under the class name only
        # — or a one-optimizer run resumed with or without optimizer_index=0: with one callback on each
        # side, its state is this callback's whatever the key
        states = checkpoint.get("callbacks") or {}
        plain = type(self).__qualname__
        self._found_keys = [k for k in states if k == plain or k.startswith(plain + "{")]
        key = self.state_key
        if (key not in states and len(self._found_keys) == 1
                and sum(isinstance(cb, LightningCMDHooks) for cb in trainer.callbacks) == 1):
            key = self._found_keys[0]
            self.load_state_dict(states[key])
        trained = (states.get(key) or {}).get(TRAINED)
        if trained and trainer.state.fn == "fit":
            # the checkpoint's state_dict holds the CMD weights that were validated; training goes on from the
            # trained ones (Lightning has loaded the state_dict into the module already)
            weights = pl_module.state_dict(keep_vars=True)
            unknown = [k for k in trained if k not in weights]
            if unknown:
                raise ValueError(f"CMDCallback: the checkpoint's trained weights hold {unknown[:3]}, which this "
                                 "LightningModule does not have")
            with torch.no_grad():
                for k, value in trained.items():
                    weights[k].copy_(value)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Lightning's WeightAveraging convention: the state_dict holds the weights the last validation ran on
        # (the monitored score is theirs), the trained weights travel in the callback's state for a resume
        if self._swapping:  # written during validation on the CMD weights: they are in the model
            cmd = None
            trained = {id(p): value for p, value in zip(self.recorder.params, self.recorder.stored_parameters)}
        elif self._validated is not None:
            cmd, trained = self._validated, None
        else:
            return
        weights, state = checkpoint.get("state_dict", {}), (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None:
            return
        kept = {}
        for key, value in pl_module.state_dict(keep_vars=True).items():
            if key not in weights:
                continue
            if cmd is not None and id(value) in cmd:
                kept[key], weights[key] = weights[key], cmd[id(value)]
            elif trained is not None and id(value) in trained:
                kept[key] = trained[id(value)]
        if kept:
            state[TRAINED] = kept

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._end_swap()
        self._pending = None
        if self._tee is not None:
            self._tee.stop()
            self._tee = None

    # ------------------------------------------------------------------------------------- the end
    def on_train_end(self, trainer, pl_module) -> None:
        self._end_swap()
        rec = self.recorder
        if rec is None:
            return
        if self.export_path is not None:
            _common.export_at_end(rec, self.export_path, trainer.is_global_zero,
                                  lambda: atomic_save(self.cmd_checkpoint(), self.export_path))
        rec.close()

    # ------------------------------------------------------------------------------------- for the user
    def cmd_checkpoint(self, at: int = -1) -> dict[str, Any]:
        """The CMD model at record ``at`` as a Lightning checkpoint (a dict for ``torch.save``): what the trainer
        writes with ``save_checkpoint(weights_only=True)``, with the CMD weights in its ``state_dict`` (the
        LightningModule's keys, its buffers as trained). ``LitModel.load_from_checkpoint`` loads it."""
        rec = _common.require(self.recorder, "cmd_checkpoint")
        trainer = None if self._trainer is None else self._trainer()
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError("cmd_checkpoint: the trainer of the recorded run is gone")
        pl_module = trainer.lightning_module
        connector = getattr(trainer, "_checkpoint_connector", None)
        if connector is not None and hasattr(connector, "dump_checkpoint"):
            checkpoint = connector.dump_checkpoint(weights_only=True)
        else:  # pragma: no cover - what dump_checkpoint writes, for a Lightning without it
            checkpoint = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                          "pytorch-lightning_version": _version(trainer), "state_dict": pl_module.state_dict()}
            if pl_module.hparams:
                checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
        held = {id(p) for p in pl_module.parameters()}  # matched by identity below: a replaced one would stay trained
        gone = [name for name, p in zip(rec.layout.names, rec.params) if id(p) not in held]
        if gone:
            raise ValueError(f"cmd_checkpoint: parameter(s) {', '.join(map(repr, gone[:5]))} of the LightningModule are "
                             f"no longer the tensors recorded (replaced after the recorder was built), so their CMD "
                             f"weights would not reach the checkpoint; build a new recorder for the new parameters")
        cmd = {id(p): value for p, value in zip(rec.params, rec.cmd_parameters(at))}
        weights = checkpoint["state_dict"]
        for key, value in pl_module.state_dict(keep_vars=True).items():
            if key in weights and id(value) in cmd:
                weights[key] = cmd[id(value)].detach()
        return checkpoint

    def export(self, path: str | os.PathLike, at: int = -1) -> None:
        """Write :meth:`cmd_checkpoint` to ``path`` atomically (global rank 0 only under DDP)."""
        if is_writer():
            atomic_save(self.cmd_checkpoint(at), path)

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """CMD weights in the model inside the block, the trained ones back on exit, even on error
        (``recorder.swapped(at)``)."""
        with _common.require(self.recorder, "swapped").swapped(at):
            yield


def _version(trainer) -> str:
    package = sys.modules.get(type(trainer).__module__.split(".")[0])
    return getattr(package, "__version__", "2.0.0")


# ------------------------------------------------------------------------------------------ validation helpers
def _dataloaders(trainer) -> list:
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _own_iterable(loader):
    """``loader``, or, for a DataLoader with persistent workers, a twin without: iterating the loader itself
    would reset the iterator Lightning's validation has already started on it."""
    if not (isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers and loader.num_workers > 0):
        return loader
    options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   worker_init_fn=loader.worker_init_fn, timeout=loader.timeout, generator=loader.generator,
                   multiprocessing_context=loader.multiprocessing_context, prefetch_factor=loader.prefetch_factor)
    if loader.batch_sampler is not None:
        return torch.utils.data.DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **options)
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                                       **options)


def _batch_size(batch: Any) -> int:
    """The size of the first tensor's first dimension in ``batch`` (as Lightning infers it)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size:
            return size
    return 0


def _is_metric(value: Any) -> bool:
    """A torchmetrics ``Metric`` (told by its methods: torchmetrics is not imported)."""
    return all(callable(getattr(value, name, None)) for name in ("update", "compute", "reset")) \
        and isinstance(getattr(value, "update_count", None), int)


class _LoggedMetrics:
    """The ``self.log`` calls of ``validation_step``, reduced over the epoch as Lightning reduces them: a weighted
    mean over the batch sizes by default, or the ``reduce_fx`` given; a torchmetrics ``Metric`` is computed.

    Between :meth:`start` and :meth:`stop` the module's ``log`` is this object's :meth:`add`; with ``tee`` the
    values also go on to Lightning (the warm-up: copies of the trained weights' metrics)."""

    def __init__(self, pl_module, dataloaders: int, tee: bool):
        self.module, self.dataloaders, self.tee = pl_module, dataloaders, tee
        self.original = pl_module.log
        self.signature = inspect.signature(self.original)
        self.entries: dict[str, dict[str, Any]] = {}
        self.batch, self.dataloader_idx = None, 0

    def start(self) -> None:
        self.module.log = self.add  # an attribute of the instance: log_dict calls it too

    def stop(self) -> None:
        self.module.__dict__.pop("log", None)

    def add(self, *args: Any, **kwargs: Any) -> None:
        if self.tee:
            self.original(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a.get("on_epoch") is False:  # a per-step value only: not a metric of the epoch
            return
        name = a["name"]
        if self.dataloaders > 1 and a.get("add_dataloader_idx", True):
            name = f"{name}/dataloader_idx_{self.dataloader_idx}"
        entry = self.entries.setdefault(name, {
            "reduce": a.get("reduce_fx", "mean"), "values": [], "weights": [], "metric": None,
            "options": {k: a[k] for k in ("prog_bar", "logger", "sync_dist", "sync_dist_group", "rank_zero_only")
                        if k in a}})
        value = a["value"]
        if _is_metric(value):
            entry["metric"] = value
            return
        entry["values"].append(torch.as_tensor(value).detach().float().reshape(()))
        entry["weights"].append(a.get("batch_size") or _batch_size(self.batch) or 1)

    def results(self) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
        out = {}
        for name, e in self.entries.items():
            if e["metric"] is not None:
                value = e["metric"].compute()
            elif e["values"]:
                value = _reduce(e["reduce"], torch.stack(e["values"]),
                                torch.tensor(e["weights"], dtype=torch.float32, device=e["values"][0].device))
            else:
                continue
            out[name] = (value, e["options"])
        return out

    def log_results(self, pl_module, results=None) -> None:
        for name, (value, options) in (self.results() if results is None else results).items():
            pl_module.log(PREFIX + name, value, on_step=False, on_epoch=True, add_dataloader_idx=False, **options)


def _reduce(fx: Any, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if fx in ("mean", torch.mean):
        return (values * weights).sum() / weights.sum()
    if fx in ("sum", torch.sum):
        return values.sum()
    if fx in ("max", torch.max):
        return values.max()
    if fx in ("min", torch.min):
        return values.min()
    return torch.as_tensor(fx(values))


class _ModuleState:
    """What a pass of ``validation_step`` on the CMD weights may leave in the module, put back afterwards:
    torchmetrics metrics it updated are reset, and entries it appended to lists of the module (outputs kept
    for ``on_validation_epoch_end``) are removed, with a warning, so Lightning's own pass sees none of them."""

    def __init__(self, pl_module):
        self.module = pl_module
        self.metrics = [(m, m.update_count) for m in pl_module.modules() if _is_metric(m)]
        self.lists = {name: (value, len(value)) for name, value in vars(pl_module).items() if isinstance(value, list)}

    def restore(self) -> None:
        for metric, count in self.metrics:
            if metric.update_count != count:
                if count:
                    _common.warn(f"the metric {type(metric).__name__} held updates before the validation of the CMD "
                                 "weights, which reset it; reset your metrics at the end of every validation epoch")
                metric.reset()
        for name, (value, length) in self.lists.items():
            if len(value) > length:
                del value[length:]
                _common.warn(f"validation_step appended to self.{name} during the validation of the CMD weights; "
                             "those entries were removed. Only self.log values of validation_step are metrics of "
                             "the CMD weights (evaluate_cmd=True)")
