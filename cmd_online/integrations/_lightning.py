"""The hooks of the Lightning callback, apart from Lightning's ``Callback`` base class.

``lightning.py`` and ``pytorch_lightning.py`` each mix this into their namespace's ``Callback``, so the
one implementation serves ``import lightning.pytorch`` and ``import pytorch_lightning``. It imports
neither: it reads the trainer through its public attributes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from ..distributed import is_writer
from ..files import atomic_save
from ..recorder import CMDRecorder
from ..config import check_bool, check_int
from . import _common
from ._common import Options, Schedule, Swap

# Sharded strategies: each rank's checkpoint holds its shard, the callback's state is whole.
_SHARDED = {"FSDPStrategy": "strategy='fsdp'", "DeepSpeedStrategy": "strategy='deepspeed'",
            "ModelParallelStrategy": "ModelParallelStrategy", "XLAFSDPStrategy": "XLAFSDPStrategy"}


class LightningCMDHooks(_common.CMDAccess):
    """Records the CMD model of a Lightning training run (``trainer.fit``) with a ``CMDRecorder``.

    Created in one line, ``Trainer(callbacks=[CMDCallback(modes=5, warmup=10)])``. When ``fit`` starts it
    builds ``callback.recorder`` on the LightningModule's torch optimizer; it records once at the end of
    every training epoch (default) or after every k-th optimizer step; its state goes into Lightning's
    checkpoints, so ``trainer.fit(model, ckpt_path=...)`` continues the same recording. See
    docs/integrations.md.

    Args:
        modes (int): number of modes M (default 10 when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]; M then follows from the data (default None).
        samples (int): K, the weights whose warm-up history is clustered (default 1000).
        warmup (int): F ≥ 2, number of warm-up records (default 20).
        freeze_modes_after (int): switch to compact memory this many records into the fit window (default None).
        seed (int): seed of the sampling (default 0).
        record_every_n_steps (int): record after every k-th optimizer step that really happens (not micro-batches
            of gradient accumulation, not steps skipped by AMP's GradScaler); None records once at the end of every
            training epoch, after its last batch and before the epoch's validation (default None).
        swap_for_validation (bool): validate on the CMD weights once they exist; the trained weights come back
            after validation, and any checkpoint written meanwhile holds the trained weights (default False).
        export_path (str or path): write the CMD state_dict (the LightningModule's keys, without ``_orig_mod.``)
            there at the end of ``fit``, on global rank 0, atomically (default None: no file).
        log_every (int): log the mode statistics to the trainer's TensorBoard logger, if it has one, every this
            many records (reference values every record); None: no logging (default 10).
        optimizer_index (int): which of the LightningModule's optimizers to record; needed when it has
            several; one callback per optimizer records them all (default None: the only one).
        resume (bool): when ``fit`` resumes from a checkpoint, continue the recording stored in it, and refuse
            a checkpoint without it; False starts a new recording (default True).
        check_finite (bool): skip records whose weights hold NaN/Inf, with a warning (default True).
        compile_update (bool): run the statistics update through ``torch.compile`` (default False).
        distance (str): the clustering distance, ``"correlation"`` or ``"euclidean"`` (default "correlation").

    Raises ``TypeError``/``ValueError`` naming the argument for bad input, and ``ValueError`` at the start of
    ``fit`` for a sharded strategy (FSDP, DeepSpeed, ModelParallel), for several optimizers without
    ``optimizer_index``, and for a resume from a checkpoint that holds no CMD state (with ``resume=True``).
    A second ``fit`` without a checkpoint continues the recording.
    """

    def __init__(self, *, modes: int | None = None, threshold: float | None = None, samples: int = 1000,
                 warmup: int = 20, freeze_modes_after: int | None = None, seed: int = 0,
                 record_every_n_steps: int | None = None, swap_for_validation: bool = False,
                 export_path: str | os.PathLike | None = None, log_every: int | None = 10,
                 optimizer_index: int | None = None, resume: bool = True, check_finite: bool = True,
                 compile_update: bool = False, distance: str = "correlation"):
        self.options = Options.of(modes=modes, threshold=threshold, samples=samples, warmup=warmup,
                                  freeze_modes_after=freeze_modes_after, seed=seed, distance=distance,
                                  record_every_n_steps=record_every_n_steps, log_every=log_every,
                                  check_finite=check_finite, compile_update=compile_update)
        self.swap_for_validation = check_bool("swap_for_validation", swap_for_validation)
        self.export_path = _common.check_path("export_path", export_path)
        self.optimizer_index = check_int("optimizer_index", optimizer_index, 0, allow_none=True)
        self.resume = check_bool("resume", resume)
        self.recorder: CMDRecorder | None = None
        self._schedule = Schedule(self.options.record_every_n_steps)
        self._swap = Swap()
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
        earlier = self.recorder
        self._swap.end()
        schedule = Schedule(self.options.record_every_n_steps)
        recorder = _common.build_recorder(optimizer, _common.plain_module(pl_module), self.options,
                                          self._tensorboard(trainer))
        with _common.discarded_on_error(recorder):  # a refused state leaves the earlier recording as it was
            if state is not None:
                _common.restore_state(recorder, schedule, state, f"the checkpoint {trainer.ckpt_path}")
            elif earlier is not None and trainer.ckpt_path is None:
                # fit called again without a checkpoint: go on with the earlier fit's recording
                schedule = _common.continue_recording(earlier, recorder, self._schedule, trainer.current_epoch)
        if earlier is not None:
            earlier.close()
        self.recorder, self._schedule = recorder, schedule

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

    def _tensorboard(self, trainer):
        if self.options.log_every is None:
            return None
        for logger in trainer.loggers:
            if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
                try:
                    return logger.experiment  # a SummaryWriter on rank 0; the recorder logs there only
                except Exception as e:  # logging must never stop training
                    _common.warn(f"the TensorBoard logger failed ({e!r}); CMD statistics are not logged")
        return None

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
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if (self.swap_for_validation and self.recorder is not None and self.recorder.ready
                and not self._swap.active):
            self._swap.begin(self.recorder)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap.end()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._swap.end()

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
        if (self.state_key not in states and len(self._found_keys) == 1
                and sum(isinstance(cb, LightningCMDHooks) for cb in trainer.callbacks) == 1):
            self.load_state_dict(states[self._found_keys[0]])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self._swap.active:
            return
        # written during validation on the CMD weights: the checkpoint gets the trained ones
        trained = self._swap.trained_values()
        weights = checkpoint.get("state_dict", {})
        for key, value in pl_module.state_dict(keep_vars=True).items():
            if key in weights and id(value) in trained:
                weights[key] = trained[id(value)]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._swap.end()
        self._pending = None

    # ------------------------------------------------------------------------------------- the end
    def on_train_end(self, trainer, pl_module) -> None:
        self._swap.end()
        rec = self.recorder
        if rec is None:
            return
        if self.export_path is not None:
            _common.export_at_end(rec, self.export_path, trainer.is_global_zero,
                                  lambda: atomic_save(_common.export_state_dict(rec), self.export_path))
        rec.close()

    # ------------------------------------------------------------------------------------- for the user
    def export(self, path: str | os.PathLike, at: int = -1) -> None:
        """Write :meth:`cmd_state_dict` to ``path`` atomically (rank 0 only under DDP)."""
        state = self.cmd_state_dict(at)
        if is_writer():
            atomic_save(state, path)

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """CMD weights in the model inside the block, the trained ones back on exit, even on error."""
        with self._swap.around(_common.require(self.recorder, "swapped"), at):
            yield
