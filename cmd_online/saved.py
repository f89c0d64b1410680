"""What training frameworks leave on disk, read without the frameworks.

- A model folder as the Hugging Face Trainer writes it (``checkpoint-N``, ``save_pretrained``):
  ``model.safetensors``, its shards (``model.safetensors.index.json``), or ``pytorch_model.bin``.
- The checkpoints of a run, in record order, from one folder: the Trainer's output folder (its
  ``checkpoint-N`` folders by N), or a folder of checkpoint files (.pt, .pth, .ckpt, .bin,
  .safetensors) in natural order, leaving out links to files already taken and unnumbered aliases
  (``last.ckpt``, ``best.pt``) beside numbered files, each with the reason.
- The CMD state the framework callbacks store (``cmd_online.integrations``): in a Lightning
  checkpoint (``checkpoint["callbacks"]``), in a Trainer ``checkpoint-N`` folder (``cmd_recorder.pt``),
  in that file itself, or a ``CMDRecorder.state_dict()`` saved on its own; and the trajectory of
  such a state, without the model or the optimizer.
- The trained weights of a Lightning checkpoint whose ``state_dict`` holds the CMD weights that were
  validated (``CMDCallback(swap_for_validation=True)``): the callback's state carries them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .files import (CALLBACK_FORMAT, WEIGHT_FILES, is_model_folder, read_model_folder, read_safetensors,  # noqa: F401
                    safe_load, trained_weights)

CALLBACK_FILE = "cmd_recorder.pt"  # the callback's state in a Trainer checkpoint-N folder
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_STEP_FOLDER = re.compile(r"checkpoint-(\d+)$")
_ALIASES = ("last", "latest", "best", "final")  # names that point at another record, not a record of their own


# ------------------------------------------------------------------------------------------ a run's checkpoints
def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def run_checkpoints(folder: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The checkpoints of one run in a folder, in record order, and the entries left out with the reason.

    A Trainer output folder gives its ``checkpoint-N`` folders in the order of N. Otherwise the checkpoint
    files (``CHECKPOINT_SUFFIXES``) in natural order (epoch_2 before epoch_10), leaving out a link to a
    file already taken (``latest.pt`` → ``epoch_6.pt``) and, beside numbered files, a file whose name has
    no number or starts with last/latest/best/final (``best.pt``, ``last.ckpt``): those name another record
    or a copy of one, not a record of their own.
    """
    folder = Path(folder)
    steps = [p for p in folder.iterdir() if p.is_dir() and _STEP_FOLDER.match(p.name)]
    if steps:
        used, skipped = [], []
        for p in sorted(steps, key=lambda p: int(_STEP_FOLDER.match(p.name).group(1))):
            (used.append(p) if is_model_folder(p) else skipped.append((p, "no model weights in it")))
        return used, skipped
    files = sorted((p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()), key=natural_key)
    numbered = [p for p in files if re.search(r"\d", p.stem)]
    used, skipped, targets = [], [], {}
    for p in files:  # links last: a link to a file of the set is left out whatever their order
        if p.is_symlink():
            continue
        if numbered and (p not in numbered or p.stem.lower().startswith(_ALIASES)):
            skipped.append((p, "an alias beside numbered checkpoints (no record of its own)"))
            continue
        used.append(p)
        targets[os.path.realpath(p)] = p
    for p in files:
        if not p.is_symlink():
            continue
        target = targets.get(os.path.realpath(p))
        if target is not None:
            skipped.append((p, f"a link to {target.name}, already taken"))
        elif numbered and (p not in numbered or p.stem.lower().startswith(_ALIASES)):
            skipped.append((p, "an alias beside numbered checkpoints (no record of its own)"))
        else:
            used.append(p)
    used.sort(key=natural_key)
    return used, sorted(skipped, key=lambda item: natural_key(item[0]))


