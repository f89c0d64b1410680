"""Logging of a CMDRecorder: mode statistics, histograms and figures, to TensorBoard or any metrics logger.

:class:`TensorBoardLogger` is an observer (``cmd_online.observers``): pass it in
``CMDRecorder(..., callbacks=[TensorBoardLogger(writer, every=10)])``, or give the recorder
``writer=`` and ``log_every=``, which builds one. :class:`MetricsLogger` hands the same scalars to any
``log(metrics, step)`` callable (``wandb.log``, ``mlflow.log_metrics``, a Lightning logger's
``log_metrics``). Both take ``step=``, the x-axis value of each record (default its index). They
read the recorder through its public, read-only API only. Everything goes under one tag tree,
``cmd/``, in the writer's own run directory:

    cmd/reference/mode_XX      value of mode XX's reference weight, every record
    cmd/memory/bytes           bytes held by the recorder, every record
    cmd/mode_size/mode_XX      number of weights in mode XX           } every ``every`` records
    cmd/mode_share/mode_XX     their share of all weights             } and at ``close()`` (every
    cmd/mode_r2/mode_XX        mean R² (ρ²) of its members            } record in the compact form
    cmd/fit/mean_r2            mean R² over all weights               } for size and share)
    cmd/fit/relative_residual  sqrt(Σ S_i(1 − ρ_i²) / Σ S_i): the CMD fit's residual norm over the
                               centred trajectory's norm in the window, from the statistics alone
    cmd/fit/references_set_aside  references that moved only by rounding in the window (concepts.md)
    cmd/hist/a, cmd/hist/r2    histograms of the slopes a and of R²   (same interval)
    cmd/figures/correlation    clustered |corr| of the K samples with mode boundaries (warm-up end)
    cmd/figures/references     the reference weights over all records so far (warm-up end, interval, close)
    cmd/figures/mode_by_layer  fraction of each mode in each layer (warm-up end, interval, close)
    cmd/config                 text: the recorder's configuration (warm-up end)

Cost: the mode statistics need every weight's mode, the fit: an O(M·N) pass over the statistics,
block by block (see benchmarks/bench_logging.py), so they are taken every ``every`` records, not
every record. Per record only O(M) values reach the host; at the interval O(M·layers + bins).
Figures use matplotlib when it is installed (the ``plots`` extra) and ``FIGURES == "auto"``;
otherwise, and always for the interval mode-by-layer map (a matplotlib figure costs far more than a
record), they are drawn directly as uint8 images from the recorder's tensors. When torch.distributed
is initialised only rank 0 writes; under FSDP its statistics are those of its own shard.
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch

from .distributed import is_writer
from .figures import (correlation_figure, heatmap_image, lines_image,  # noqa: F401 (heatmap_image, lines_image:
                      mode_by_layer_figure, references_figure)  # kept importable from here)

TAG = "cmd"
HIST_BINS = 64
FIGURES = "auto"  # "auto": matplotlib if importable, else native images; "native": never matplotlib
QUANTILE_SAMPLES = 4096  # weights whose slopes set the range of the a-histogram (~20 in each 0.5 % tail)


def _mode_tag(kind: str, m: int, num_modes: int) -> str:
    return f"{TAG}/{kind}/mode_{m:0{max(2, len(str(num_modes - 1)))}d}"


class _StatisticsLog(abc.ABC):
    """What a logger of the mode statistics logs, and when; where it goes is the subclass's.

    Per record: the reference values and the recorder's memory. Every ``every`` records from the third
    record of the fit window on (with two, every affine fit is exact), and at ``close()``: mode sizes,
    shares and R², the fit's mean R² and relative residual, histograms, the mode-by-layer map and the
    references over all records so far (the figure grows with the run). At the end of the warm-up: the
    configuration and the warm-up figures. Only rank 0 writes.
    """

    def __init__(self, every: int = 10, step=None):
        from .config import check_int

        self.every = check_int("every", every, 1)
        if step is not None and not callable(step):
            raise TypeError(f"step must be a callable (record index → step) or None; got {type(step).__name__}")
        self.step = step
        self._started = False
        self.last_summary: int | None = None  # record of the last log of the mode statistics (read-only)
        self._last_sizes: int | None = None  # record whose mode sizes were last written
        self._frozen = None  # (modes tensor, its sizes) of the compact form: fixed after the freeze

    def _at(self, index: int) -> int:
        """The x-axis value of record ``index``: ``step(index)``, or the index itself."""
        return index if self.step is None else int(self.step(index))

    # ------------------------------------------------------------------------- observer events
    def on_tracking_start(self, rec) -> None:
        if is_writer():
            self._started = True  # once, even if a figure fails: the records' own logs must go on
            self._log_warmup_end(rec, self._at(rec.num_records - 1))

    def on_record(self, rec, index: int) -> None:
        if is_writer() and rec.phase == "tracking":
            self.log(rec, self._at(index))

    def on_close(self, rec) -> None:
        """The mode statistics at the last record (unless the last record logged them), then flush."""
        if not is_writer():
            return
        if rec.phase == "tracking" and rec.summary.window_count >= 2:
            record = rec.num_records - 1
            if self.last_summary != record:
                self._log(rec, self._at(record), full=True, per_record=False)
        self._flush()

    def log(self, rec, step: int) -> None:
        """Log now, at step ``step``: the per-record values, and the mode statistics when due."""
        if rec.phase == "warmup":
            self._scalars([(f"{TAG}/memory/bytes", float(rec.nbytes()["total"]))], step)
            return
        if not self._started:
            self._started = True
            self._log_warmup_end(rec, step)
        record = rec.num_records - 1
        due = self.last_summary is None or record - self.last_summary >= self.every
        self._log(rec, step, full=rec.summary.window_count >= 3 and due)

    # ------------------------------------------------------------------------- what is logged
    def _log(self, rec, step: int, full: bool, per_record: bool = True) -> None:
        M, record = rec.num_modes, rec.num_records - 1
        device_values = [rec.references[:, record]]
        summary = None
        if full:
            summary = mode_summary(rec)
            device_values += [summary["sizes"].float(), summary["r2_sum"], summary["totals"].float(),
                              summary["set_aside"].float().reshape(1)]
        elif rec.summary.compact:  # frozen modes: sizes are known without a pass over the weights
            device_values.append(self._frozen_sizes(rec).float())
        host = torch.cat([v.to(torch.float32) for v in device_values]).cpu().double().numpy()  # O(M)
        refs, rest = host[:M], host[M:]
        items = []
        if per_record:  # on_close comes after the last record's own log: don't write these twice
            items += [(_mode_tag("reference", m, M), refs[m]) for m in range(M)]
            items.append((f"{TAG}/memory/bytes", float(rec.nbytes()["total"])))
        if len(rest):
            sizes = rest[:M]
            n = max(sizes.sum(), 1.0)
            if self._last_sizes != record:  # the compact form wrote them already at this record
                items += [(_mode_tag("mode_size", m, M), sizes[m]) for m in range(M)]
                items += [(_mode_tag("mode_share", m, M), sizes[m] / n) for m in range(M)]
                self._last_sizes = record
        if summary is not None:
            r2_sum, (total_r2, total_s, total_explained, set_aside) = rest[M:2 * M], rest[2 * M:]
            items += [(_mode_tag("mode_r2", m, M), r2_sum[m] / max(sizes[m], 1.0)) for m in range(M)]
            items.append((f"{TAG}/fit/mean_r2", total_r2 / n))
            residual = math.sqrt(max(total_s - total_explained, 0.0) / total_s) if total_s > 0 else 0.0
            items.append((f"{TAG}/fit/relative_residual", residual))
            items.append((f"{TAG}/fit/references_set_aside", set_aside))
        self._scalars(items, step)
        if summary is not None:
            self.last_summary = record  # a figure that fails below is not retried at every record
            self._histograms(summary, step)
            # a matplotlib figure costs far more than a record: only the one-off figures at close use it
            self._figure(f"{TAG}/figures/mode_by_layer", mode_by_layer_figure,
                         summary["layer_counts"].cpu().numpy(), list(rec.layout.names), step, native=per_record)
            # the reference trajectories so far: the figure grows with the run
            self._figure(f"{TAG}/figures/references", _references_drawing(rec.window_start),
                         rec.references.cpu().numpy(), step, native=per_record)

    def _frozen_sizes(self, rec) -> torch.Tensor:
        modes = rec.summary.modes
        if self._frozen is None or self._frozen[0] is not modes:
            self._frozen = (modes, torch.bincount(modes.long(), minlength=rec.num_modes))
        return self._frozen[1]

    def _log_warmup_end(self, rec, step: int) -> None:
        """The warm-up figures and the configuration text (once per logger)."""
        self._text(f"{TAG}/config", config_markdown(rec, self.every), step)
        c = rec.clustering
        if c is not None:  # None after load_state_dict: the sample correlations are not kept
            self._figure(f"{TAG}/figures/correlation", correlation_figure, c.abs_corr, c.labels[c.varying], step)
            layer = rec.layout.locate(rec.sample_index)[0].numpy()
            counts = np.zeros((len(rec.layout.names), rec.num_modes))
            keep = c.labels >= 0
            np.add.at(counts, (layer[keep], c.labels[keep]), 1)
            self._figure(f"{TAG}/figures/mode_by_layer", mode_by_layer_figure, counts, list(rec.layout.names), step)
        F = rec.config["warmup"]
        self._figure(f"{TAG}/figures/references", _references_drawing(rec.window_start),
                     rec.references[:, :F].cpu().numpy(), step)

    # ------------------------------------------------------------------------- where it goes
    @abc.abstractmethod
    def _scalars(self, items: list[tuple[str, float]], step: int) -> None:
        """Scalars (tag, value) at ``step``: every logger takes them."""

    def _histograms(self, summary: dict, step: int) -> None:
        """Histograms of a and R² (a logger that takes none drops them)."""

    def _figure(self, tag: str, draw, *args, native: bool = False) -> None:
        """A figure: ``draw(*data, native=...)`` with ``args`` = data..., step (a logger that takes none drops it)."""

    def _text(self, tag: str, text: str, step: int) -> None:
        """The configuration as markdown text (a logger that takes none drops it)."""

    def _flush(self) -> None:
        """At ``close()``."""


class TensorBoardLogger(_StatisticsLog):
    """Logs a CMDRecorder's mode statistics to a TensorBoard ``SummaryWriter`` (an observer).

    Per record: the reference values and the recorder's memory. Every ``every`` records from the
    third record of the fit window on (with two, every affine fit is exact), and at ``close()``:
    mode sizes, shares and R², the fit's mean R² and relative residual, histograms of a and R², and
    the mode-by-layer map. At the end of the warm-up: the configuration, the clustered correlation,
    the references over the warm-up and the sampled mode-by-layer map. Only rank 0 writes.

    Args:
        writer (SummaryWriter): a ``torch.utils.tensorboard.SummaryWriter`` (or one with its methods).
        every (int): records between two logs of the mode statistics (default 10).
        step (callable): ``step(index)``, the TensorBoard step of record ``index``, e.g. the training
            loop's global step at that record (default None: the record index). It is called when the
            observer is told of the record: at the record, or with ``offload=True`` at a later call into
            the recorder; give it the step from the index, not the step the loop has reached by then.

    Attributes:
        last_summary (int or None): the record whose mode statistics were logged last.
    """

    def __init__(self, writer, every: int = 10, step=None):
        if writer is None or not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must be a SummaryWriter; got {type(writer).__name__}")
        super().__init__(every, step)
        self.writer = writer

    def _scalars(self, items: list[tuple[str, float]], step: int) -> None:
        _write_scalars(self.writer, items, step)

    def _histograms(self, summary: dict, step: int) -> None:
        _write_histograms(self.writer, summary, step)

    def _figure(self, tag: str, draw, *args, native: bool = False) -> None:
        _add_figure(self.writer, tag, draw, *args, native=native)

    def _text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def _flush(self) -> None:
        self.writer.flush()


class MetricsLogger(_StatisticsLog):
    """Hands a CMDRecorder's mode statistics to any ``log(metrics, step)`` callable (an observer).

    For plain training loops that log to Weights & Biases, MLflow or anything else that takes a dict of
    scalars and a step: ``MetricsLogger(wandb.log)``, ``MetricsLogger(mlflow.log_metrics)``, a
    Lightning logger's ``log_metrics``. The scalars, their names (``cmd/reference/mode_00``,
    ``cmd/fit/mean_r2``, …) and when they come are those of :class:`TensorBoardLogger`; histograms and
    the configuration text are not logged, figures only to ``image``. Only rank 0 logs.

    Args:
        log (callable): ``log(metrics, step)``: ``metrics`` a dict of tag → float, ``step`` an int.
        every (int): records between two logs of the mode statistics (default 10).
        step (callable): ``step(index)``, the step of record ``index`` (default None: the record index);
            as for :class:`TensorBoardLogger`.
        image (callable): ``image(tag, array, step)`` for the figures, ``array`` a uint8 H × W × 3 image
            drawn without matplotlib, e.g. ``lambda tag, a, step: wandb.log({tag: wandb.Image(a)}, step=step)``
            (default None: no figures).
    """

    def __init__(self, log, every: int = 10, step=None, image=None):
        if not callable(log):
            raise TypeError(f"log must be a callable log(metrics, step); got {type(log).__name__}")
        if image is not None and not callable(image):
            raise TypeError(f"image must be a callable image(tag, array, step) or None; got {type(image).__name__}")
        super().__init__(every, step)
        self.log_metrics, self.image = log, image

    def _scalars(self, items: list[tuple[str, float]], step: int) -> None:
        if items:
            self.log_metrics({tag: float(value) for tag, value in items}, int(step))

    def _figure(self, tag: str, draw, *args, native: bool = False) -> None:
        if self.image is not None:
            *data, step = args
            chw = draw(*data, native=True)
            self.image(tag, np.ascontiguousarray(chw.numpy().transpose(1, 2, 0)), int(step))


# --------------------------------------------------------------------------------- statistics
def mode_summary(rec) -> dict[str, torch.Tensor]:
    """Per-mode sizes, R² sums, layer counts and histogram inputs, from the recorder's fit, on its device.

    One pass over the fit blocks (``rec.fit_blocks()``): the extra memory is a few blocks plus the
    histogram counts, whatever N.

    Args:
        rec (CMDRecorder): a recorder in the tracking phase.

    Returns:
        dict with ``sizes`` (M,), ``r2_sum`` (M,), ``totals`` (Σ R², Σ S, Σ S·R², float64), ``set_aside``
        (the number of references set aside),
        ``layer_counts`` (layers × M), ``a_range`` and ``a_moments``/``r2_moments`` (min, max, sum,
        sum of squares) and ``a_counts``/``r2_counts`` (HIST_BINS each).
    """
    stats = rec.summary
    M, device, sumsq = rec.num_modes, rec.device, stats.sumsq
    low, high = _slope_range(rec, stats)
    layer_counts = torch.zeros(len(rec.layout.names), M, dtype=torch.int64, device=device)
    r2_sum = torch.zeros(M, dtype=torch.float64, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    moments = {k: torch.tensor([math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64, device=device)
               for k in ("a", "r2")}
    counts = {k: torch.zeros(HIST_BINS, dtype=torch.float32, device=device) for k in ("a", "r2")}
    ranges = {"a": (low, high), "r2": (0.0, 1.0)}
    for block in rec.fit_blocks():
        fit, S = block.fit, sumsq(block.flat)
        layer_counts[block.tensor] += torch.bincount(fit.modes, minlength=M)
        r2_sum.index_add_(0, fit.modes, fit.r2)
        totals += torch.stack([fit.r2.sum(), S.sum(), torch.dot(S, fit.r2)])
        for key, x in (("a", fit.a), ("r2", fit.r2)):
            acc = moments[key]
            acc[0], acc[1] = torch.minimum(acc[0], x.min()), torch.maximum(acc[1], x.max())
            acc[2:] += torch.stack([x.sum(), torch.dot(x, x)])
            counts[key] += torch.histc(x.float().clamp(*ranges[key]), HIST_BINS, *ranges[key])
    return {"sizes": layer_counts.sum(0), "r2_sum": r2_sum, "totals": totals, "layer_counts": layer_counts,
            "set_aside": (~stats.resolved_references).sum(),
            "a_range": (low, high), "a_moments": moments["a"], "r2_moments": moments["r2"],
            "a_counts": counts["a"], "r2_counts": counts["r2"]}


def _slope_range(rec, stats) -> tuple[float, float]:
    """Bins of the a-histogram: between the 0.5 % and 99.5 % quantiles of the slopes of a spread-out
    subsample of the weights (a few weights whose reference barely moves get huge slopes); ``stats`` is
    ``rec.summary``."""
    N = stats.numel
    index = torch.linspace(0, N - 1, min(N, QUANTILE_SAMPLES), device=rec.device).long()
    a = stats.fit(index).a
    low, high = torch.quantile(a, torch.tensor([0.005, 0.995], dtype=a.dtype, device=a.device)).tolist()
    return (low - 0.5, high + 0.5) if not high > low else (low, high)


def _write_scalars(writer, items: list[tuple[str, float]], step: int) -> None:
    """All scalars of one record as one event (one add_scalar per tag costs ~10× more)."""
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:  # a closed SummaryWriter, or another writer: the public, slower path
        for tag, value in items:
            writer.add_scalar(tag, float(value), step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in items])
    file_writer.add_summary(summary, step)


def _write_histograms(writer, summary: dict, step: int) -> None:
    """Histograms of a and R², binned on the device: only moments and bin counts reach the host."""
    n = float(summary["sizes"].sum())
    ranges = {"a": summary["a_range"], "r2": (0.0, 1.0)}
    for key in ("a", "r2"):
        low, high, total, squares = summary[f"{key}_moments"].tolist()
        writer.add_histogram_raw(f"{TAG}/hist/{key}", min=low, max=high, num=n, sum=total, sum_squares=squares,
                                 bucket_limits=np.linspace(*ranges[key], HIST_BINS + 1)[1:].tolist(),
                                 bucket_counts=summary[f"{key}_counts"].tolist(), global_step=step)


def config_markdown(rec, log_every: int) -> str:
    """The recorder's configuration as a markdown table (``log_every``: the logger's interval)."""
    cfg = rec.config
    form = "full" if cfg["freeze_modes_after"] is None else f"compact after {cfg['freeze_modes_after']} records"
    rows = [("modes M", rec.num_modes if rec.num_modes is not None else cfg["modes"]),
            ("requested", f"modes={cfg['modes']}" if cfg["threshold"] is None else f"threshold={cfg['threshold']}"),
            ("samples K", cfg["samples"]), ("warm-up F", cfg["warmup"]),
            ("record_every", cfg["record_every"] if cfg["record_every"] is not None else "manual (rec.record())"),
            ("form", form), ("parameters N", rec.layout.numel), ("tensors", len(rec.layout.names)),
            ("log_every", log_every), ("seed", cfg["seed"]), ("device", str(rec.device))]
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    layers = "\n".join(f"| {i} | {name} | {tuple(shape)} | {math.prod(shape)} |"
                       for i, (name, shape) in enumerate(zip(rec.layout.names, rec.layout.shapes)))
    return table + "\n\n**Rows of mode_by_layer** (parameter tensors in order)\n\n| row | name | shape | weights |\n" \
        "|---|---|---|---|\n" + layers


# --------------------------------------------------------------------------------- figures
def _pyplot_available() -> bool:
    if FIGURES != "auto":
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _references_drawing(window_start: int):
    return lambda references, native=False: references_figure(references, native, window_start)


def _add_figure(writer, tag: str, draw, *args, native: bool = False) -> None:
    *data, step = args
    if not native and _pyplot_available():
        writer.add_figure(tag, draw(*data, native=False), step, close=True)
    else:
        writer.add_image(tag, draw(*data, native=True), step, dataformats="CHW")
