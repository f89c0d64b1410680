"""CMD for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[CMDCallback(modes=5, warmup=10)])``.

See docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import weakref
from typing import Any, Iterator


try:
    from transformers import PreTrainedModel, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("cmd_online.integrations.transformers needs transformers and accelerate: "
                      "pip install 'cmd-online[transformers]'") from e

from ..distributed import is_writer
from ..files import atomic_write
from ..recorder import CMDRecorder
from ..config import check_bool, check_int
from . import _common
from ._common import STATE_FILE, Options, Schedule, Swap

__all__ = ["CMDCallback"]


class CMDCallback(TrainerCallback, _common.CMDAccess):
    """Records the CMD model of a Hugging Face ``Trainer`` run with a ``CMDRecorder``.

    Created in one line, ``Trainer(..., callbacks=[CMDCallback(modes=5, warmup=10)])``. When training starts
    it builds ``callback.recorder`` on the torch optimizer inside the Trainer's ``AcceleratedOptimizer``;
    it records once at the end of every epoch (default) or after every k-th optimizer step; it writes its
    state into every ``checkpoint-*`` folder, and ``trainer.train(resume_from_checkpoint=...)`` continues
    the same recording. At the end of training the CMD model is saved next to the trained one. Evaluate
    it with ``with callback.swapped(): trainer.evaluate(metric_key_prefix="cmd_eval")``. See
    docs/integrations.md.

    Args:
        modes (int): number of modes M (default 10 when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]; M then follows from the data (default None).
        samples (int): K, the weights whose warm-up history is clustered (default 1000).
        warmup (int): F ≥ 2, number of warm-up records (default 20).
        freeze_modes_after (int): switch to compact memory this many records into the fit window (default None).
        seed (int): seed of the sampling (default 0).
        record_every_n_steps (int): record after every k-th optimizer step that really happens (once per
            ``gradient_accumulation_steps`` micro-batches; a step skipped by AMP's GradScaler does not count);
            None records once at the end of every epoch (default None).
        export_dir (str or path): folder for the CMD model at the end of training, relative to
            ``args.output_dir``: ``save_pretrained`` for a ``PreTrainedModel`` (so ``from_pretrained`` loads the
            CMD model), else ``model.safetensors`` holding the state_dict, as the Trainer saves models
            (default "cmd_model"; None: not written).
        writer (SummaryWriter): log the mode statistics there (rank 0 only); it must have ``add_scalar``
            (default None).
        log_every (int): log the mode statistics every this many records (default 10).
        resume (bool): when ``train`` resumes from a checkpoint, continue the recording stored in it, and refuse
            a checkpoint without it; False starts a new recording (default True).
        check_finite (bool): skip records whose weights hold NaN/Inf, with a warning (default True).
        compile_update (bool): run the statistics update through ``torch.compile`` (default False).
        distance (str): the clustering distance, ``"correlation"`` or ``"euclidean"`` (default "correlation").

    Raises ``TypeError``/``ValueError`` naming the argument for bad input; ``ValueError`` when the Trainer
    is created with FSDP or DeepSpeed; ``FileNotFoundError`` when training resumes (``resume=True``) from a
    checkpoint that holds no CMD state, ``ValueError`` when the state it finds for that step was saved with
    other weights than those the Trainer resumes with (another run's). A second ``train()`` without a
    checkpoint continues the recording.
    """

    def __init__(self, *, modes: int | None = None, threshold: float | None = None, samples: int = 1000,
                 warmup: int = 20, freeze_modes_after: int | None = None, seed: int = 0,
                 record_every_n_steps: int | None = None, export_dir: str | os.PathLike | None = "cmd_model",
                 writer=None, log_every: int = 10, resume: bool = True, check_finite: bool = True,
                 compile_update: bool = False, distance: str = "correlation"):
        check_int("log_every", log_every, 1)
        self.options = Options.of(modes=modes, threshold=threshold, samples=samples, warmup=warmup,
                                  freeze_modes_after=freeze_modes_after, seed=seed, distance=distance,
                                  record_every_n_steps=record_every_n_steps, log_every=log_every,
                                  check_finite=check_finite, compile_update=compile_update)
        self.export_dir = _common.check_path("export_dir", export_dir)
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must be a SummaryWriter (an object with add_scalar) or None; got {writer!r}")
        self.writer = writer
        self.resume = check_bool("resume", resume)
        self.recorder: CMDRecorder | None = None
        self._model: weakref.ref | None = None
        self._schedule = Schedule(self.options.record_every_n_steps)
        self._swap = Swap()

    # ------------------------------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, **kwargs):
        self._refuse_sharded(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer has created the optimizer, and on a resume loaded the model, the optimizer and
        # TrainerState (global_step) from the checkpoint, before this event.
        self._refuse_sharded(args, model)
        if optimizer is None or model is None:
            raise ValueError("CMDCallback: the Trainer passed no optimizer or model to on_train_begin")
        model = _common.plain_module(model)
        optimizer = _common.torch_optimizer(optimizer)
        saved = None
        if state.global_step > 0 and self.resume:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved = self._find_state(args, state.global_step, _common.weights_fingerprint(params))
        earlier = self.recorder
        self._swap.end()
        schedule = Schedule(self.options.record_every_n_steps)
        recorder = _common.build_recorder(optimizer, model, self.options, self.writer)
        with _common.discarded_on_error(recorder):  # a refused state leaves the earlier recording as it was
            if saved is not None:
                _common.restore_state(recorder, schedule, saved[1], saved[0])
                if state.epoch and float(state.epoch).is_integer():
                    # a checkpoint written at an epoch's last step by an older version, which recorded the
                    # epoch only at on_epoch_end, after the save: the weights just loaded are that epoch's end
                    schedule.end_of_epoch(recorder, int(state.epoch) - 1)
            elif earlier is not None and state.global_step == 0:
                # train() called again without a checkpoint: go on with the earlier recording
                schedule = _common.continue_recording(earlier, recorder, self._schedule, 0)
        if earlier is not None:
            earlier.close()
        self._model = weakref.ref(model)
        self.recorder, self._schedule = recorder, schedule

    def _refuse_sharded(self, args, model=None) -> None:
        strategy = ("FSDP (TrainingArguments.fsdp)" if getattr(args, "fsdp", None) else
                    "DeepSpeed (TrainingArguments.deepspeed)" if getattr(args, "deepspeed", None) else "")
        _common.refuse_sharded("the Hugging Face Trainer", strategy, () if model is None else model.parameters())

    def _find_state(self, args, global_step: int, weights) -> tuple[str, dict[str, Any]]:
        """The state saved with the checkpoint training resumes from. The Trainer does not tell callbacks its
        path: the state must be of this step and saved with the weights the Trainer has just loaded (``weights``,
        their fingerprint), so that a folder of another run with the same step is never taken for it."""
        candidates = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}", STATE_FILE)]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.insert(0, os.path.join(args.resume_from_checkpoint, STATE_FILE))
        others = []
        for path in candidates:
            if os.path.isfile(path):
                saved = _common.load_state_file(path)
                if isinstance(saved, dict) and saved.get("global_step") == global_step:
                    if "weights" in saved and not _common.same_weights(saved["weights"], weights):
                        others.append(path)  # the same step of another run
                        continue
                    return path, saved  # (a state of an older version, without the fingerprint, is taken)
        if others:
            raise ValueError(
                f"CMDCallback: training resumes at global step {global_step}, but {', '.join(others)} was saved with "
                "other weights than those the Trainer resumes with: it belongs to another run. The Trainer does not "
                "tell callbacks the folder it resumes from; for a checkpoint outside args.output_dir set "
                "TrainingArguments(resume_from_checkpoint=<its folder>), or pass CMDCallback(resume=False) to start a "
                "new recording from this point")
        raise FileNotFoundError(
            f"CMDCallback: training resumes at global step {global_step}, but no {STATE_FILE} of that step was found "
            f"(looked at {', '.join(candidates)}); for a checkpoint outside args.output_dir set "
            "TrainingArguments(resume_from_checkpoint=<its folder>), or pass CMDCallback(resume=False) to start a "
            "new recording from this point")

    # ------------------------------------------------------------------------------------- recording
    def on_step_end(self, args, state, control, **kwargs):
        # The optimizer step that completes an epoch (state.epoch is then a whole number): record the epoch
        # now, before the Trainer saves a checkpoint of this step, which it does before on_epoch_end; a run
        # resumed from that checkpoint starts the next epoch and would never record this one.
        if self.recorder is not None and state.epoch and float(state.epoch).is_integer():
            self._schedule.end_of_epoch(self.recorder, int(state.epoch) - 1)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            # state.epoch is epoch + its finished fraction: 1.0 at an epoch's end (recorded at on_step_end
            # already, unless the loader's length is unknown), less if max_steps cut it short
            self._schedule.end_of_epoch(self.recorder, math.ceil(state.epoch) - 1)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kwargs):
        if self.recorder is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            _common.warn(f"no checkpoint folder {folder} after the Trainer saved; the CMD state was not saved "
                         "(hyper-parameter search runs save elsewhere)")
            return
        state_dict = _common.callback_state(self.recorder, self._schedule, global_step=state.global_step,
                                            weights=_common.weights_fingerprint(self.recorder.params))
        _common.save_state_file(state_dict, os.path.join(folder, STATE_FILE))

    # ------------------------------------------------------------------------------------- the end
    def on_train_end(self, args, state, control, **kwargs):
        self._swap.end()
        rec = self.recorder
        if rec is None:
            return
        if self.export_dir is not None:
            path = os.path.join(args.output_dir, self.export_dir)
            _common.export_at_end(rec, path, args.should_save, lambda: self._write_model(path, -1))
        rec.close()

    # ------------------------------------------------------------------------------------- for the user
    def export(self, path: str | os.PathLike, at: int = -1) -> None:
        """Save the CMD model at record ``at`` to the folder ``path`` as the Trainer saves models (rank 0 only)."""
        if is_writer():
            self._write_model(os.fspath(path), at)

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """CMD weights in the model inside the block (``trainer.evaluate()`` there evaluates the CMD model);
        the trained ones come back on exit, even on error."""
        with self._swap.around(_common.require(self.recorder, "swapped"), at):
            yield

    def _write_model(self, path: str, at: int) -> None:
        state = self.cmd_state_dict(at)
        model = None if self._model is None else self._model()
        if model is None:
            raise RuntimeError("CMDCallback: the model has been deleted")
        if isinstance(model, PreTrainedModel):
            _replace_folder(path, lambda tmp: model.save_pretrained(tmp, state_dict=state))
        else:
            from safetensors.torch import save

            def write(tmp: str) -> None:
                data = save(state, metadata={"format": "pt"})
                atomic_write(os.path.join(tmp, "model.safetensors"), lambda f: f.write(data))

            _replace_folder(path, write)


def _replace_folder(path: str, fill) -> None:
    """Fill a new folder beside ``path`` and rename it into place: ``path`` never holds a partly written model."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the usual permissions
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
