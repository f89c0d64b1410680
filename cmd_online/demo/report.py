"""What the demo shows and writes: its result, the printed rows and table, the progress bar, metrics.json
and the TensorBoard writer of its own scalars."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..files import atomic_write_text
from ..units import human_bytes

ROW_HEADER = f"{'epoch':>5}  {'loss':>7}  {'trained acc':>11}  {'CMD acc':>7}  {'phase':>8}  {'record ms':>9}"


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


def header(config, train_samples: int, test_samples: int, num_weights: int) -> str:
    """The first line of a run: data, sizes and the settings of :class:`DemoConfig` ``config``."""
    return (f"cmd-online demo: {config.data}, {train_samples} train / {test_samples} test samples, "
            f"{num_weights:,} weights; {config.epochs} epochs, warm-up {config.warmup}, modes {config.modes}, "
            f"samples {config.samples}, seed {config.seed}")


def row_text(row: dict) -> str:
    """One epoch's row under :data:`ROW_HEADER`."""
    cmd = "-" if row["cmd_accuracy"] is None else f"{100 * row['cmd_accuracy']:.1f}%"
    return (f"{row['epoch']:>5}  {row['loss']:>7.4f}  {100 * row['trained_accuracy']:>10.1f}%  {cmd:>7}  "
            f"{row['phase']:>8}  {1000 * row['record_seconds']:>9.2f}")


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


def write_metrics(result: DemoResult, config) -> None:
    """Every number of ``result`` and the settings of ``config`` as JSON, to ``result.files["metrics"]``."""
    metrics = dict(asdict(result), record_share=result.record_share, config=asdict(config))
    atomic_write_text(Path(result.files["metrics"]), json.dumps(metrics, indent=1))


class Progress:
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


def open_writer(folder: Path, write: Callable[[str], None]):
    """A TensorBoard SummaryWriter into ``folder``, or None (with a note) where TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is a dependency, but keep the demo running without it
        write(f"note: TensorBoard logging is off ({e})")
        return None
    return SummaryWriter(log_dir=str(folder))


def log_row(writer, row: dict) -> None:
    """The demo's own scalars of one epoch: loss and the test accuracies."""
    if writer is None:
        return
    writer.add_scalar("demo/loss", row["loss"], row["epoch"])
    writer.add_scalar("demo/test_accuracy/trained", row["trained_accuracy"], row["epoch"])
    if row["cmd_accuracy"] is not None:
        writer.add_scalar("demo/test_accuracy/cmd", row["cmd_accuracy"], row["epoch"])
