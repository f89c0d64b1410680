"""What the Lightning and the Hugging Face callbacks share, written once.

Argument checks (the recorder's own arguments pass through), the one function that builds the
recorder and the trainer's step of each of its records (for logging), finding the torch optimizer
inside a framework's wrapper, the names the user sees (no ``_orig_mod.``), when to record (once per
epoch, or every k optimizer steps that really happen), the start-up when training starts, and the
callback's state (in a framework checkpoint or in a file of its own). Nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import CMDConfig, RunOptions, check_int
from ..files import atomic_save, check_format, safe_load
from ..layout import Layout
from ..observers import check_observers
from ..progress import LOG
from ..recorder import CMDRecorder
from ..trajectory import CMDTrajectory

STATE_FORMAT = "cmd_online.integrations.CMDCallback"
STATE_VERSION = 1
STATE_FILE = "cmd_recorder.pt"  # the callback's file in a Hugging Face checkpoint-* folder


# ------------------------------------------------------------------------------------------ arguments
def check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a path (str or os.PathLike) or None; got {value!r}")
    return os.fspath(value)


def check_writer(writer: Any) -> Any:
    """A callback's ``writer=``: a SummaryWriter (anything with ``add_scalar``) or None."""
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"writer must be a SummaryWriter (an object with add_scalar) or None; got {writer!r}")
    return writer


# The CMDRecorder arguments a callback sets itself, and what to use instead.
_RESERVED = {"optimizer": "the callback records the trainer's optimizer",
             "model": "the callback records the trainer's model",
             "record_every": "use record_every_n_steps",
             "writer": "it is the callback's own argument (logged at the trainer's steps)",
             "log_every": "it is the callback's own argument"}


def recorder_arguments(recorder: dict[str, Any], reserved: dict[str, str] = _RESERVED) -> tuple[CMDConfig, dict[str, Any]]:
    """The CMDRecorder keyword arguments a callback passes through (as Lightning's ``WeightAveraging`` passes
    its ``**kwargs`` to ``AveragedModel``), checked now, when the callback is created, by the recorder's own
    rules: the configuration (modes, threshold, max_modes, samples, warmup, freeze_modes_after, seed,
    distance) as a CMDConfig, the run options (check_finite, kernel, offload; ``compile_update`` folded into
    ``kernel``) by :class:`RunOptions`, and the observers (``callbacks``). What is not given takes the
    default of the recorder's signature."""
    accepted = recorder_keywords()
    for name in recorder:
        if name in reserved:
            raise TypeError(f"CMDCallback sets the recorder's {name!r} itself: {reserved[name]}")
        if name not in accepted:
            raise TypeError(f"CMDCallback got an unexpected keyword argument {name!r}; it passes CMDRecorder's "
                            f"arguments through: {', '.join(n for n in accepted if n not in reserved)}")
    given = {**{name: accepted[name] for name in accepted if name not in reserved}, **recorder}
    fields = set(CMDConfig().to_dict())
    config = CMDConfig(**{k: v for k, v in given.items() if k in fields})
    if config.warmup is None:
        raise TypeError("warmup must be an int ≥ 2; got NoneType")
    run = RunOptions.of(**{k: given[k] for k in ("check_finite", "kernel", "offload", "compile_update")},
                        stacklevel=5)
    rest = {"check_finite": run.check_finite, "kernel": run.kernel, "offload": run.offload,
            "callbacks": check_observers(given["callbacks"])}
    return config, rest


