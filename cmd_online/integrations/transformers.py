"""CMD for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[CMDCallback(modes=5, warmup=10)])``.

See docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import weakref
from typing import Any, Iterator


try:
    from transformers import PreTrainedModel, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("cmd_online.integrations.transformers needs transformers and accelerate: "
                      "pip install 'cmd-online[transformers]'") from e

from ..config import check_bool
from ..distributed import is_writer
from ..files import atomic_save, atomic_write, replace_folder
from ..recorder import CMDRecorder
from ..tensorboard import MetricsLogger, TensorBoardLogger
from . import _common
from ._common import STATE_FILE, Options, Schedule

__all__ = ["CMDCallback"]

TRAINING_ARGS_NAME = "training_args.bin"  # what trainer.save_model writes beside the model (transformers.trainer)


class CMDCallback(TrainerCallback, _common.CMDAccess):
    """Records the CMD model of a Hugging Face ``Trainer`` run with a ``CMDRecorder``.

    Created in one line, ``Trainer(..., callbacks=[CMDCallback(modes=5, warmup=10)])``. When training starts
    it builds ``callback.recorder`` on the torch optimizer inside the Trainer's ``AcceleratedOptimizer``;
    it records once at the end of every epoch (default) or after every k-th optimizer step; it logs the
    mode statistics through the Trainer's own logging (every ``report_to`` integration) at the global step;
    it writes its state into every ``checkpoint-*`` folder, and ``trainer.train(resume_from_checkpoint=...)``
    continues the same recording. At the end of training the CMD model is saved next to the trained one,
    as the Trainer saves models. See docs/integrations.md.

    Args:
        record_every_n_steps (int): record after every k-th optimizer step that really happens (once per
            ``gradient_accumulation_steps`` micro-batches; a step skipped by AMP's GradScaler does not count);
            None records once at the end of every epoch (default None).
        evaluate_cmd (bool): at every evaluation, evaluate the CMD weights too: their metrics join the
            Trainer's as ``eval_cmd_*`` beside ``eval_*`` (``eval/cmd_loss`` beside ``eval/loss`` in TensorBoard),
            logged and returned by ``evaluate()``, so ``metric_for_best_model="cmd_loss"`` can pick by them;
            during the warm-up, when no CMD model exists, they are the trained weights' (default False).
        export_dir (str or path): folder for the CMD model at the end of training, relative to
            ``args.output_dir``, as complete as ``trainer.save_model`` writes it: ``save_pretrained`` for a
            ``PreTrainedModel`` (config and weights: ``from_pretrained`` loads the CMD model), else
            ``model.safetensors`` holding the state_dict; the Trainer's processing class (tokenizer, …) and
            ``training_args.bin`` beside them (default "cmd_model"; None: not written).
        writer (SummaryWriter): also log the mode statistics there, with histograms and figures, at the global
            step (rank 0 only); it must have ``add_scalar`` (default None).
        log_every (int): log the mode statistics every this many records, the reference values every record;
            None: no logging (default 10).
        resume (bool): when ``train`` resumes from a checkpoint, continue the recording stored in it, and refuse
            a checkpoint without it; False starts a new recording (default True).
        **recorder: passed to :class:`cmd_online.CMDRecorder`: ``modes`` (default 10 unless ``threshold``),
            ``threshold``, ``max_modes``, ``samples`` (default 1000), ``warmup`` (default 20),
            ``freeze_modes_after``, ``seed``, ``distance``, ``offload``, ``kernel``, ``check_finite``,
            ``callbacks`` (observers of your own); the deprecated ``compile_update`` too. Checked now, by the
            recorder's rules; an argument the recorder does not take is a TypeError naming it.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input; ``ValueError`` when the Trainer
    is created with FSDP or DeepSpeed; ``FileNotFoundError`` when training resumes (``resume=True``) from a
    checkpoint that holds no CMD state, ``ValueError`` when the state it finds for that step was saved with
    other weights than those the Trainer resumes with (another run's). A second ``train()`` without a
    checkpoint continues the recording.
    """

    def __init__(self, *, record_every_n_steps: int | None = None, evaluate_cmd: bool = False,
                 export_dir: str | os.PathLike | None = "cmd_model", writer=None, log_every: int | None = 10,
                 resume: bool = True, **recorder: Any):
        self.options = Options.of(record_every_n_steps=record_every_n_steps, log_every=log_every, **recorder)
        self.evaluate_cmd = check_bool("evaluate_cmd", evaluate_cmd)
        self.export_dir = _common.check_path("export_dir", export_dir)
        self.writer = _common.check_writer(writer)
        self.resume = check_bool("resume", resume)
        self.recorder: CMDRecorder | None = None
        self._model: weakref.ref | None = None
        self._trainer: weakref.ref | None = None
        self._processing_class = None
        self._args = None
        self._schedule = Schedule(self.options.record_every_n_steps)
        self._logs: list[dict[str, float]] = []  # the recorder's statistics, for the Trainer's logging
        self._attempts = 0  # records the recorder had taken when the statistics were last handed on
        self._evaluating = False

    # ------------------------------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, **kwargs):
        self._refuse_sharded(args)
        self._find_trainer()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer has created the optimizer, and on a resume loaded the model, the optimizer and
        # TrainerState (global_step) from the checkpoint, before this event.
        self._refuse_sharded(args, model)
        if optimizer is None or model is None:
            raise ValueError("CMDCallback: the Trainer passed no optimizer or model to on_train_begin")
        model = _common.plain_module(model)
        optimizer = _common.torch_optimizer(optimizer)
        trainer = self._find_trainer()
        saved = None
        if state.global_step > 0 and self.resume:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved = self._find_state(args, state.global_step, _common.weights_fingerprint(params))

        def loaded(recorder, schedule) -> None:
            if state.epoch and float(state.epoch).is_integer():
                # a checkpoint written at an epoch's last step by an older version, which recorded the
                # epoch only at on_epoch_end, after the save: the weights just loaded are that epoch's end
                schedule.end_of_epoch(recorder, int(state.epoch) - 1)

        self.recorder, self._schedule = _common.start_recording(
            optimizer, model, self.options, clock=_clock(state, self.options.record_every_n_steps is not None),
            earlier=self.recorder, schedule=self._schedule, saved=saved, loaded=loaded,
            # train() called again without a checkpoint: go on with the earlier recording
            continue_at=0 if state.global_step == 0 else None,
            observers=lambda rec: self._observers(args, trainer, rec))
        self._attempts, self._logs = 0, []
        self._model = weakref.ref(model)
        self._processing_class = kwargs.get("processing_class", kwargs.get("tokenizer"))
        self._args = args

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

    def _find_trainer(self):
        """The Trainer that calls this callback (kept weakly for the calls that come from elsewhere). Callbacks are
        not handed their Trainer: it is the caller of the event, a few frames up, whose callback handler holds
        this callback (a callback given to a second Trainer follows it)."""
        frame = inspect.currentframe()
        try:
            for _ in range(16):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    break
                candidate = frame.f_locals.get("self")
                handler = getattr(candidate, "callback_handler", None)
                if handler is not None and any(cb is self for cb in getattr(handler, "callbacks", ())) \
                        and callable(getattr(candidate, "log", None)):
                    self._trainer = weakref.ref(candidate)
                    return candidate
        finally:
            del frame
        return None if self._trainer is None else self._trainer()

    def _observers(self, args, trainer, rec) -> list:
        every = self.options.log_every
        if every is None:
            return []
        step, observers = _common.step_function(rec), []
        if self.writer is not None:
            observers.append(TensorBoardLogger(self.writer, every=every, step=step))
        if args.report_to and trainer is not None:  # the Trainer's integrations (TensorBoard, W&B, MLflow, …)
            observers.append(MetricsLogger(lambda metrics, at: self._logs.append(metrics), every=every, step=step))
        elif args.report_to:
            _common.warn("the Trainer that runs this callback was not found; the CMD statistics are not logged "
                         "through its report_to integrations")
        return observers

    # ------------------------------------------------------------------------------------- recording
    def on_step_end(self, args, state, control, **kwargs):
        # The optimizer step that completes an epoch (state.epoch is then a whole number): record the epoch
        # now, before the Trainer saves a checkpoint of this step, which it does before on_epoch_end; a run
        # resumed from that checkpoint starts the next epoch and would never record this one.
        rec = self.recorder
        if rec is None:
            return
        if state.epoch and float(state.epoch).is_integer():
            self._schedule.end_of_epoch(rec, int(state.epoch) - 1)
        self._hand_on(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        rec = self.recorder
        if rec is None:
            return
        # state.epoch is epoch + its finished fraction: 1.0 at an epoch's end (recorded at on_step_end
        # already, unless the loader's length is unknown), less if max_steps cut it short
        self._schedule.end_of_epoch(rec, math.ceil(state.epoch) - 1)
        if control.should_training_stop or (state.max_steps and state.global_step >= state.max_steps):
            rec.close()  # the last epoch: the final statistics now, while the Trainer's integrations still log
        self._hand_on(control)

    def _hand_on(self, control) -> None:
        """The statistics of this step's records through the Trainer's logging, at this global step."""
        rec = self.recorder
        if rec.offload and rec.attempts != self._attempts:
            rec.skipped_records  # noqa: B018 - waits for this step's record: its observers are told now
        self._attempts = rec.attempts
        logs, self._logs = self._logs, []
        self._log(control, logs)

    def _log(self, control, logs: list[dict[str, float]]) -> None:
        """``trainer.log`` each of ``logs`` (every report_to integration, at the global step)."""
        trainer = None if self._trainer is None else self._trainer()
        if trainer is None or not logs:
            return
        should_log = control.should_log  # the Trainer's own log of this step, which on_log resets
        try:
            for metrics in logs:
                trainer.log(dict(metrics))
        finally:
            control.should_log = should_log

    # ------------------------------------------------------------------------------------- evaluation
    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if not self.evaluate_cmd or self._evaluating or self.recorder is None or self.recorder.is_swapped or not metrics:
            return  # (inside the user's swapped() block the CMD weights are what was evaluated)
        trainer = self._find_trainer()
        prefix = next((k[:-len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        cmd_prefix = f"{prefix}_cmd"
        if self.recorder.phase == "warmup":  # no CMD model yet: the trained weights' metrics
            cmd = {cmd_prefix + k[len(prefix):]: v for k, v in metrics.items()
                   if k.startswith(prefix + "_") and not k.endswith(_SPEED)}
            self._log(control, [cmd])
        else:
            dataset = getattr(eval_dataloader, "dataset", None)
            if trainer is None or dataset is None:
                _common.warn("evaluate_cmd: the Trainer or its evaluation data was not found; the CMD weights are "
                             "not evaluated")
                return
            self._evaluating = True
            try:
                with self.swapped():
                    cmd = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=cmd_prefix)
            finally:
                self._evaluating = False
        metrics.update(cmd)  # evaluate() returns them too: metric_for_best_model, EarlyStoppingCallback

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
        rec = self.recorder
        if rec is None:
            return
        if self.export_dir is not None:
            path = os.path.join(args.output_dir, self.export_dir)
            _common.export_at_end(rec, path, args.should_save, lambda: self._write_model(path, -1))
        rec.close()
        self._logs = []  # the integrations have closed their runs: what close() logged goes to `writer` only

    # ------------------------------------------------------------------------------------- for the user
    def export(self, path: str | os.PathLike, at: int = -1) -> None:
        """Save the CMD model at record ``at`` to the folder ``path`` as the Trainer saves models (rank 0 only)."""
        if is_writer():
            self._write_model(os.fspath(path), at)

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """CMD weights in the model inside the block (``trainer.evaluate()`` there evaluates the CMD model);
        the trained ones come back on exit, even on error (``recorder.swapped(at)``)."""
        with _common.require(self.recorder, "swapped").swapped(at):
            yield

    def _write_model(self, path: str, at: int) -> None:
        state = self.cmd_state_dict(at)
        model = None if self._model is None else self._model()
        if model is None:
            raise RuntimeError("CMDCallback: the model has been deleted")
        processing, args = self._processing_class, self._args

        def fill(tmp: str) -> None:
            if isinstance(model, PreTrainedModel):
                model.save_pretrained(tmp, state_dict=state)
            else:
                from safetensors.torch import save

                data = save(state, metadata={"format": "pt"})
                atomic_write(os.path.join(tmp, "model.safetensors"), lambda f: f.write(data))
            if processing is not None and callable(getattr(processing, "save_pretrained", None)):
                processing.save_pretrained(tmp)  # the tokenizer, image processor, … (as trainer.save_model)
            if args is not None:
                atomic_save(args, os.path.join(tmp, TRAINING_ARGS_NAME))

        replace_folder(path, fill)


_SPEED = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def _clock(state, inside_step: bool):
    """The global step a record belongs to: a record made by the recorder's step hook runs inside the
    optimizer step, before the Trainer counts it."""
    return lambda: state.global_step + int(inside_step)
