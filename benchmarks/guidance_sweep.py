"""The numbers behind docs/guidance.md: how warm-up, record frequency, modes and samples change what CMD gives.

One training per (task, seed) — the CNNs, data, split and SGD + momentum of ``accuracy.py``, 40 epochs —
carries every recorder at once, so all settings see the same trajectory:

- **per epoch**: a record at initialisation and after every epoch (T = 41), warm-up F ∈ {3, 5, 10, 20}
  at M = 10, K = 1000; M ∈ {2, 5, 20} at F = 10; K ∈ {100, 300} at F = 10; ``freeze_modes_after=5``;
- **per step**: ``record_every=k`` (the recorder's own step hook) for k ∈ {1, 6, one epoch's steps}, with
  warm-ups that end at different points of training (F · k steps).

Every setting is the recorder's default (modes fixed 3 records into the window) but where it says
otherwise; the rows marked "full form" (``freeze_modes_after=None``) repeat one setting of each kind with
the modes free, for comparison.

For each setting: the CMD model's test accuracy at the end of training (BatchNorm statistics recomputed,
as in ``accuracy.py``) and its difference to the trained network's; the reconstruction error
‖W − Ŵ‖_F / ‖W − W₀‖_F over the recorder's fit window (W₀: the initial weights); when the CMD model
first exists (the record that ends the warm-up, as a share of the training steps); the median time of
one record and the modes found. The trained network and an EMA (decay 0.99 or 0.999, chosen on the
validation split, updated every step) are the reference rows.

    python benchmarks/guidance_sweep.py                 # 3 seeds, digits and MNIST-1D
    python benchmarks/guidance_sweep.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from cmd_online import CMDRecorder, demo  # noqa: E402

OPTIMIZER = "SGD+momentum"
FULL = "full form (freeze_modes_after=None)"


def settings(steps_per_epoch: int, quick: bool) -> list[dict]:
    """Every recorder of one run: a label, how it records, its CMDRecorder arguments."""
    epoch = dict(kind="per epoch")
    out = [dict(epoch, label="F=10, M=10, K=1000 (defaults of accuracy.py)", warmup=10, modes=10, samples=1000)]
    out += [dict(epoch, label=f"F={f}", warmup=f, modes=10, samples=1000) for f in (3, 5, 20)]
    out += [dict(epoch, label=f"M={m}", warmup=10, modes=m, samples=1000) for m in (2, 5, 20)]
    out += [dict(epoch, label=f"K={k}", warmup=10, modes=10, samples=k) for k in (100, 300)]
    out += [dict(epoch, label="freeze_modes_after=5", warmup=10, modes=10, samples=1000, freeze_modes_after=5)]
    out += [dict(epoch, label=f"F=10, {FULL}", warmup=10, modes=10, samples=1000, freeze_modes_after=None)]
    step = dict(kind="per step", modes=10, samples=1000)
    for k, warmups, middle in ((1, (10, 50, 200), 50), (6, (5, 10, 30), 10), (steps_per_epoch, (10,), 10)):
        out += [dict(step, label=f"record_every={k}, F={f}", record_every=k, warmup=f) for f in warmups]
        out += [dict(step, label=f"record_every={k}, F={middle}, {FULL}", record_every=k, warmup=middle,
                     freeze_modes_after=None)]
    if quick:
        out = [s for s in out if s["label"] in ("F=3", "M=2", "record_every=1, F=10")]
        for s in out:
            s.update(samples=min(s["samples"], 200), modes=min(s["modes"], 3), warmup=min(s["warmup"], 3))
    return out


def one_run(task, seed: int, epochs: int, quick: bool) -> list[dict]:
    torch.manual_seed(seed)
    model = common.make_model(task.name)
    steps_per_epoch = -(-len(task.y_train) // 64)
    total_steps = epochs * steps_per_epoch
    opt, _ = common.make_optimizer(OPTIMIZER, model, total_steps)
    configs = settings(steps_per_epoch, quick)
    recorders, seconds = [], []
    for c in configs:
        kwargs = {k: v for k, v in c.items() if k not in ("kind", "label")}
        rec = CMDRecorder(opt, model, seed=seed, **kwargs)
        times: list[float] = []

        def timed(record=rec.record, times=times):
            start = time.perf_counter()
            try:
                return record()
            finally:
                times.append(time.perf_counter() - start)

        rec.record = timed  # the step hook calls self.record(): per-step records are timed too
        recorders.append(rec)
        seconds.append(times)
    emas = {d: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True) for d in (0.99, 0.999)}
    snapshots = [common.flat_params(model)]  # index s: the weights after step s (0: initial)
    epoch_ends = [0]
    for rec, c in zip(recorders, configs):
        if c["kind"] == "per epoch":
            rec.record()

    def after_step():
        snapshots.append(common.flat_params(model))
        for ema in emas.values():
            ema.update_parameters(model)

    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        demo.train_epoch(model, opt, task.x_train, task.y_train, g, 64,
                         augment=common.augment if task.augment else None, after_step=after_step)
        epoch_ends.append(len(snapshots) - 1)
        for rec, c in zip(recorders, configs):
            if c["kind"] == "per epoch":
                rec.record()
    wall = time.perf_counter() - start
    W = torch.stack(snapshots, 1)
    w0 = W[:, 0]
    recording = sum(sum(t) for t in seconds)
    step_ms = 1000 * (wall - recording) / total_steps  # a training step without the recorders
    test = lambda m: common.accuracy(m, task.x_test, task.y_test)  # noqa: E731
    trained = test(model)
    val = {d: common.accuracy(m.module, task.x_val, task.y_val) for d, m in emas.items()}
    best = max(val, key=val.get)
    rows = [dict(task=task.name, seed=seed, kind="reference", label="trained network", test_acc=trained,
                 step_ms=step_ms),
            dict(task=task.name, seed=seed, kind="reference", label=f"EMA (decay chosen on val: {best})",
                 test_acc=test(emas[best].module), delta=test(emas[best].module) - trained, ema_decay=best)]
    for rec, c, times in zip(recorders, configs, seconds):
        row = dict(task=task.name, seed=seed, kind=c["kind"], label=c["label"], record_ms=1000 * statistics.median(times),
                   records=rec.num_records)
        if c["kind"] == "per epoch":
            columns = epoch_ends
        else:
            k = c["record_every"]
            columns = list(range(k, total_steps + 1, k))
        assert len(columns) == rec.num_records, (c["label"], len(columns), rec.num_records)
        if rec.ready:
            first = columns[rec.window_start]
            row["cmd_from"] = first / total_steps  # share of the training steps before a CMD model exists
            traj = rec.trajectory()
            window = columns[rec.window_start:]
            W_hat = torch.stack([traj.reconstruct(t) for t in range(rec.window_start, rec.num_records)], 1)
            row["err_window"] = common.rel_error(W[:, window], W_hat, w0)
            row["test_acc"] = common.evaluate_weights(model, rec.cmd_state_dict(-1), task)
            row["delta"] = row["test_acc"] - trained
            row["modes_found"] = rec.num_modes
        else:
            row["cmd_from"] = None  # the warm-up never ended: no CMD model
        rows.append(row)
    return rows


def _cell(values, fmt: str) -> str:
    """Mean ± standard deviation over the seeds (the spread unsigned), or — when there is no value."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, std = common.mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}" if len(values) > 1 else f"{mean:{fmt}}"


