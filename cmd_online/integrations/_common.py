"""What the Lightning and the Hugging Face callbacks share, written once.

Argument checks, the one function that builds the recorder, finding the torch optimizer inside a
framework's wrapper, the names the user sees (no ``_orig_mod.``), when to record (once per epoch, or
every k optimizer steps that really happen), swapping the CMD weights in and out, and the callback's
state (in a framework checkpoint or in a file of its own). Nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..files import atomic_save, check_format, safe_load
from ..layout import Layout
from ..recorder import CMDRecorder
from ..trajectory import CMDTrajectory

STATE_FORMAT = "cmd_online.integrations.CMDCallback"
STATE_VERSION = 1
STATE_FILE = "cmd_recorder.pt"  # the callback's file in a Hugging Face checkpoint-* folder


# ------------------------------------------------------------------------------------------ arguments
def check_int(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int ≥ {low}{' or None' if allow_none else ''}; "
                        f"got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be ≥ {low}; got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__}")
    return value


def check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a path (str or os.PathLike) or None; got {value!r}")
    return os.fspath(value)


@dataclass(frozen=True)
class Options:
    """The recorder's arguments and when to record, checked when the callback is created."""

    modes: int | None = None
    threshold: float | None = None
    samples: int = 1000
    warmup: int = 20
    freeze_modes_after: int | None = None
    seed: int = 0
    record_every_n_steps: int | None = None
    log_every: int | None = 10
    check_finite: bool = True
    compile_update: bool = False

    def __post_init__(self):
        check_int("samples", self.samples, 1)
        check_int("warmup", self.warmup, 2)
        check_int("freeze_modes_after", self.freeze_modes_after, 1, allow_none=True)
        check_int("seed", self.seed, 0)
        check_int("record_every_n_steps", self.record_every_n_steps, 1, allow_none=True)
        check_int("log_every", self.log_every, 1, allow_none=True)
        check_int("modes", self.modes, 1, allow_none=True)
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real):
                raise TypeError(f"threshold must be a float in (0, 1] or None; got {type(self.threshold).__name__}")
            if not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must be in (0, 1]; got {self.threshold}")
            if self.modes is not None:
                raise ValueError("give one of modes and threshold, not both")
        if self.modes is not None and self.modes > self.samples:
            raise ValueError(f"modes ({self.modes}) must be ≤ samples ({self.samples})")
        check_bool("check_finite", self.check_finite)
        check_bool("compile_update", self.compile_update)


