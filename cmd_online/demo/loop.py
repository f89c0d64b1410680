"""The demo's run: its settings, the training epoch, the test accuracy, and :func:`run`, which trains with a
CMDRecorder attached, compares the trained network with the CMD model and exports both."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CMDConfig, check_choice, check_float, check_int
from ..files import atomic_save
from ..recorder import CMDRecorder
from .data import DATASETS, load_data, random_shift
from .model import build_model, model_bytes
from .report import ROW_HEADER, DemoResult, Progress, header, log_row, open_writer, row_text, write_metrics


@dataclass
class DemoConfig:
    """Settings of the demo run.

    Args:
        data (str): ``"digits"`` (scikit-learn's load_digits) or ``"mnist1d"`` (default "digits").
        epochs (int): training epochs, one record each (default 60).
        warmup (int): warm-up records F before the modes are fixed (default 10).
        modes (int): number of modes M (default 10).
        samples (int): sampled weights K clustered at the end of the warm-up (default 1000).
        seed (int): seed of data split, initialisation, shuffling, shifts and sampling (default 0).
        out (str): output folder for checkpoints, trajectory and TensorBoard events (default "runs/demo").
        batch_size (int): mini-batch size (default 64).
        lr (float): SGD learning rate, momentum 0.9 (default 0.05).
        report_every (int): epochs per printed table row; 0 picks about ten rows (default 0).
        freeze_modes_after (int): the recorder's compact memory: fix the modes this many records into
            tracking (default 3; None: the full form).
        save_checkpoints (bool): also save every epoch's weights to ``out/checkpoints/`` (default False).
        progress (bool): show a progress bar (needs tqdm; default True).
        threads (int): torch CPU threads; 1 is fastest for this small model on a busy machine (default 1).
    """

    data: str = "digits"
    epochs: int = 60
    warmup: int = 10
    modes: int = 10
    samples: int = 1000
    seed: int = 0
    out: str = "runs/demo"
    batch_size: int = 64
    lr: float = 0.05
    report_every: int = 0
    freeze_modes_after: int | None = 3
    save_checkpoints: bool = False
    progress: bool = True
    threads: int = 1

    @property
    def recorder(self) -> CMDConfig:
        """The recorder's settings, validated by :class:`cmd_online.CMDConfig`."""
        return CMDConfig(modes=self.modes, samples=self.samples, warmup=self.warmup,
                         freeze_modes_after=self.freeze_modes_after, seed=self.seed)

    def check(self) -> None:
        """Raise ValueError or TypeError naming the first setting out of range."""
        check_choice("data", self.data, DATASETS)
        for name, low in (("epochs", 1), ("batch_size", 1), ("report_every", 0), ("threads", 1)):
            check_int(name, getattr(self, name), low)
        check_float("lr", self.lr, 0.0, math.inf, low_open=True)
        if self.recorder.warmup >= self.epochs:
            raise ValueError(f"warmup ({self.warmup}) must be < epochs ({self.epochs}): CMD is fitted on the "
                             f"epochs after the warm-up")


# --------------------------------------------------------------------------------------------- training
# the metrics the demo adds at each record (CMDRecorder.add_metrics): one panel of its report
TRAINED, ONLINE, FINAL = ("test accuracy/trained", "test accuracy/CMD as known at the record",
                          "test accuracy/CMD of the whole run")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator, batch_size: int = 64,
                augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None, device: torch.device | str | None = None) -> float:
    """One epoch of cross-entropy over shuffled mini-batches; returns the mean loss per sample.

    Args:
        generator (torch.Generator): draws the order of the samples, then each batch's augmentation.
        augment (callable): ``augment(x_batch, generator)``, the augmented batch (default None: none).
        after_step (callable): called after every optimizer step (default None).
        device (torch.device or str): where each batch is moved, after augmentation (default None: stays).
    """
    model.train()
    order = torch.randperm(len(y), generator=generator)
    total_loss = 0.0
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        xb = x[batch] if augment is None else augment(x[batch], generator)
        loss = F.cross_entropy(model(xb.to(device)), y[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        if after_step is not None:
            after_step()
    return total_loss / len(y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channel stride 1, the layout the demo's shifted batches have always had: the convolutions
    pick their kernel, and so their rounding, by it, and the demo's printed numbers depend on that."""
    return x.movedim(1, -1).clone(memory_format=torch.contiguous_format).movedim(-1, 1)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------- the recorder
def _make_recorder(config: DemoConfig, optimizer: torch.optim.Optimizer, model: nn.Module, writer,
                   write: Callable[[str], None]) -> CMDRecorder:
    """The demo's one CMDRecorder: every recorder setting of ``config`` goes in here and nowhere else."""
    return CMDRecorder(optimizer, model, **config.recorder, writer=writer)


# --------------------------------------------------------------------------------------------- the run
@dataclass
class _Seconds:
    """Where the time of the epochs went; the record that ends the warm-up (clustering) apart."""

    train: float = 0.0
    record: float = 0.0
    clustering: float = 0.0


def run(config: DemoConfig, write: Callable[[str], None] = print) -> DemoResult:
    """Train, record, compare and export as :class:`DemoConfig` says; returns the measurements."""
    config.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, write)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, write: Callable[[str], None]) -> DemoResult:
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_model(config.data)
    num_weights = sum(p.numel() for p in model.parameters())
    if config.samples > num_weights:
        raise ValueError(f"samples ({config.samples}) must be ≤ the number of weights ({num_weights})")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
    data = load_data(config.data, config.seed)
    _remove_earlier_run(out, write)
    writer = open_writer(out, write)
    recorder = _make_recorder(config, optimizer, model, writer, write)
    write(header(config, len(data[1]), len(data[3]), num_weights))
    rows, seconds = _train(config, model, optimizer, recorder, writer, data, write)
    _whole_run(model, recorder, data[2], data[3])
    files, trajectory = _export(config, out, model, recorder, writer)
    result = DemoResult(
        trained_accuracy=rows[-1]["trained_accuracy"], cmd_accuracy=rows[-1]["cmd_accuracy"],
        modes=trajectory.num_modes, num_weights=num_weights, recorder_bytes=recorder.nbytes()["total"],
        model_bytes=model_bytes(model), history_bytes=num_weights * config.epochs * 4,
        record_seconds=seconds.record, train_seconds=seconds.train, clustering_seconds=seconds.clustering,
        wall_seconds=time.perf_counter() - start, files=files, rows=rows)
    write_metrics(result, config)
    return result


def _remove_earlier_run(out: Path, write: Callable[[str], None]) -> None:
    """Files of an earlier run in this folder would mix with this one (doubled curves, extra checkpoints)."""
    stale = list(out.glob("events.out.tfevents.*")) + list((out / "checkpoints").glob("epoch_*.pt"))
    for path in stale:
        path.unlink()
    if stale:
        write(f"note: removed {len(stale)} file(s) of an earlier demo run from {out}")


def _train(config: DemoConfig, model: nn.Module, optimizer: torch.optim.Optimizer, recorder: CMDRecorder, writer,
           data: tuple[torch.Tensor, ...], write: Callable[[str], None]) -> tuple[list[dict], _Seconds]:
    """The epochs: train, record, test, log and print; closes the progress bar, recorder and writer."""
    x_train, y_train, x_test, y_test = data
    max_shift = 1 if config.data == "digits" else 3
    generator = torch.Generator().manual_seed(config.seed)
    every = config.report_every or max(1, round(config.epochs / 10))
    rows: list[dict] = []
    seconds = _Seconds()
    progress = Progress(config.epochs, config.progress, write)
    progress.write(ROW_HEADER)
    try:
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            loss = train_epoch(model, optimizer, x_train, y_train, generator, config.batch_size,
                               augment=lambda xb, g: _channels_last(random_shift(xb, max_shift, g)))
            record_start = time.perf_counter()
            recorder.record()
            record_time = time.perf_counter() - record_start
            if epoch == config.warmup:  # the one-off clustering is reported on its own
                seconds.clustering = record_time
            else:
                seconds.record += record_time
                seconds.train += record_start - epoch_start
            if config.save_checkpoints:
                atomic_save(_weights(model), Path(config.out) / "checkpoints" / f"epoch_{epoch:04d}.pt")
            rows.append(_test(epoch, loss, model, recorder, x_test, y_test, record_time))
            log_row(writer, rows[-1])
            if epoch % every == 0 or epoch == config.epochs:
                progress.write(row_text(rows[-1]))
            progress.update(loss=f"{loss:.3f}", acc=f"{rows[-1]['trained_accuracy']:.3f}")
    finally:
        progress.close()
        recorder.close()
        if writer is not None:
            writer.close()
    return rows, seconds


def _whole_run(model: nn.Module, recorder: CMDRecorder, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
    """The final CMD model (a, b fitted over the whole window) at every record of the window, as a metric."""
    for at in range(recorder.window_start, recorder.num_records):
        with recorder.swapped(at=at):
            recorder.add_metrics({FINAL: accuracy(model, x_test, y_test)}, at=at)


def _test(epoch: int, loss: float, model: nn.Module, recorder: CMDRecorder, x_test: torch.Tensor,
          y_test: torch.Tensor, record_seconds: float) -> dict:
    """One epoch's row: test accuracy of the trained network and, once tracking, of the CMD model."""
    trained = accuracy(model, x_test, y_test)
    cmd = None
    recorder.add_metrics({TRAINED: trained})  # kept in the trajectory: its report draws them
    if recorder.ready:
        with recorder.swapped():
            cmd = accuracy(model, x_test, y_test)
        recorder.add_metrics({ONLINE: cmd})
    return dict(epoch=epoch, loss=loss, trained_accuracy=trained, cmd_accuracy=cmd, phase=recorder.phase,
                record_seconds=record_seconds)


def _export(config: DemoConfig, out: Path, model: nn.Module, recorder: CMDRecorder, writer):
    """Write the CMD model, the trained model and the trajectory; returns the files by name and the trajectory."""
    files = {"cmd_model": str(out / "cmd_model.pt")}
    recorder.export(files["cmd_model"])
    files["trained_model"] = str(out / "trained_model.pt")
    atomic_save(_weights(model), files["trained_model"])
    trajectory = recorder.trajectory()
    files["trajectory"] = str(out / "trajectory.pt")
    trajectory.save(files["trajectory"])
    if writer is not None:
        files["tensorboard"] = str(out)
    if config.save_checkpoints:
        files["checkpoints"] = str(out / "checkpoints")
    files["metrics"] = str(out / "metrics.json")
    return files, trajectory