# ------------------------------------------------------------------------------------------ CMD states
def cmd_states(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The recorder states (``CMDRecorder.state_dict()``) in ``path``, by where they are: a Lightning checkpoint
    (one per CMD callback, by its key in ``checkpoint["callbacks"]``), a Trainer checkpoint folder or its
    ``cmd_recorder.pt``, or a recorder state file. Empty if there is none."""
    path = Path(path)
    if path.is_dir():
        file = path / CALLBACK_FILE
        if not file.is_file():
            return {}
        path = file
    obj = safe_load(path, "checkpoint")
    if not isinstance(obj, Mapping):
        return {}
    if obj.get("format") == CALLBACK_FORMAT and isinstance(obj.get("recorder"), Mapping):
        return {CALLBACK_FILE: dict(obj["recorder"])}
    if "meta" in obj and isinstance(obj.get("meta"), (bytes, bytearray)):
        return {path.name: dict(obj)}
    states = obj.get("callbacks")
    if not isinstance(states, Mapping):
        return {}
    return {key: dict(state["recorder"]) for key, state in states.items()
            if isinstance(state, Mapping) and state.get("format") == CALLBACK_FORMAT
            and isinstance(state.get("recorder"), Mapping)}


def trajectory_of_state(state: Mapping):
    """The CMD model a recorder state holds, as a :class:`cmd_online.CMDTrajectory` with its parameter names:
    a recorder on stand-in parameters of the recorded shapes loads the state (nothing of the model is
    needed). A ``ValueError`` for a state still in its warm-up (no CMD model yet)."""
    from .checkpoint import read_meta
    from .config import CMDConfig
    from .layout import Layout
    from .recorder import CMDRecorder
    from .trajectory import CMDTrajectory

    meta = read_meta(dict(state))
    config = CMDConfig.from_dict(meta["config"])  # record_every too: the stand-in optimizer never steps
    layout = Layout.from_dict(meta["layout"])
    if int(meta["num_records"]) < config.warmup:
        raise ValueError(f"the recorder state is in its warm-up ({int(meta['num_records'])} of {config.warmup} records): "
                         "it holds no CMD model yet")
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in zip(layout.shapes, layout.dtypes)]
    holder = torch.nn.Module()  # the recorded parameter names (the state's statistics are keyed by them)
    for name, param in zip(layout.names, params):
        *path, leaf = name.split(".")
        module = holder
        for part in path:
            children = dict(module.named_children())
            if part not in children:
                module.add_module(part, torch.nn.Module())
            module = dict(module.named_children())[part]
        module.register_parameter(leaf, param)
    with warnings.catch_warnings():  # the settings were the recorded run's: no advice on them now
        warnings.simplefilter("ignore")
        rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), holder, **dict(config), check_finite=False)
    try:
        rec.load_state_dict(dict(state))
        traj = rec.trajectory()
    finally:
        rec.close()
    return CMDTrajectory(traj.references, traj.reference_index, traj.a, traj.b, traj.modes, traj.window_start,
                         layout, traj.mode_r2, traj.set_aside, sample_index=traj.sample_index,
                         sample_history=traj.sample_history, sample_modes=traj.sample_modes, metrics=traj.metrics)


# ------------------------------------------------------------------------------------------ exports
_TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", CALLBACK_FILE)


def is_model_file(name: str) -> bool:
    """Whether a file of a Trainer checkpoint folder belongs to the model as ``trainer.save_model`` writes it
    (config, generation config, tokenizer or processor files, training arguments), not to the training state
    (optimizer, scheduler, scaler, RNG, trainer state, the CMD state) nor to the weights."""
    if name in _TRAINING_FILES or name.startswith("rng_state") or name in WEIGHT_FILES:
        return False
    return not (name.endswith(".safetensors") or re.match(r"pytorch_model.*\.bin$", name))


def lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in ``path`` if Lightning wrote it (a ``state_dict`` and a ``pytorch-lightning_version``)."""
    obj = safe_load(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping) and "pytorch-lightning_version" in obj:
        return obj
    return None


def replace_entries(weights: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the entries named in ``new`` replaced, and entries tied to them (sharing their storage,
    as a tied output layer does) too; a ValueError for a name ``weights`` lacks or a shape that differs."""
    out, tied = dict(weights), {}
    for name, value in new.items():
        if name not in out:
            raise ValueError(f"the checkpoint has no entry {name!r} for the CMD weights (another model?)")
        if tuple(out[name].shape) != tuple(value.shape):
            raise ValueError(f"the checkpoint's {name!r} has shape {tuple(out[name].shape)}, the CMD weights "
                             f"{tuple(value.shape)}")
        if out[name].numel():
            tied[out[name].untyped_storage().data_ptr()] = (out[name], value)
    for name, tensor in weights.items():
        if name in new or not tensor.numel():
            continue
        match = tied.get(tensor.untyped_storage().data_ptr())
        if match is not None and match[0].shape == tensor.shape:
            out[name] = match[1]
    for name, value in new.items():
        out[name] = value.to(out[name].dtype)
    return out


def with_weights(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A Lightning checkpoint of the model with ``state`` (the CMD weights) in its ``state_dict``, for
    ``LitModel.load_from_checkpoint``: the training state (callbacks, optimizers, schedulers) left out."""
    out = {k: v for k, v in checkpoint.items() if k not in ("callbacks", "optimizer_states", "lr_schedulers")}
    out["state_dict"] = replace_entries(checkpoint["state_dict"], state)
    return out
