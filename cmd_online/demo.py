"""The ``cmd-online demo``: train a small CNN on real, bundled data with a CMDRecorder attached.

Data come from packages, never from the network: scikit-learn's ``load_digits`` (1,797 8×8 digits)
or MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (its ``get_dataset`` downloads, so
it is never called). Training augments with random shifts, records one CMD point per epoch, and
compares the trained network with the CMD model on the test set.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_save, atomic_write_text
from .recorder import CMDRecorder
from .units import human_bytes

DATASETS = ("digits", "mnist1d")


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
            tracking (default None, the full form).
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
    freeze_modes_after: int | None = None
    save_checkpoints: bool = False
    progress: bool = True
    threads: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {self.data!r}")
        for name, low in (("epochs", 1), ("warmup", 2), ("modes", 1), ("samples", 1), ("batch_size", 1),
                          ("report_every", 0), ("threads", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be ≥ {low}; got {getattr(self, name)}")
        if self.warmup >= self.epochs:
            raise ValueError(f"warmup ({self.warmup}) must be < epochs ({self.epochs}): CMD is fitted on the "
                             f"epochs after the warm-up")
        if self.freeze_modes_after is not None and self.freeze_modes_after < 1:
            raise ValueError(f"freeze_modes_after must be ≥ 1 or None; got {self.freeze_modes_after}")
        if self.modes > self.samples:
            raise ValueError(f"modes ({self.modes}) must be ≤ samples ({self.samples})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")


@dataclass
class DemoResult:
    """What the demo measured; ``rows`` holds one dict per printed epoch block."""

    trained_accuracy: float
    cmd_accuracy: float
    modes: int
    num_weights: int
    recorder_bytes: int
    model_bytes: int
    history_bytes: int
    record_seconds: float
    train_seconds: float
    clustering_seconds: float
    wall_seconds: float
    files: dict[str, str]
    rows: list[dict] = field(default_factory=list)

    @property
    def record_share(self) -> float:
        """Time in ``record()`` as a share of the epochs' training time, the one clustering record aside."""
        return self.record_seconds / self.train_seconds if self.train_seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- data
def load_data(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, made locally (no download).

    ``digits``: 8×8 images scaled to [0, 1], shape (n, 1, 8, 8), a seeded 80/20 split.
    ``mnist1d``: MNIST-1D's own train/test split, shape (n, 1, 40), standardised.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = len(y) // 5
        test, train = order[:n_test], order[n_test:]
        return x[train], y[train], x[test], y[test]
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        data = make_dataset(args)  # generated here; get_dataset would download
        x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
        x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
        mean, std = x.mean(), x.std()
        return ((x - mean) / std, torch.tensor(data["y"], dtype=torch.int64),
                (x_test - mean) / std, torch.tensor(data["y_test"], dtype=torch.int64))
    raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {name!r}")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each sample by up to ``max_shift`` pixels along each spatial axis, padding with zeros."""
    if max_shift == 0:
        return x
    spatial = x.shape[2:]
    padded = F.pad(x, [max_shift] * (2 * len(spatial)))
    batch = torch.arange(x.shape[0])
    index: list[torch.Tensor] = []
    for axis, size in enumerate(spatial):
        start = torch.randint(0, 2 * max_shift + 1, (x.shape[0],), generator=generator)
        view = [x.shape[0]] + [1] * len(spatial)
        view[1 + axis] = size
        index.append((start.unsqueeze(1) + torch.arange(size)).view(view))
    view = [x.shape[0]] + [1] * len(spatial)
    # advanced indexing puts the batch and spatial axes first and channels last
    out = padded.movedim(1, -1)[(batch.view(view), *index)]
    return out.movedim(-1, 1).contiguous()


# --------------------------------------------------------------------------------------------- model
def build_model(data: str) -> nn.Module:
    """The demo's small CNN for ``data`` (no BatchNorm, so parameters are the whole state)."""
    if data == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    if data == "mnist1d":
        return nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
            nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 10, 10))
    raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {data!r}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


