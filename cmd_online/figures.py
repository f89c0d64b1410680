"""Figures of a CMD model, drawn from tensors or from a trajectory: the report's and TensorBoard's.

Two kinds:

- **Figures of arrays** (TensorBoard draws these): :func:`correlation_figure`, :func:`references_figure`
  and :func:`mode_by_layer_figure` return a matplotlib ``Figure``, or with ``native=True`` a uint8
  3 × H × W image drawn without matplotlib by :func:`heatmap_image` and :func:`lines_image`.
- **Figures of a** :class:`~cmd_online.CMDTrajectory` (the report, ``cmd-online report``):
  :func:`trajectory_figures` returns them by name — ``references`` (a panel per mode over the whole
  run), ``modes`` (mode sizes and each tensor's make-up), ``fit`` (R² per mode and the distribution of
  the slopes a), ``correlation`` (the clustered correlation matrix of the K samples, when the
  trajectory keeps them) and ``metrics`` (per-record metrics such as trained vs CMD accuracy, when it
  has any). Each is also a function of its own. They need matplotlib (the ``plots`` extra).

Figures are ``matplotlib.figure.Figure`` objects made without pyplot: no window opens and no global
state changes; save one with ``fig.savefig("name.png")``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DPI = 100
INSTALL_HINT = "pip install 'cmd-online[plots]' (or: pip install matplotlib)"
MAX_CORRELATION_SAMPLES = 1200  # samples drawn in the correlation figure (evenly spread beyond): ~a figure's pixels
MAX_PANELS = 48  # reference panels drawn (modes beyond are left out, and the figure says so)
MAX_TENSORS = 60  # tensors in the make-up panel (the largest, in layout order, beyond)

# tab10, so native images and matplotlib figures colour modes alike
_PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                     [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]],
                    dtype=np.uint8)
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def correlation_figure(abs_corr: np.ndarray, labels: np.ndarray, native: bool = False):
    """|corr| of the samples ordered by mode, with lines at the mode boundaries (paper, Fig. 2).

    Args:
        abs_corr (array): k × k |correlation| of the non-constant samples.
        labels (array): their modes (k,).
        native (bool): return a uint8 3×H×W image instead of a matplotlib Figure (default False).
    """
    order = np.argsort(labels, kind="stable")
    matrix = np.asarray(abs_corr)[np.ix_(order, order)]
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    if native:
        return heatmap_image(torch.from_numpy(matrix), rows=bounds, cols=bounds, size=256)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.4), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=0.8)
        ax.axvline(b - 0.5, color="white", lw=0.8)
    ax.set_title(f"|corr| of {len(labels)} sampled weights, {labels.max() + 1} modes", fontsize=10)
    ax.set_xlabel("sample, ordered by mode")
    fig.colorbar(im, ax=ax, label="|correlation|")
    fig.tight_layout()
    return fig


def references_figure(references: np.ndarray, native: bool = False, window_start: int | None = None):
    """Each reference weight over the records given, scaled to its own range, one row per mode (paper, Fig. 25).

    Args:
        references (array): M × T reference values.
        native (bool): return a uint8 3×H×W image instead of a matplotlib Figure (default False).
        window_start (int): the record where the fit window starts, marked with a dashed line (default None).
    """
    refs = np.asarray(references, dtype=np.float64)
    span = refs.max(1, keepdims=True) - refs.min(1, keepdims=True)
    scaled = (refs - refs.min(1, keepdims=True)) / np.where(span > 0, span, 1.0)
    if native:
        return lines_image(torch.from_numpy(scaled))
    from matplotlib.figure import Figure

    M, T = scaled.shape
    fig = Figure(figsize=(6, min(1.2 + 0.45 * M, 12)), dpi=DPI)
    ax = fig.add_subplot()
    for m in range(M):
        ax.plot(np.arange(T), M - 1 - m + 0.8 * scaled[m], color=_PALETTE[m % 10] / 255, lw=1.5)
    ax.set_yticks(np.arange(M) + 0.4, [f"mode {m}" for m in reversed(range(M))], fontsize=8)
    if window_start is not None and 0 < window_start < T:
        ax.axvline(window_start, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("record")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"reference weights over records 0–{T - 1} (each scaled to its range)", fontsize=10)
    fig.tight_layout()
    return fig


def mode_by_layer_figure(counts: np.ndarray, names: list[str], native: bool = False):
    """Where each mode's weights live: fraction of mode m's weights in each layer (paper, Fig. 4b).

    Args:
        counts (array): layers × M counts of weights.
        names (list of str): layer (parameter tensor) names.
        native (bool): return a uint8 3×H×W image instead of a matplotlib Figure (default False).
    """
    counts = np.asarray(counts, dtype=np.float64)
    fraction = counts / np.maximum(counts.sum(0, keepdims=True), 1.0)
    if native:
        return heatmap_image(torch.from_numpy(fraction), size=256)
    from matplotlib.figure import Figure

    L, M = fraction.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * M, 12), min(1.5 + 0.28 * L, 12)), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(fraction, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(M), [str(m) for m in range(M)], fontsize=7)
    if L <= 40:
        ax.set_yticks(range(L), names, fontsize=7)
    ax.set_xlabel(f"mode (sizes: {', '.join(str(int(s)) for s in counts.sum(0)[:6])}{', …' if M > 6 else ''})")
    ax.set_title("fraction of each mode's weights per layer", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def heatmap_image(values: torch.Tensor, rows=(), cols=(), size: int = 256) -> torch.Tensor:
    """A uint8 3×H×W viridis image of ``values`` in [0, 1] (h × w), without matplotlib.

    Each cell becomes an s × s block (s = max(1, size // max(h, w))); a matrix larger than ``size``
    is area-averaged down to it. White lines mark the boundaries before row indices ``rows`` and
    column indices ``cols``.
    """
    v = torch.as_tensor(values, dtype=torch.float64).clamp(0, 1)
    h, w = v.shape
    scale = size / max(h, w)
    if scale < 1:
        H, W = max(1, round(h * scale)), max(1, round(w * scale))
        v = torch.nn.functional.adaptive_avg_pool2d(v[None, None], (H, W))[0, 0]
    else:
        s = max(1, int(scale))
        v = v.repeat_interleave(s, 0).repeat_interleave(s, 1)
        H, W = h * s, w * s
    lut = _viridis_lut()
    img = lut[(v.numpy() * 255).round().astype(np.int64)]  # H × W × 3
    for b in rows:
        img[min(H - 1, int(b * H / h)), :] = 255
    for b in cols:
        img[:, min(W - 1, int(b * W / w))] = 255
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def lines_image(series: torch.Tensor, width: int = 320, strip: int = 32) -> torch.Tensor:
    """A uint8 3×(M·strip)×width image: series m (values in [0, 1]) drawn as a line in strip m."""
    s = torch.as_tensor(series, dtype=torch.float64).numpy()
    M, T = s.shape
    img = np.full((M * strip, width, 3), 255, dtype=np.uint8)
    x = np.linspace(0, T - 1, width)
    for m in range(M):
        y = m * strip + 2 + np.round((1 - np.interp(x, np.arange(T), s[m])) * (strip - 5)).astype(np.int64)
        colour = _PALETTE[m % 10]
        for col in range(width):  # a vertical run joins each column's point to the previous one
            y0, y1 = sorted((y[col], y[max(col - 1, 0)]))
            img[y0:y1 + 1, col] = colour
        img[(m + 1) * strip - 1, :] = 220  # a light rule between strips
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _viridis_lut() -> np.ndarray:
    t = np.linspace(0, 1, 256)
    anchors = np.linspace(0, 1, len(_VIRIDIS))
    return np.stack([np.interp(t, anchors, _VIRIDIS[:, c]) for c in range(3)], 1).round().astype(np.uint8)


# --------------------------------------------------------------------------------- figures of a trajectory
def require_matplotlib() -> None:
    """An ImportError that says how to install matplotlib, unless it is importable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"the figures are drawn with matplotlib, which is not installed: {INSTALL_HINT}") from None


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _colour(m: int) -> np.ndarray:
    return _PALETTE[m % 10] / 255


def _shade_warmup(ax, window_start: int) -> None:
    """The warm-up (records before the fit window, where only the samples are kept) in grey; the window's start dashed."""
    if window_start > 0:
        ax.axvspan(-0.5, window_start, color="0.92", zorder=0, lw=0)
        ax.axvline(window_start, color="0.55", lw=0.8, ls="--", zorder=1)


def reference_label(traj, m: int) -> str:
    """Where mode ``m``'s reference weight sits: ``"tensor[i,j]"`` in the trajectory's layout."""
    layout = traj.layout
    tensor, offset = layout.locate(traj.reference_index[m:m + 1])
    t, o = int(tensor[0]), int(offset[0])
    shape = layout.shapes[t]
    where = ",".join(str(int(i)) for i in torch.unravel_index(torch.tensor(o), shape)) if shape else ""
    return f"{layout.names[t]}[{where}]"


def reference_panels(traj):
    """The reference weight of every mode over the whole run, one panel each, titled with the mode's size,
    share, mean R² and where its reference sits (paper, Fig. 25). The warm-up is shaded."""
    M, T, N = traj.num_modes, traj.num_records, traj.num_weights
    shown = min(M, MAX_PANELS)
    cols = 1 if shown <= 6 else 2 if shown <= 16 else 3
    rows = math.ceil(shown / cols)
    fig = _figure(7.5 if cols == 1 else 5.2 * cols, 0.9 + 1.45 * rows)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    sizes = traj.mode_sizes().tolist()
    r2 = traj.mode_r2.tolist() if traj.mode_r2 is not None else None
    aside = traj.set_aside.tolist() if traj.set_aside is not None else [False] * M
    refs = traj.references.double().cpu().numpy()
    x = np.arange(T)
    for m in range(rows * cols):
        ax = axes[m // cols, m % cols]
        if m >= shown:
            ax.set_visible(False)
            continue
        _shade_warmup(ax, traj.window_start)
        ax.plot(x, refs[m], color=_colour(m), lw=1.4, marker="." if T <= 80 else None, ms=3)
        fit = "" if r2 is None else f", mean R² {r2[m]:.2f}"
        note = " (set aside)" if aside[m] else ""
        ax.set_title(f"mode {m}: {sizes[m]:,} weights ({100 * sizes[m] / N:.1f} %){fit}{note}\n"
                     f"reference {reference_label(traj, m)}", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    more = f"; modes {shown}–{M - 1} not drawn" if M > shown else ""
    warm = "\ngrey: the warm-up; dashed: the fit window starts" if traj.window_start > 0 else ""
    fig.suptitle(f"Reference weights r_m(t) over records 0–{T - 1}: every weight of mode m moves as "
                 f"a·r_m(t) + b{more}{warm}", fontsize=10)
    fig.supxlabel("record", fontsize=9)
    fig.tight_layout()
    return fig


def modes_figure(traj):
    """Left: the number of weights in each mode. Right: each tensor's weights by mode (a stacked bar per
    tensor, in layout order), the per-layer make-up ``cmd-online inspect`` prints as a table."""
    layout, M, N = traj.layout, traj.num_modes, traj.num_weights
    sizes = traj.mode_sizes().cpu().numpy()
    modes = traj.modes.long().cpu()
    tensors = [i for i, size in enumerate(layout.sizes) if size > 0]
    if len(tensors) > MAX_TENSORS:
        largest = sorted(sorted(tensors, key=lambda i: -layout.sizes[i])[:MAX_TENSORS])
        tensors, left_out = largest, len(tensors) - MAX_TENSORS
    else:
        left_out = 0
    counts = np.stack([torch.bincount(modes[layout.offsets[i]:layout.offsets[i] + layout.sizes[i]],
                                      minlength=M).numpy() for i in tensors]) if tensors else np.zeros((0, M))
    L = len(tensors)
    fig = _figure(12, min(max(3.8, 1.3 + 0.24 * L), 16))
    grid = fig.add_gridspec(1, 2, width_ratios=(1, 1.6))
    ax = fig.add_subplot(grid[0, 0])
    ax.bar(np.arange(M), sizes, color=[_colour(m) for m in range(M)])
    for m in range(M) if M <= 20 else ():
        ax.text(m, sizes[m], f"{100 * sizes[m] / N:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("mode")
    ax.set_ylabel("weights")
    ax.set_xticks(np.arange(M) if M <= 20 else np.arange(0, M, max(1, M // 10)))
    ax.set_title(f"mode sizes ({N:,} weights, {M} modes)", fontsize=10)
    ax = fig.add_subplot(grid[0, 1])
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    left = np.zeros(L)
    y = np.arange(L)
    for m in range(M):
        ax.barh(y, share[:, m], left=left, color=_colour(m), height=0.8)
        left += share[:, m]
    ax.set_yticks(y, [f"{layout.names[i]} ({layout.sizes[i]:,})" for i in tensors], fontsize=8 if L <= 15 else 7 if L <= 30 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the tensor's weights")
    ax.set_title("each tensor's weights by mode, modes in order from the left, coloured as on the left"
                 + (f"\n(the {L} largest of {L + left_out} tensors)" if left_out else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _slope_bins(a: np.ndarray, bins: int = 80) -> np.ndarray:
    """Bin edges between the 0.5 % and 99.5 % quantiles of the slopes (of an evenly spread subsample when
    N is large): a few weights whose reference barely moves get huge slopes."""
    sample = a if a.size <= 1_000_000 else a[np.linspace(0, a.size - 1, 1_000_000).astype(np.int64)]
    low, high = np.quantile(sample, [0.005, 0.995])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def fit_figure(traj):
    """Left: each mode's mean R² over the fit window (how much of its members' motion the reference
    explains; the weighted mean dashed). Right: the distribution of the slopes a_i, stacked by mode."""
    M = traj.num_modes
    sizes = traj.mode_sizes().cpu().numpy()
    fig = _figure(12, 4.2)
    ax_r2, ax_a = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 1.6)))
    if traj.mode_r2 is not None:
        r2 = traj.mode_r2.double().cpu().numpy()
        ax_r2.bar(np.arange(M), r2, color=[_colour(m) for m in range(M)])
        mean = float((r2 * sizes).sum() / max(sizes.sum(), 1))
        ax_r2.axhline(mean, color="0.3", lw=1, ls="--")
        ax_r2.text(M - 0.5, mean, f"mean {mean:.3f}", ha="right", va="bottom", fontsize=8)
        ax_r2.set_ylim(0, 1.05)
        ax_r2.set_title("mean R² of each mode's weights over the fit window", fontsize=10)
    else:
        ax_r2.text(0.5, 0.5, "no R² in this file\n(written by an older cmd_online)", ha="center", va="center",
                   transform=ax_r2.transAxes)
        ax_r2.set_title("mean R² per mode", fontsize=10)
    ax_r2.set_xlabel("mode")
    ax_r2.set_ylabel("R² (1 = an exact affine copy of its reference)")
    ax_r2.set_xticks(np.arange(M) if M <= 20 else np.arange(0, M, max(1, M // 10)))
    a = traj.a.double().cpu().numpy()
    modes = traj.modes.cpu().numpy()
    edges = _slope_bins(a)
    clipped = np.clip(a, edges[0], edges[-1])
    if M <= 10:
        per_mode = [clipped[modes == m] for m in range(M)]
        ax_a.hist(per_mode, bins=edges, stacked=True, color=[_colour(m) for m in range(M)],
                  label=[f"mode {m}" for m in range(M)])
        ax_a.legend(fontsize=7, ncol=2)
    else:
        ax_a.hist(clipped, bins=edges, color=_colour(0))
    ax_a.set_yscale("log")
    outside = int(((a < edges[0]) | (a > edges[-1])).sum())
    ax_a.set_title(f"slopes a_i of all {a.size:,} weights ({outside:,} beyond the 0.5–99.5 % range, in the end bins)",
                   fontsize=10)
    ax_a.set_xlabel("a (weight = a · reference + b)")
    ax_a.set_ylabel("weights")
    fig.tight_layout()
    return fig


def sample_correlation_figure(traj):
    """|corr| of the K clustered samples over the clustered records, grouped by mode (inside a mode in the
    order of the linkage tree's leaves), white lines at the mode boundaries (paper, Fig. 2). Samples that
    did not move are left out; beyond :data:`MAX_CORRELATION_SAMPLES` an evenly spread subset is drawn."""
    if traj.sample_history is None:
        raise ValueError("this trajectory keeps no clustered samples (a file of an earlier cmd_online): "
                         "there is no correlation matrix to draw")
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    history = traj.sample_history.double().cpu().numpy()
    labels = traj.sample_modes.cpu().numpy()
    keep = np.flatnonzero((labels >= 0) & (history.max(1) > history.min(1)))
    total = len(keep)
    if total > MAX_CORRELATION_SAMPLES:
        keep = keep[np.unique(np.linspace(0, total - 1, MAX_CORRELATION_SAMPLES).round().astype(np.int64))]
    fig = _figure(6.6, 5.6)
    ax = fig.add_subplot()
    if len(keep) < 2:
        ax.text(0.5, 0.5, f"{len(keep)} moving sample(s): no correlation to draw", ha="center", va="center",
                transform=ax.transAxes)
        return fig
    h, labels = history[keep], labels[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.clip(np.abs(np.corrcoef(h)), 0.0, 1.0), nan=0.0)
    distance = 1.0 - corr
    np.fill_diagonal(distance, 0.0)
    leaves = leaves_list(linkage(squareform(distance, checks=False), method="complete"))
    order = leaves[np.argsort(labels[leaves], kind="stable")]
    matrix = corr[np.ix_(order, order)]
    ordered = labels[order]
    bounds = np.flatnonzero(np.diff(ordered)) + 1
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, interpolation="antialiased")
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=1)
        ax.axvline(b - 0.5, color="white", lw=1)
    edges = np.concatenate([[0], bounds, [len(ordered)]])
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5
    wide = np.diff(edges) >= max(1, len(ordered) // 60)  # label the modes wide enough to read
    ax.set_xticks(centres[wide], [str(m) for m in ordered[edges[:-1]][wide]], fontsize=7)
    ax.set_yticks(centres[wide], [str(m) for m in ordered[edges[:-1]][wide]], fontsize=7)
    ax.set_xlabel("sampled weights, grouped by mode")
    ax.set_ylabel("mode")
    drawn = f"{len(keep)} of {total}" if total > len(keep) else f"{total}"
    ax.set_title(f"|corr| of {drawn} moving sampled weights over the {history.shape[1]} clustered records,\n"
                 f"{traj.num_modes} modes (white lines: mode boundaries)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|corr|")
    fig.tight_layout()
    return fig


def metric_groups(names) -> dict[str, list[str]]:
    """Metric names by panel: ``"group/label"`` goes to panel ``group``; a name without ``/`` is its own panel."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split("/", 1)[0] if "/" in name else name, []).append(name)
    return groups


def _zoom_to_window(ax, series: list[np.ndarray], window_start: int) -> None:
    """Zoom the y-axis to the values from the fit window on, when the warm-up's values (e.g. the first epochs'
    low accuracy) would squeeze them into a sliver of the panel."""
    if window_start <= 0:
        return
    every = np.concatenate([y[np.isfinite(y)] for y in series])
    window = np.concatenate([y[window_start:][np.isfinite(y[window_start:])] for y in series])
    if window.size < 2 or every.size == 0:
        return
    low, high = window.min(), window.max()
    span = high - low
    if span <= 0 or (every.max() - every.min()) < 3 * span:
        return
    ax.set_ylim(low - 0.15 * span, high + 0.15 * span)
    ax.text(0.01, 0.02, "y-axis zoomed to the fit window", transform=ax.transAxes, fontsize=7, color="0.4")


def metrics_figure(traj):
    """Per-record metrics (``CMDRecorder.add_metrics``), a panel per group: e.g. the trained network's and the
    CMD model's test accuracy at each record (paper, Figs. 5a and 7). The warm-up is shaded."""
    if not traj.metrics:
        raise ValueError("this trajectory has no metrics: add them while training with CMDRecorder.add_metrics")
    groups = metric_groups(traj.metrics)
    fig = _figure(8, 0.8 + 2.8 * len(groups))
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(traj.num_records)
    styles = ["-", "--", ":", "-."]
    for ax, (group, names) in zip(axes, groups.items()):
        _shade_warmup(ax, traj.window_start)
        for j, name in enumerate(names):
            y = traj.metrics[name].double().cpu().numpy()
            ok = np.isfinite(y)
            label = name.split("/", 1)[1] if "/" in name else name
            ax.plot(x[ok], y[ok], color="0.15" if j == 0 else _colour(j - 1), ls=styles[j % 4] if j else "-",
                    lw=1.5, marker="." if ok.sum() <= 80 else None, ms=4, label=label)
        _zoom_to_window(ax, [traj.metrics[name].double().cpu().numpy() for name in names], traj.window_start)
        ax.set_ylabel(group, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("record")
    warm = " (grey: the warm-up, no CMD weights yet)" if traj.window_start > 0 else ""
    fig.suptitle(f"Metrics recorded per record{warm}", fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = {  # name → (function, what it shows): the report's figures, in its order
    "references": (reference_panels, "reference trajectories over the whole run, a panel per mode"),
    "modes": (modes_figure, "mode sizes and each tensor's make-up by mode"),
    "fit": (fit_figure, "fit quality: mean R² per mode and the distribution of the slopes a"),
    "correlation": (sample_correlation_figure, "the clustered correlation matrix of the K sampled weights"),
    "metrics": (metrics_figure, "metrics recorded per record, e.g. trained vs CMD accuracy"),
}


def available_figures(traj) -> list[str]:
    """The names of :data:`FIGURES` this trajectory can draw: ``correlation`` needs its clustered samples,
    ``metrics`` its metrics."""
    return [name for name in FIGURES if (name != "correlation" or traj.sample_history is not None)
            and (name != "metrics" or bool(traj.metrics))]


def trajectory_figures(traj, names=None) -> dict:
    """The report's figures of ``traj`` (a :class:`~cmd_online.CMDTrajectory`) as matplotlib Figures, by name.

    Args:
        traj (CMDTrajectory): the CMD model.
        names (list of str): which of :data:`FIGURES` to draw (default: every one this trajectory can draw,
            :func:`available_figures`).

    Raises ImportError (saying how to install it) without matplotlib.
    """
    require_matplotlib()
    names = available_figures(traj) if names is None else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; the figures are {list(FIGURES)}")
    return {name: FIGURES[name][0](traj) for name in names}
