"""Shared pieces of the benchmarks: the two real tasks, their CNNs, optimizers, training and evaluation.

Every benchmark trains with the same data split, budget and seeds for every method. Tasks:

- ``digits``: sklearn's 8×8 ``load_digits`` (1797 images), split 1097 train / 300 validation / 400 test
  (fixed split, seed 0); training batches are augmented with a random shift of ±1 pixel and Gaussian
  noise (σ = 0.05).
- ``mnist1d``: MNIST-1D generated locally (``mnist1d.data.make_dataset``, 4000 train + 1000 test),
  train split 3000 train / 1000 validation; no augmentation beyond the dataset's own.

The data, the shift, the convolutions and the training epoch are those of ``cmd_online.demo``, with the
benchmarks' own split, widths, BatchNorm and random draws.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from cmd_online import demo
from cmd_online.demo.model import conv_block
from cmd_online.layout import Layout

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: bool


_TASKS: dict = {}


def load_task(name: str, quick: bool = False) -> Task:
    """The task's fixed split (cached per process); ``quick`` uses a small subset for smoke runs."""
    key = (name, quick)
    if key in _TASKS:
        return _TASKS[key]
    if name == "digits":
        x, y = demo.data.digits()
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = demo.data.split(x, y, (1097, 300, 400), seed=0)
        n_train = 300 if quick else 1097
        task = Task(name, x_train[:n_train], y_train[:n_train], x_val, y_val, x_test, y_test, augment=True)
    elif name == "mnist1d":
        x, y, x_test, y_test = demo.data.mnist1d(num_samples=600 if quick else None)
        n_val = len(y) // 4
        task = Task(name, x[n_val:], y[n_val:], x[:n_val], y[:n_val], x_test, y_test, augment=False)
    else:
        raise ValueError(f"task must be 'digits' or 'mnist1d'; got {name!r}")
    _TASKS[key] = task
    return task


def make_model(task: str) -> nn.Module:
    """A small CNN with BatchNorm (so that update_bn matters): ~14k weights (digits), ~10k (mnist1d)."""
    if task == "digits":
        return nn.Sequential(
            *conv_block(2, 1, 16, 3, batchnorm=True), *conv_block(2, 16, 32, 3, batchnorm=True), nn.MaxPool2d(2),
            *conv_block(2, 32, 32, 3, batchnorm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return demo.model.mnist1d_cnn(kernel=3, batchnorm=True)


OPTIMIZERS = {
    # name: (class, kwargs, cosine schedule)
    "SGD": (torch.optim.SGD, dict(lr=0.1, weight_decay=5e-4), False),
    "SGD+momentum": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4), False),
    "SGD+momentum+cosine": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4), True),
    "Adam": (torch.optim.Adam, dict(lr=1e-3), False),
}


def make_optimizer(name: str, model: nn.Module, total_steps: int):
    cls, kwargs, cosine = OPTIMIZERS[name]
    opt = cls(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) if cosine else None
    return opt, sched


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel shift (zero padding) and Gaussian noise σ = 0.05, per image."""
    return demo.random_shift(x, 1, g, draw="per_sample") + 0.05 * torch.randn(x.shape, generator=g)


def bn_loader(task: Task, batch_size: int = 256):
    """Clean training batches for torch.optim.swa_utils.update_bn."""
    return [(task.x_train[i:i + batch_size], task.y_train[i:i + batch_size])
            for i in range(0, len(task.y_train), batch_size)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in percent, in eval mode."""
    return 100.0 * demo.accuracy(model, x, y)


def evaluate_weights(model: nn.Module, state: dict, task: Task, split: str = "test",
                     recompute_bn: bool = True) -> float:
    """Accuracy of a copy of ``model`` holding ``state`` (BatchNorm statistics recomputed on train data)."""
    from torch.optim.swa_utils import update_bn

    probe = copy.deepcopy(model)
    probe.load_state_dict(state, strict=False)
    if recompute_bn:
        update_bn(bn_loader(task), probe)
    return accuracy(probe, getattr(task, f"x_{split}"), getattr(task, f"y_{split}"))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def weights_state(model: nn.Module, flat: torch.Tensor) -> dict:
    """Named parameter tensors from a flat vector in model.parameters() order."""
    names, params = zip(*model.named_parameters())
    return Layout.of_tensors(params, names).split(flat)


def rel_error(W: torch.Tensor, W_hat: torch.Tensor, w0: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W − w0 1ᵀ‖_F over the given records (columns)."""
    W, W_hat, w0 = W.double(), W_hat.double(), w0.double()
    return ((W - W_hat).norm() / (W - w0.unsqueeze(1)).norm()).item()


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def environment() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"))


def write_json(name: str, payload: dict, out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


@dataclass
class Run:
    model: nn.Module
    recorders: list
    snapshots: torch.Tensor  # N × T, record 0 = initial weights
    seconds: float


def train(task: Task, optimizer: str, seed: int, epochs: int, *, batch_size: int = 64,
          record_every: int | None = None, recorders=(), on_step=None, on_epoch=None) -> Run:
    """Train the task's CNN; take a record at the start and after every epoch (or every k steps).

    Args:
        recorders (sequence of dict): CMDRecorder keyword arguments; each recorder records at every record.
        on_step (callable): called as on_step(model) after every optimizer step (EMA updates).
        on_epoch (callable): called as on_epoch(model, epoch) after every epoch (SWA updates).
    """
    from cmd_online import CMDRecorder

    torch.manual_seed(seed)
    model = make_model(task.name)
    steps_per_epoch = -(-len(task.y_train) // batch_size)
    opt, sched = make_optimizer(optimizer, model, epochs * steps_per_epoch)
    recs = [CMDRecorder(opt, model, **kw) for kw in recorders]
    snaps = []

    def record():
        snaps.append(flat_params(model))
        for r in recs:
            r.record()

    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    record()
    step = 0

    def after_step():
        nonlocal step
        if sched is not None:
            sched.step()
        step += 1
        if on_step is not None:
            on_step(model)
        if record_every is not None and step % record_every == 0:
            record()

    for epoch in range(epochs):
        demo.train_epoch(model, opt, task.x_train, task.y_train, g, batch_size,
                         augment=augment if task.augment else None, after_step=after_step)
        if record_every is None:
            record()
        if on_epoch is not None:
            on_epoch(model, epoch)
    return Run(model, recs, torch.stack(snaps, 1), time.perf_counter() - start)