def recorder_keywords() -> dict[str, Any]:
    """CMDRecorder's keyword arguments and their defaults, read from its signature."""
    return {name: p.default for name, p in inspect.signature(CMDRecorder.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class Options:
    """The recorder's arguments and when to record, checked when the callback is created."""

    config: CMDConfig  # record_every is the callback's record_every_n_steps (None: once per epoch)
    log_every: int | None = 10
    recorder: dict = field(default_factory=dict)  # the other CMDRecorder arguments (offload, kernel, …)

    @classmethod
    def of(cls, *, record_every_n_steps: int | None, log_every: int | None, **recorder: Any) -> "Options":
        """From a callback's arguments: ``recorder`` holds the CMDRecorder ones (modes, samples, warmup, …)."""
        every = check_int("record_every_n_steps", record_every_n_steps, 1, allow_none=True)
        config, rest = recorder_arguments(recorder)
        return cls(config.replace(record_every=every), check_int("log_every", log_every, 1, allow_none=True), rest)

    @property
    def record_every_n_steps(self) -> int | None:
        return self.config.record_every


class StampedRecorder(CMDRecorder):
    """The callbacks' recorder: a :class:`CMDRecorder` that notes the trainer's step at every record it takes,
    so that a record's statistics are logged at that step, also when its observers are told later
    (``offload=True`` tells them at the next call into the recorder).

    ``clock()`` gives the trainer's step the record belongs to: for a record after an optimizer step (the
    recorder's own step hook runs inside ``step()``, before the trainer counts it) the step being taken.
    """

    def __init__(self, *args: Any, clock=None, **kwargs: Any):
        self.clock = clock
        self._stamps: list[int] = []  # the steps of the attempts from the _dropped-th on (those not yet told)
        self._stamping: list[int] = []  # offload: the steps of the record() calls under way, innermost last
        self._dropped = 0
        self._base = (0, 0)
        super().__init__(*args, **kwargs)

    def start_stamps(self) -> None:
        """From now on (after a state was loaded), count the records of this run."""
        self._stamps, self._dropped, self._base = [], 0, (self.num_records, self.skipped_records)

    @property
    def attempts(self) -> int:
        """Records this run has tried to take (skipped ones included)."""
        return self._dropped + len(self._stamps)

    def record(self) -> bool:
        stamp = int(self.clock()) if self.clock is not None else self.attempts
        if self.offload:  # stamped as it is handed to the worker: a record refused or ignored before gets none
            self._stamping.append(stamp)
            try:
                return super().record()
            finally:
                self._stamping.pop()
        self._stamps.append(stamp)
        if len(self._stamps) > 1:  # told at once: only the last one is asked for
            self._dropped += len(self._stamps) - 1
            del self._stamps[:-1]
        return super().record()

    def _submitting(self) -> None:
        self._stamps.append(self._stamping[-1])  # the innermost record() (an observer's record nests)

    def step_of(self, index: int) -> int:
        """The trainer's step of record ``index``; called by an observer while it is told of that record."""
        if self.clock is None or not self._stamps:
            return index
        if not self.offload:  # told during record(): the last record taken
            return self._stamps[-1]
        # told later: while the observers hear of record i the worker applies nothing after it, so the
        # records and skipped records counted now are those up to i
        attempt = index - self._base[0] + self.skipped_records - self._base[1] - self._dropped
        if not 0 <= attempt < len(self._stamps):
            return self._stamps[-1]
        step = self._stamps[attempt]
        self._dropped += attempt  # the attempts before it are told: their steps are not asked for again
        del self._stamps[:attempt]
        return step


def build_recorder(optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: Options,
                   clock=None) -> StampedRecorder:
    """The one place where an integration makes its recorder.

    With ``record_every_n_steps`` the recorder counts the optimizer's real steps itself (its step hook
    runs once per optimizer step, not per micro-batch, and skips steps AMP's GradScaler skipped);
    otherwise the callbacks call ``record()`` once per epoch. The callback adds its loggers with
    :func:`add_observers` once the recorder's state is loaded.
    """
    return StampedRecorder(optimizer, model, **dict(options.config), **options.recorder, clock=clock)


def add_observers(rec: StampedRecorder, observers: list) -> None:
    """``observers`` after the user's own ones (``callbacks=``); their steps are the trainer's (held weakly)."""
    rec.start_stamps()
    if observers:
        rec.callbacks = [*rec.callbacks, *observers]


def step_function(rec: StampedRecorder):
    """``step(index)`` for a logger observer of ``rec``: the trainer's step of record ``index``."""
    ref = weakref.ref(rec)

    def step(index: int) -> int:
        owner = ref()
        return index if owner is None else owner.step_of(index)

    return step


# ------------------------------------------------------------------------------------------ unwrapping
def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Lightning's ``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``), whose ``step`` the framework really calls."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"the trainer's optimizer is a {type(optimizer).__name__}, which is not a "
                        "torch.optim.Optimizer and wraps none; CMD records the parameters of a torch optimizer")
    return optimizer


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside ``torch.compile`` (submodule ``_orig_mod``) and DDP/DataParallel (``module``)."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    for _ in range(8):
        if "_orig_mod" in dict(model.named_children()):  # torch.compile's OptimizedModule
            model = model.get_submodule("_orig_mod")
        elif isinstance(model, parallel):
            model = model.module
        else:
            break
    return model


def clean_name(name: str) -> str:
    """A parameter name as the user's uncompiled module spells it: without ``_orig_mod.`` components,
    which ``torch.compile`` puts in the names of a compiled submodule's parameters."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = clean_name(key)
        if name in out:
            raise ValueError(f"two entries, {key!r} and another, are both named {name!r} without '_orig_mod.'")
        out[name] = value
    return out


def clean_trajectory(traj: CMDTrajectory) -> CMDTrajectory:
    """The trajectory with the layout's names cleaned, so ``traj.state_dict()`` matches the plain module."""
    layout = traj.layout
    names = tuple(clean_name(n) for n in layout.names)
    if names == layout.names:
        return traj
    cleaned = copy.copy(traj)  # every field kept (set_aside, the clustered samples, metrics): only the names change
    cleaned.layout = Layout(names, layout.shapes, layout.dtypes)
    return cleaned


def export_state_dict(rec: CMDRecorder, at: int = -1) -> dict[str, torch.Tensor]:
    """``rec.cmd_state_dict(at)`` with clean names; tied parameters get their own copy (safetensors refuses shared
    tensors)."""
    out, seen = {}, set()
    for key, value in clean_state_dict(rec.cmd_state_dict(at)).items():
        value = value.detach()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value.contiguous()
    return out


def refuse_sharded(framework: str, strategy: str, params=()) -> None:
    """A clear error for sharded training, which the callbacks do not support."""
    dtensor = next((p for p in params if type(p).__name__ == "DTensor"), None)
    if strategy or dtensor is not None:
        what = strategy or "sharded (DTensor) parameters"
        raise ValueError(f"CMDCallback does not support {framework} with {what}: its checkpoints hold each rank's "
                         "shard, and the callback keeps its state whole. Train with DDP (or one device), or use "
                         "cmd_online.CMDRecorder directly on FSDP2 parameters (docs/distributed.md)")


# ------------------------------------------------------------------------------------------ recording
class EpochRecords:
    """One record per training epoch, at most once per epoch number (a resumed run never records an epoch twice)."""

    def __init__(self):
        self.last_epoch = -1

    def record(self, rec: CMDRecorder, epoch: int) -> bool:
        if epoch <= self.last_epoch:
            return False
        self.last_epoch = epoch
        return rec.record()


class Schedule:
    """When a callback records: once per epoch (here), or after every k-th real optimizer step (the
    recorder's own step hook, ``record_every``)."""

    def __init__(self, every_n_steps: int | None):
        self.every_n_steps = every_n_steps
        self.epochs = EpochRecords()

    def end_of_epoch(self, rec: CMDRecorder, epoch: int) -> None:
        if self.every_n_steps is None:
            self.epochs.record(rec, epoch)


def require(rec: CMDRecorder | None, what: str) -> CMDRecorder:
    if rec is None:
        raise RuntimeError(f"{what}: the callback has no recorder yet; it makes one when training starts")
    return rec


class CMDAccess:
    """What both callbacks give their user once training has started: the CMD model with the names of the
    uncompiled model."""

    recorder: CMDRecorder | None

    def cmd_state_dict(self, at: int = -1) -> dict[str, torch.Tensor]:
        """The model's state_dict with the CMD weights at record ``at`` (names without ``_orig_mod.``)."""
        return export_state_dict(require(self.recorder, "cmd_state_dict"), at)

    def trajectory(self) -> CMDTrajectory:
        """``recorder.trajectory()`` with the parameter names of the uncompiled model."""
        return clean_trajectory(require(self.recorder, "trajectory").trajectory())


def export_at_end(rec: CMDRecorder, target: str, may_write: bool, write) -> None:
    """At the end of training, ``write()`` the CMD model where this process may; a warning instead of an
    error when no CMD model exists yet (training ended in the warm-up) or the write fails: the training
    itself has finished and must not fail now."""
    if rec.phase == "warmup":
        warn(f"training ended during the warm-up ({rec.num_records} of {rec.config['warmup']} "
             f"records): no CMD model exists, {target} was not written")
    elif may_write:
        try:
            write()
            LOG.info("CMDCallback: wrote the CMD model of record %d to %s", rec.num_records - 1, target)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. parameters replaced after the recorder was built
            warn(f"could not write the CMD model to {target}: {e}")


# ------------------------------------------------------------------------------------------ state
def callback_state(rec: CMDRecorder, schedule: Schedule, **extra: Any) -> dict[str, Any]:
    """The callback's state: plain tensors and numbers, loadable with ``torch.load(weights_only=True)``."""
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "recorder": rec.state_dict(),
            "recorded_epoch": schedule.epochs.last_epoch,
            "record_every_n_steps": schedule.every_n_steps, **extra}