def _span(values) -> str:
    """The values' range over the seeds, e.g. the modes found: ``10`` or ``1–2``."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def table(rows) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for label in dict.fromkeys(r["label"] for r in rows if r["task"] == task and r["kind"] != "reference"
                                   or r["task"] == task and r["label"] == "trained network"):
            sel = [r for r in rows if r["task"] == task and r["label"] == label]
            out.append(dict(task=task, kind=sel[0]["kind"], label=label, seeds=len(sel),
                            **{key: [r.get(key) for r in sel] for key in
                               ("test_acc", "delta", "err_window", "cmd_from", "record_ms", "modes_found", "records",
                                "step_ms")}))
        ema = [r for r in rows if r["task"] == task and r["label"].startswith("EMA")]
        out.append(dict(task=task, kind="reference", label="EMA (decay 0.99 or 0.999, chosen on val)",
                        seeds=len(ema), test_acc=[r["test_acc"] for r in ema], delta=[r["delta"] for r in ema]))
    return out


def markdown(lines) -> str:
    head = ("| task | recording | setting | test acc % | Δ vs trained | ‖W−Ŵ‖/‖W−W₀‖ (window) | CMD model from "
            "(% of steps) | record ms | modes |")
    out = [head, "|" + "---|" * 9]
    for ln in lines:
        cmd_from = [None if v is None else 100 * v for v in ln.get("cmd_from", [])]
        never = sum(v is None for v in ln.get("cmd_from", [])) if ln["kind"] != "reference" else 0
        start = _span([round(v, 1) for v in cmd_from if v is not None]) + (f" (never in {never} run(s))" if never else "")
        out.append(f"| {ln['task']} | {ln['kind']} | {ln['label']} | {_cell(ln['test_acc'], '.2f')} | "
                   f"{_cell(ln.get('delta', []), '+.2f')} | {_cell(ln.get('err_window', []), '.3f')} | "
                   f"{start if ln['kind'] != 'reference' else ''} | {_cell(ln.get('record_ms', []), '.2f')} | "
                   f"{_span(ln.get('modes_found', []))} |")
    return "\n".join(out)


def _print(lines) -> None:
    print(markdown(lines))
    for ln in lines:
        if ln["label"] == "trained network":
            print(f"{ln['task']}: a training step takes {_cell(ln['step_ms'], '.2f')} ms (the run's time without "
                  f"its records, per step)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, small data, 3 settings")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--tasks", default="digits,mnist1d")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--render", default=None, metavar="FILE", help="print the tables of a saved run and exit")
    a = p.parse_args(argv)
    if a.render:
        import json

        with open(a.render) as f:
            saved = json.load(f)
        _print(saved["table"])
        return saved["table"]
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.epochs = 1, 2
    started = time.perf_counter()
    rows = []
    for name in a.tasks.split(","):
        task = common.load_task(name, quick=a.quick)
        for seed in range(a.seeds):
            t = time.perf_counter()
            rows += one_run(task, seed, a.epochs, a.quick)
            print(f"{name} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
    lines = table(rows)
    _print(lines)
    minutes = (time.perf_counter() - started) / 60
    print(f"total {minutes:.1f} min")
    common.write_json("guidance_sweep_quick.json" if a.quick else "guidance_sweep.json",
                      dict(settings=dict(epochs=a.epochs, seeds=a.seeds, optimizer=OPTIMIZER, batch_size=64),
                           env=common.environment(), minutes=minutes, runs=rows, table=lines), a.out)
    return lines


if __name__ == "__main__":
    main()