def build_recorder(optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: Options,
                   writer=None) -> CMDRecorder:
    """The one place where an integration makes its recorder. It records when told to (``record()``): the
    callbacks decide when, per epoch or through :class:`StepRecords`."""
    return CMDRecorder(optimizer, model, modes=options.modes, threshold=options.threshold,
                       samples=options.samples, warmup=options.warmup, record_every=None,
                       freeze_modes_after=options.freeze_modes_after, seed=options.seed,
                       writer=writer if options.log_every is not None else None,
                       log_every=options.log_every or 10,
                       check_finite=options.check_finite, compile_update=options.compile_update)


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
    """The user's module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
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
    return CMDTrajectory(traj.references, traj.reference_index, traj.a, traj.b, traj.modes, traj.window_start,
                         Layout(names, layout.shapes, layout.dtypes), traj.mode_r2)


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


class StepRecords:
    """A record after every k-th optimizer step that really updates the weights.

    It counts in a step hook on the torch optimizer, which runs once per optimizer step whatever the
    framework (not once per micro-batch of gradient accumulation). A step that AMP's GradScaler skips
    does not count: for most optimizers the scaler then does not call ``step`` at all; for those that
    unscale inside their own step (fused Adam, AdamW, SGD; the Hugging Face Trainer's default
    ``adamw_torch_fused``) it calls ``step`` with ``optimizer.found_inf`` set and the update is skipped
    inside, so the hook reads that flag (one scalar read on the host, only in that case). The count is
    part of the callback's state, so it continues on resume.
    """

    def __init__(self, every: int):
        self.every = every
        self.steps = 0
        self._rec: CMDRecorder | None = None
        self._hook = None

    def attach(self, optimizer: torch.optim.Optimizer, rec: CMDRecorder) -> None:
        self.detach()
        self._rec = rec
        self._hook = optimizer.register_step_post_hook(self._after_step)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._rec = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf):
            return
        self.steps += 1
        if self._rec is not None and self.steps % self.every == 0:
            self._rec.record()


class Schedule:
    """When a callback records: once per epoch, or after every k-th real optimizer step."""

    def __init__(self, every_n_steps: int | None):
        self.every_n_steps = every_n_steps
        self.epochs = EpochRecords()
        self.steps = None if every_n_steps is None else StepRecords(every_n_steps)

    def start(self, optimizer: torch.optim.Optimizer, rec: CMDRecorder) -> None:
        if self.steps is not None:
            self.steps.attach(optimizer, rec)

    def stop(self) -> None:
        if self.steps is not None:
            self.steps.detach()

    def end_of_epoch(self, rec: CMDRecorder, epoch: int) -> None:
        if self.steps is None:
            self.epochs.record(rec, epoch)


class Swap:
    """CMD weights in the recorded parameters and the trained ones back (torch_ema's store / copy_to / restore).

    The trained values stay available while swapped, so a checkpoint written meanwhile can hold them.
    """

    def __init__(self):
        self._trained: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self._trained is not None

    def begin(self, rec: CMDRecorder, at: int = -1) -> None:
        if self.active:
            raise RuntimeError("the CMD weights are already swapped in")
        params = rec.params
        cmd = rec.cmd_parameters(at)
        self._trained = [(p, p.detach().clone()) for p in params]
        with torch.no_grad():
            for p, value in zip(params, cmd):
                p.copy_(value)

    def end(self) -> None:
        if self._trained is None:
            return
        with torch.no_grad():
            for p, value in self._trained:
                p.copy_(value)
        self._trained = None

    def trained_values(self) -> dict[int, torch.Tensor]:
        """id(parameter) → its trained value, while swapped."""
        return {} if self._trained is None else {id(p): value for p, value in self._trained}

    @contextlib.contextmanager
    def around(self, rec: CMDRecorder, at: int = -1) -> Iterator[None]:
        self.begin(rec, at)
        try:
            yield
        finally:
            self.end()


def require(rec: CMDRecorder | None, what: str) -> CMDRecorder:
    if rec is None:
        raise RuntimeError(f"{what}: the callback has no recorder yet; it makes one when training starts")
    return rec


# ------------------------------------------------------------------------------------------ state
def callback_state(rec: CMDRecorder, schedule: Schedule, **extra: int) -> dict[str, Any]:
    """The callback's state: plain tensors and numbers, loadable with ``torch.load(weights_only=True)``."""
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "recorder": rec.state_dict(),
            "recorded_epoch": schedule.epochs.last_epoch,
            "record_every_n_steps": schedule.every_n_steps,
            "optimizer_steps": None if schedule.steps is None else schedule.steps.steps, **extra}


def restore_state(rec: CMDRecorder, schedule: Schedule, state: Any, where: str) -> None:
    """Load :func:`callback_state` into the recorder and the schedule; refused, changing nothing, if it was
    recorded with another configuration (the recorder checks its own) or another schedule."""
    state = check_format(state, where, STATE_FORMAT, (STATE_VERSION,))
    if state.get("record_every_n_steps") != schedule.every_n_steps:
        raise ValueError(f"{where} was recorded with record_every_n_steps={state.get('record_every_n_steps')!r}, "
                         f"but this callback has record_every_n_steps={schedule.every_n_steps!r}; use the same")
    rec.load_state_dict(state["recorder"])
    schedule.epochs.last_epoch = int(state["recorded_epoch"])
    if schedule.steps is not None:
        schedule.steps.steps = int(state["optimizer_steps"])


def save_state_file(state: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_save(state, path)


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    return safe_load(path, "CMD callback state")


def warn(message: str) -> None:
    warnings.warn(f"CMDCallback: {message}", RuntimeWarning, stacklevel=3)