def restore_state(rec: CMDRecorder, schedule: Schedule, state: Any, where: str) -> None:
    """Load :func:`callback_state` into the recorder and the schedule; refused, changing nothing, if it was
    recorded with another configuration (the recorder checks its own) or another schedule."""
    state = check_format(state, where, STATE_FORMAT, (STATE_VERSION,))
    if state.get("record_every_n_steps") != schedule.every_n_steps:
        raise ValueError(f"{where} was recorded with record_every_n_steps={state.get('record_every_n_steps')!r}, "
                         f"but this callback has record_every_n_steps={schedule.every_n_steps!r}; use the same")
    try:
        rec.load_state_dict(state["recorder"])
    except ValueError as e:  # a damaged or mismatched recorder state: say which file holds it
        raise ValueError(f"{where}: {e}") from None
    schedule.epochs.last_epoch = int(state["recorded_epoch"])


def continue_recording(old: CMDRecorder, new: CMDRecorder, schedule: Schedule, epoch: int) -> Schedule:
    """A second ``fit``/``train`` goes on with the earlier one's recording: ``old``'s state loaded into ``new``
    (built on this run's optimizer), the schedule kept, so the record count continues. ``epoch`` is the
    epoch this run starts at: a trainer that counts epochs from 0 again records them again. A run of
    other parameters (another model, even of the same shapes) or one ``new`` cannot continue gives a
    warning and a new recording (the returned schedule is then a fresh one)."""
    try:
        same = [id(p) for p in old.params] == [id(p) for p in new.params]
    except RuntimeError:  # the earlier run's parameters are gone
        same = False
    if not same:
        warn(f"this run trains other parameters than the earlier run (another model?): its recording "
             f"({old.num_records} records) is not continued; a new recording starts")
        return Schedule(schedule.every_n_steps)
    try:
        new.load_state_dict(old.state_dict())
    except ValueError as e:
        warn(f"this run cannot continue the recording of the earlier run ({old.num_records} records): {e}; "
             "a new recording starts")
        return Schedule(schedule.every_n_steps)
    schedule.epochs.last_epoch = min(schedule.epochs.last_epoch, epoch - 1)
    return schedule


