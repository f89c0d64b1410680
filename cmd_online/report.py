"""The report of a CMD model: a folder with ``index.html`` and its PNG figures, and the summary behind it.

    cmd-online report TRAJECTORY -o DIR            # the command
    cmd_online.report.write_report(traj, "DIR")    # the same from Python

:func:`summary` describes a trajectory as plain data (what ``cmd-online inspect`` prints, and what
``cmd-online inspect --json`` writes); :func:`write_report` draws the figures of
:mod:`cmd_online.figures` into DIR and writes DIR/index.html, which shows them with that summary and
says how to read each. The page uses nothing outside DIR (no scripts, fonts or styles from the
network): copy the folder anywhere. The figures need matplotlib (``pip install 'cmd-online[plots]'``).
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .figures import FIGURES, INSTALL_HINT, available_figures, reference_label, require_matplotlib
from .files import atomic_write, atomic_write_text
from .progress import LOG, bar
from .trajectory import CMDTrajectory
from .units import human_bytes

CAPTIONS = {
    "references": "Each panel is one mode's reference weight r<sub>m</sub>(t) over the whole run (the paper's "
                  "Fig. 25). Every weight of that mode is modelled as a<sub>i</sub>·r<sub>m</sub>(t) + "
                  "b<sub>i</sub>, so these curves, with two numbers and a mode per weight, are the whole CMD "
                  "model. The grey band is the warm-up, where only the sampled weights are kept; the dashed "
                  "line marks where the fit window starts. A reference that goes flat has stopped moving: its "
                  "mode's weights are then constants.",
    "modes": "Left: how many weights each mode holds. Right: each parameter tensor's weights by mode. A mode "
             "that fills one layer describes that layer's motion; modes spread over all layers are shared "
             "dynamics. A mode with almost no weights (its reference alone) adds little: fewer modes would do.",
    "fit": "Left: each mode's mean R² over the fit window, the share of its weights' motion its reference "
           "explains (1: every weight an exact affine copy of the reference). Right: the slopes a<sub>i</sub> "
           "of all weights, stacked by mode; a few weights whose reference barely moves get very large slopes "
           "and land in the end bins.",
    "correlation": "|correlation| of the sampled weights over the clustered records, grouped by mode, white "
                   "lines at the mode boundaries (the paper's Fig. 2). This is what the clustering saw: bright "
                   "diagonal blocks are modes whose members move together; bright off-diagonal blocks are modes "
                   "that could merge (fewer modes would do). The modes here are those of the samples; the sizes "
                   "above count every weight after it was assigned to its best reference over the fit window.",
    "metrics": "The metrics added at each record with <code>CMDRecorder.add_metrics</code>, a panel per group "
               "(a name <code>group/label</code> joins its group's panel): e.g. the trained network's test "
               "accuracy next to the CMD model's (the paper's Figs. 5a and 7). During the warm-up there is no "
               "CMD model.",
}

MISSING = {
    "correlation": "This trajectory keeps no clustered samples (a file of an earlier cmd_online), so there is "
                   "no correlation matrix to draw.",
    "metrics": "No metrics were recorded with this trajectory. Add them while training, after each record: "
               "<code>rec.add_metrics({\"test accuracy/trained\": acc})</code>, and once <code>rec.ready</code>, "
               "<code>with rec.swapped(): rec.add_metrics({\"test accuracy/CMD\": evaluate(model)})</code>.",
}


def _load(trajectory) -> tuple[CMDTrajectory, str | None]:
    if isinstance(trajectory, CMDTrajectory):
        return trajectory, None
    if isinstance(trajectory, (str, os.PathLike)):
        return CMDTrajectory.load(trajectory), os.fspath(trajectory)
    raise TypeError(f"trajectory must be a CMDTrajectory or the path of a trajectory file; "
                    f"got {type(trajectory).__name__}")


def _number(value: float) -> float | None:
    """A float for JSON: None for NaN or an infinity (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def set_aside_note(aside: list[int], sizes: list[int]) -> str:
    """What the set-aside references mean: a mode of its reference alone has no weight assigned; one with more
    weights holds them because no reference moves (they are constants, a = 0)."""
    if not aside:
        return ""
    alone = [m for m in aside if sizes[m] <= 1]
    held = [m for m in aside if sizes[m] > 1]
    parts = []
    if alone:
        parts.append(f"mode{'s' if len(alone) > 1 else ''} {', '.join(map(str, alone))}: the reference moved only "
                     f"by rounding in the window; no weight is assigned to it")
    if held:
        parts.append(f"mode{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}: no reference moves above "
                     f"rounding in the window, so its weights stay there as constants (a = 0)")
    return "; ".join(parts)


def summary(trajectory, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything ``cmd-online inspect`` prints about a trajectory, as plain data (JSON-ready).

    Args:
        trajectory (CMDTrajectory, str or path): the trajectory, or its file.
        path (str or path): the file it was read from, for ``file_bytes`` (default: ``trajectory`` if a path).

    Returns:
        dict with ``trajectory`` (the path or None), ``weights`` N, ``tensors``, ``records`` T,
        ``window_start``, ``modes`` M, ``set_aside`` (mode numbers, or None when unknown) and
        ``set_aside_note``, ``file_bytes`` and ``history_bytes`` (N × T × 4) and ``compression`` (their
        ratio; None without a file), ``mean_r2`` (None when unknown), ``samples`` K and
        ``clustered_records`` (None without the clustered samples), ``metrics`` (name → number of
        records with a value and the last value), ``mode_table`` (per mode: ``mode``, ``weights``,
        ``share``, ``mean_r2``, ``set_aside``, ``reference`` as ``"tensor[i,j]"``, ``reference_tensor``,
        ``reference_position``, ``reference_flat_index``) and ``tensor_table`` (per tensor: ``name``,
        ``shape``, ``size``, ``weights_by_mode``).
    """
    traj, loaded_from = _load(trajectory)
    path = os.fspath(path) if path is not None else loaded_from
    layout = traj.layout
    N, T, M = traj.num_weights, traj.num_records, traj.num_modes
    sizes = traj.mode_sizes().tolist()
    file_bytes = Path(path).stat().st_size if path is not None else None
    history = N * T * 4
    aside = None if traj.set_aside is None else torch.nonzero(traj.set_aside).flatten().tolist()
    r2 = traj.mode_r2.tolist() if traj.mode_r2 is not None else None
    tensor, offset = layout.locate(traj.reference_index)
    modes_table = []
    for m in range(M):
        t, o = int(tensor[m]), int(offset[m])
        position = [int(i) for i in torch.unravel_index(torch.tensor(o), layout.shapes[t])] if layout.shapes[t] else []
        modes_table.append(dict(mode=m, weights=sizes[m], share=sizes[m] / N, mean_r2=None if r2 is None else r2[m],
                                set_aside=None if aside is None else m in aside, reference=reference_label(traj, m),
                                reference_tensor=layout.names[t], reference_position=position,
                                reference_flat_index=int(traj.reference_index[m])))
    modes = traj.modes.long()
    tensors_table = [dict(name=name, shape=list(shape), size=size,
                          weights_by_mode=torch.bincount(modes[start:start + size], minlength=M).tolist())
                     for name, shape, start, size in zip(layout.names, layout.shapes, layout.offsets, layout.sizes)]
    metrics = {}
    for name, values in (traj.metrics or {}).items():
        recorded = values[torch.isfinite(values)]
        metrics[name] = dict(records=int(recorded.numel()),
                             last=_number(recorded[-1]) if recorded.numel() else None)
    return dict(
        trajectory=path, weights=N, tensors=len(layout.names), records=T, window_start=traj.window_start, modes=M,
        set_aside=aside, set_aside_note=set_aside_note(aside or [], sizes), file_bytes=file_bytes,
        history_bytes=history, compression=None if not file_bytes else history / file_bytes,
        mean_r2=None if r2 is None else sum(n * r for n, r in zip(sizes, r2)) / N,
        samples=None if traj.sample_index is None else traj.sample_index.numel(),
        clustered_records=None if traj.sample_history is None else traj.sample_history.shape[1],
        metrics=metrics, mode_table=modes_table, tensor_table=tensors_table)


def to_json(data: dict[str, Any]) -> str:
    """:func:`summary`'s dict as strict JSON (no NaN)."""
    return json.dumps(data, indent=1, allow_nan=False)


# ----------------------------------------------------------------------------------------------- the page
def write_report(trajectory, out: str | os.PathLike, *, title: str | None = None,
                 progress: bool | None = None) -> Path:
    """Draw the report of a trajectory into the folder ``out``: ``index.html``, one PNG per figure of
    :func:`cmd_online.figures.trajectory_figures` (``references.png``, ``modes.png``, ``fit.png``, and
    ``correlation.png`` and ``metrics.png`` where the trajectory has what they show) and
    ``summary.json`` (:func:`summary`). Files of an earlier report in ``out`` are replaced.

    Args:
        trajectory (CMDTrajectory, str or path): the trajectory, or its file.
        out (str or path): the folder to write (created if missing).
        title (str): the page's title (default: from the file name).
        progress (bool): a progress bar over the figures: None (default) on a terminal only, True
            whenever tqdm is installed, False never.

    Returns the path of ``index.html``. Raises ImportError, saying how to install it, without matplotlib.
    """
    traj, path = _load(trajectory)  # a wrong file is said before a missing matplotlib
    require_matplotlib()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file; the report is a folder (index.html and its figures)")
    out.mkdir(parents=True, exist_ok=True)
    data = summary(traj, path)
    names = available_figures(traj)
    images = {}
    for name in bar(names, desc="drawing figures", unit="figure", enabled=progress):
        fig = FIGURES[name][0](traj)
        target = out / f"{name}.png"
        atomic_write(target, lambda f, fig=fig: fig.savefig(f, format="png"))
        images[name] = (target.name, *(int(v) for v in fig.get_size_inches() * fig.dpi))
    for name in FIGURES:  # a figure this trajectory cannot draw must not stay from an earlier report
        if name not in images and (out / f"{name}.png").exists():
            (out / f"{name}.png").unlink()
    atomic_write_text(out / "summary.json", to_json(data))
    if title is None:
        title = f"CMD report: {Path(path).name}" if path else "CMD report"
    index = out / "index.html"
    atomic_write_text(index, _page(data, images, title))
    LOG.info("report: wrote %s (%d figures)", index, len(images))
    return index


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } .nav { margin: 1em 0; } .nav a { color: #1f77b4; text-decoration: none; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
td, th { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f6f6f6; } td.l, th.l { text-align: left; }
.facts td:first-child { text-align: left; color: #555; } .facts td { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.93em; max-width: 60em; }
.note { background: #f8f8f0; border-left: 3px solid #cc9; padding: 0.5em 1em; max-width: 60em; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; vertical-align: middle; }
"""


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _page(data: dict[str, Any], images: dict[str, tuple], title: str) -> str:
    from . import __version__
    from .figures import _PALETTE

    esc = html.escape
    N, M = data["weights"], data["modes"]
    facts = [("weights N", f"{N:,} in {data['tensors']} tensors"),
             ("records T", f"{data['records']} (a, b fitted over records {data['window_start']}–{data['records'] - 1})"),
             ("modes M", f"{M}")]
    if data["set_aside"] is not None:
        note = f" ({data['set_aside_note']})" if data["set_aside_note"] else ""
        facts.append(("references set aside", f"{len(data['set_aside'])} of {M}{note}"))
    if data["mean_r2"] is not None:
        facts.append(("mean R²", f"{data['mean_r2']:.4f} over all weights (1 = every weight an exact affine copy "
                                 f"of its reference)"))
    if data["samples"] is not None:
        facts.append(("clustered samples K", f"{data['samples']:,} weights over {data['clustered_records']} records"))
    if data["file_bytes"]:
        facts.append(("file size", f"{human_bytes(data['file_bytes'])}; the full history N×T×4 bytes would be "
                                   f"{human_bytes(data['history_bytes'])} ({data['compression']:.1f}× larger)"))
    if data["metrics"]:
        last = ", ".join(f"{esc(k)} {_fmt(v['last'])}" for k, v in data["metrics"].items())
        facts.append(("metrics (last value)", last))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p class=\"sub\">{esc(data['trajectory'] or 'a CMDTrajectory')} · cmd_online {esc(__version__)} · "
             f"{datetime.date.today().isoformat()}</p>",
             "<table class=\"facts\">" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts)
             + "</table>"]
    sections = [("references", "Reference trajectories"), ("modes", "Modes and their make-up"),
                ("fit", "Fit quality"), ("correlation", "Clustered correlation of the samples"),
                ("metrics", "Metrics per record: trained vs CMD")]
    parts.append("<p class=\"nav\">" + " · ".join(f"<a href=\"#{name}\">{heading}</a>" for name, heading in sections)
                 + "</p>")
    for name, heading in sections:
        parts.append(f"<h2 id=\"{name}\">{heading}</h2>")
        if name in images:
            file, width, height = images[name]
            parts.append(f"<figure><img src=\"{file}\" width=\"{width}\" height=\"{height}\" "
                         f"alt=\"{esc(FIGURES[name][1])}\"><figcaption>{CAPTIONS[name]}</figcaption></figure>")
        else:
            parts.append(f"<p class=\"note\">{MISSING[name]}</p>")
        if name == "modes":
            parts.append(_mode_table(data, _PALETTE))
            parts.append(_tensor_table(data))
    parts.append("<p class=\"sub\">Made by <code>cmd-online report</code> "
                 "(<code>cmd_online.report.write_report</code>); the numbers are in <code>summary.json</code>.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _mode_table(data: dict[str, Any], palette) -> str:
    esc = html.escape
    rows = ["<table><tr><th>mode</th><th>weights</th><th>share</th><th>mean R²</th>"
            "<th class=\"l\">reference weight</th></tr>"]
    for row in data["mode_table"]:
        colour = "#%02x%02x%02x" % tuple(int(c) for c in palette[row["mode"] % 10])
        aside = " (set aside)" if row["set_aside"] else ""
        rows.append(f"<tr><td><span class=\"swatch\" style=\"background:{colour}\"></span> {row['mode']}</td>"
                    f"<td>{row['weights']:,}</td><td>{100 * row['share']:.1f}%</td><td>{_fmt(row['mean_r2'])}</td>"
                    f"<td class=\"l\"><code>{esc(row['reference'])}</code>{aside}</td></tr>")
    return "\n".join(rows) + "</table>"


def _tensor_table(data: dict[str, Any], shown: int = 10) -> str:
    esc = html.escape
    M = data["modes"]
    cols = min(M, shown)
    head = "".join(f"<th>m{m}</th>" for m in range(cols)) + ("<th>rest</th>" if M > cols else "")
    rows = [f"<table><tr><th class=\"l\">tensor</th><th>size</th>{head}</tr>"]
    for row in data["tensor_table"]:
        size, counts = row["size"], row["weights_by_mode"]
        cells = [counts[m] for m in range(cols)] + ([sum(counts[cols:])] if M > cols else [])
        text = "".join(f"<td>{100 * c / size:.1f}%</td>" if size else "<td>–</td>" for c in cells)
        rows.append(f"<tr><td class=\"l\"><code>{esc(row['name'])}</code></td><td>{size:,}</td>{text}</tr>")
    return ("<p>Weights of each tensor by mode (% of the tensor):</p>\n" + "\n".join(rows) + "</table>")


__all__ = ["CAPTIONS", "INSTALL_HINT", "summary", "to_json", "write_report"]