def model_bytes(model: nn.Module) -> int:
    """Bytes of one copy of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------- progress
class _Progress:
    """tqdm over epochs when it is installed and wanted; otherwise plain printing of the rows only."""

    def __init__(self, total: int, enabled: bool, write: Callable[[str], None]):
        self._bar = None
        self._write = write
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc="epochs", unit="epoch", leave=False, file=sys.stderr,
                                 disable=None)  # None: no bar when stderr is not a terminal

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.clear()
            self._write(line)
            self._bar.refresh()
        else:
            self._write(line)

    def update(self, **postfix) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _open_writer(folder: Path, write: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is a dependency, but keep the demo running without it
        write(f"note: TensorBoard logging is off ({e})")
        return None
    return SummaryWriter(log_dir=str(folder))


def _recorder_logging_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cmd_online.tensorboard") is not None


# --------------------------------------------------------------------------------------------- training
ROW_HEADER = f"{'epoch':>5}  {'loss':>7}  {'trained acc':>11}  {'CMD acc':>7}  {'phase':>8}  {'record ms':>9}"


def _row_text(row: dict) -> str:
    cmd = "-" if row["cmd_accuracy"] is None else f"{100 * row['cmd_accuracy']:.1f}%"
    return (f"{row['epoch']:>5}  {row['loss']:>7.4f}  {100 * row['trained_accuracy']:>10.1f}%  {cmd:>7}  "
            f"{row['phase']:>8}  {1000 * row['record_seconds']:>9.2f}")


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
    x_train, y_train, x_test, y_test = load_data(config.data, config.seed)

    # files of an earlier run in this folder would mix with this one (doubled curves, extra checkpoints)
    stale = list(out.glob("events.out.tfevents.*")) + list((out / "checkpoints").glob("epoch_*.pt"))
    for path in stale:
        path.unlink()
    if stale:
        write(f"note: removed {len(stale)} file(s) of an earlier demo run from {out}")
    writer = _open_writer(out, write)
    recorder_writer = writer
    if writer is not None and not _recorder_logging_available():
        write("note: cmd_online.tensorboard is not available; mode statistics are not logged "
              "(loss and accuracies still are)")
        recorder_writer = None
    recorder = CMDRecorder(optimizer, model, modes=config.modes, samples=config.samples,
                           warmup=config.warmup, freeze_modes_after=config.freeze_modes_after,
                           writer=recorder_writer, seed=config.seed)

    shift = 1 if config.data == "digits" else 3
    generator = torch.Generator().manual_seed(config.seed)
    every = config.report_every or max(1, round(config.epochs / 10))
    checkpoints = out / "checkpoints"
    files = {}
    rows: list[dict] = []
    train_seconds = record_seconds = clustering_seconds = 0.0
    write(f"cmd-online demo: {config.data}, {len(y_train)} train / {len(y_test)} test samples, "
          f"{num_weights:,} weights; {config.epochs} epochs, warm-up {config.warmup}, modes {config.modes}, "
          f"samples {config.samples}, seed {config.seed}")
    progress = _Progress(config.epochs, config.progress, write)
    progress.write(ROW_HEADER)
    try:
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            order = torch.randperm(len(y_train), generator=generator)
            total_loss = 0.0
            for i in range(0, len(order), config.batch_size):
                batch = order[i:i + config.batch_size]
                xb = random_shift(x_train[batch], shift, generator)
                loss = F.cross_entropy(model(xb), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
            record_start = time.perf_counter()
            recorder.record()
            record_time = time.perf_counter() - record_start
            if epoch == config.warmup:  # the one-off clustering is reported on its own
                clustering_seconds = record_time
            else:
                record_seconds += record_time
                train_seconds += record_start - epoch_start
            if config.save_checkpoints:
                atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()},
                            checkpoints / f"epoch_{epoch:04d}.pt")
            trained_acc = accuracy(model, x_test, y_test)
            cmd_acc = None
            if recorder.phase == "tracking":
                with recorder.swapped():
                    cmd_acc = accuracy(model, x_test, y_test)
            loss_mean = total_loss / len(y_train)
            if writer is not None:
                writer.add_scalar("demo/loss", loss_mean, epoch)
                writer.add_scalar("demo/test_accuracy/trained", trained_acc, epoch)
                if cmd_acc is not None:
                    writer.add_scalar("demo/test_accuracy/cmd", cmd_acc, epoch)
            row = dict(epoch=epoch, loss=loss_mean, trained_accuracy=trained_acc, cmd_accuracy=cmd_acc,
                       phase=recorder.phase, record_seconds=record_time)
            rows.append(row)
            if epoch % every == 0 or epoch == config.epochs:
                progress.write(_row_text(row))
            progress.update(loss=f"{loss_mean:.3f}", acc=f"{trained_acc:.3f}")
    finally:
        progress.close()
        recorder.close()
        if writer is not None:
            writer.close()

    files["cmd_model"] = str(out / "cmd_model.pt")
    recorder.export(files["cmd_model"])
    files["trained_model"] = str(out / "trained_model.pt")
    atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, files["trained_model"])
    trajectory = recorder.trajectory()
    files["trajectory"] = str(out / "trajectory.pt")
    trajectory.save(files["trajectory"])
    if writer is not None:
        files["tensorboard"] = str(out)
    if config.save_checkpoints:
        files["checkpoints"] = str(checkpoints)
    files["metrics"] = str(out / "metrics.json")

    result = DemoResult(
        trained_accuracy=rows[-1]["trained_accuracy"], cmd_accuracy=rows[-1]["cmd_accuracy"],
        modes=trajectory.num_modes, num_weights=num_weights, recorder_bytes=recorder.nbytes()["total"],
        model_bytes=model_bytes(model), history_bytes=num_weights * config.epochs * 4,
        record_seconds=record_seconds, train_seconds=train_seconds, clustering_seconds=clustering_seconds,
        wall_seconds=time.perf_counter() - start, files=files, rows=rows)
    metrics = dict(asdict(result), record_share=result.record_share, config=asdict(config))
    atomic_write_text(Path(files["metrics"]), json.dumps(metrics, indent=1))
    return result


def summary_table(result: DemoResult) -> str:
    """The final table the demo prints."""
    lines = [
        f"{'':<26}{'trained':>10}{'CMD':>10}",
        f"{'test accuracy':<26}{100 * result.trained_accuracy:>9.1f}%{100 * result.cmd_accuracy:>9.1f}%",
        f"{'modes':<26}{result.modes:>20}",
        f"{'weights':<26}{result.num_weights:>20,}",
        f"{'recorder memory':<26}{human_bytes(result.recorder_bytes):>20}"
        f"  = {result.recorder_bytes / result.model_bytes:.1f} × one model copy ({human_bytes(result.model_bytes)})",
        f"{'full history (N×T×4 B)':<26}{human_bytes(result.history_bytes):>20}"
        f"  = {result.history_bytes / result.model_bytes:.0f} × one model copy",
        f"{'record overhead':<26}{100 * result.record_share:>19.2f}%  of epoch time, logging included "
        f"({1000 * result.record_seconds / max(len(result.rows) - 1, 1):.2f} ms per record)",
        f"{'end of warm-up (once)':<26}{result.clustering_seconds:>19.2f}s  clustering"
        f"{' and first TensorBoard figures' if 'tensorboard' in result.files else ''}",
        f"{'wall time of the run':<26}{result.wall_seconds:>19.1f}s",
    ]
    return "\n".join(lines)