def start_recording(optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: Options, *, clock,
                    earlier: CMDRecorder | None, schedule: Schedule, saved: tuple[str, Any] | None,
                    continue_at: int | None, observers, loaded=None) -> tuple[StampedRecorder, Schedule]:
    """The start-up of both callbacks, when training starts: build the recorder (:func:`build_recorder`), then
    load ``saved`` (where, state) into it, or, without one and with ``continue_at`` (the epoch the run starts
    at), go on with the ``earlier`` recording (:func:`continue_recording`); a refused state closes the new
    recorder and leaves the earlier one as it was. Then the earlier recorder is closed and the loggers,
    ``observers(recorder)``, are added. ``loaded(recorder, schedule)`` runs after a state was loaded.
    Returns the recorder and its schedule."""
    fresh = Schedule(options.record_every_n_steps)
    recorder = build_recorder(optimizer, model, options, clock=clock)
    with discarded_on_error(recorder):
        if saved is not None:
            restore_state(recorder, fresh, saved[1], saved[0])
            if loaded is not None:
                loaded(recorder, fresh)
        elif earlier is not None and continue_at is not None:
            fresh = continue_recording(earlier, recorder, schedule, continue_at)
    if earlier is not None:
        earlier.close()
    add_observers(recorder, observers(recorder))
    return recorder, fresh


@contextlib.contextmanager
def discarded_on_error(rec: CMDRecorder) -> Iterator[None]:
    """Close ``rec`` (its optimizer hook removed) if the block fails: a recorder built for a run whose state was
    refused must not record that run, nor replace the callback's earlier recording."""
    try:
        yield
    except BaseException:
        rec.close()
        raise


def weights_fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter, the sum, the sum of absolute values and the sum of squares of its values (float64, on
    the CPU): which weights a state was saved with, so that a resume can check that it continues the run
    whose weights the trainer has loaded."""
    with torch.no_grad():
        rows = [torch.stack([w.sum(), w.abs().sum(), w.square().sum()])
                for w in (p.detach().to(torch.float64) for p in params)]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 3, dtype=torch.float64)


def same_weights(saved: Any, now: torch.Tensor) -> bool:
    """Whether two :func:`weights_fingerprint` describe the same weights, up to the round-off of summing
    on another device (10⁻⁹ relative to the sums of absolute values)."""
    if not isinstance(saved, torch.Tensor) or saved.shape != now.shape:
        return False
    saved = saved.to(torch.float64)
    scale = torch.stack([now[:, 1], now[:, 1], now[:, 2]], dim=1)
    close = (saved - now).abs() <= 1e-9 * scale
    same = (saved == now) | (saved.isnan() & now.isnan())  # weights holding NaN/Inf have such sums
    return bool((close | same).all())


def save_state_file(state: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_save(state, path)


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    return safe_load(path, "CMD callback state")


def warn(message: str) -> None:
    warnings.warn(f"CMDCallback: {message}", RuntimeWarning, stacklevel=3)
