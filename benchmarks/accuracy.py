"""Accuracy table in the shape of the CMD paper's Table 2: trained / EMA / SWA / online CMD / post-hoc CMD.

Online CMD twice, from the same records: the recorder's default (modes fixed after ``freeze_modes_after``
window records, the compact form) and the full form (``freeze_modes_after=None``, modes chosen over the
whole window at the query).

One training run per (task, optimizer, seed) gives all five columns, so every method sees the same data,
split, augmentation and budget. Choices are made on the validation split, never on test:
EMA decay ∈ {0.9, 0.99, 0.999} (updated every step, ``get_ema_multi_avg_fn``, buffers averaged) and
SWA start ∈ {50 %, 75 %} of the epochs (equal average once per epoch, then ``update_bn``); the learning
rate schedule is not changed for SWA, so the trained column is the same network for all. CMD uses the
paper's M = 10, K = 1000, no tuning; online CMD warms up on the first F records. Every column is the
weights at the end of training; CMD weights get ``update_bn`` like SWA.

    python benchmarks/accuracy.py            # full table (5 seeds, both tasks)
    python benchmarks/accuracy.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cmd_online as cmdo  # noqa: E402

COLUMNS = ["trained", "EMA", "SWA", "online CMD", "online CMD, full form", "post-hoc CMD"]
PAPER = {  # ResNet18 / CIFAR-10, the paper's Table 2 (test accuracy %)
    "SGD": [90.68, 92.02, 92.09, 92.26, None],
    "Adam": [89.59, 91.43, 91.65, 91.70, None],
}


def one_run(task, optimizer: str, seed: int, epochs: int, modes: int, samples: int, warmup: int,
            ema_decays, swa_fractions, freeze: dict | None = None) -> dict:
    emas, swas = {}, {}

    def on_step(model):
        if not emas:
            for d in ema_decays:
                emas[d] = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
        for m in emas.values():
            m.update_parameters(model)

    starts = {f: max(0, int(round(f * epochs)) - 1) for f in swa_fractions}

    def on_epoch(model, epoch):
        for f, s in starts.items():
            if epoch >= s:
                if f not in swas:
                    swas[f] = AveragedModel(model)
                else:
                    swas[f].update_parameters(model)

    settings = dict(modes=modes, samples=samples, warmup=warmup, seed=seed)
    run = common.train(task, optimizer, seed, epochs, recorders=[dict(settings, **(freeze or {})),
                                                                  dict(settings, freeze_modes_after=None)],
                       on_step=on_step, on_epoch=on_epoch)
    model, (rec, full) = run.model, run.recorders
    out = {"task": task.name, "optimizer": optimizer, "seed": seed, "train_seconds": run.seconds}
    test = lambda m: common.accuracy(m, task.x_test, task.y_test)  # noqa: E731
    val = lambda m: common.accuracy(m, task.x_val, task.y_val)  # noqa: E731
    out["trained"] = test(model)

    ema_val = {d: val(m.module) for d, m in emas.items()}
    best_d = max(ema_val, key=ema_val.get)
    out["EMA"], out["ema_decay"] = test(emas[best_d].module), best_d

    loader = common.bn_loader(task)
    swa_val = {}
    for f, m in swas.items():
        update_bn(loader, m)
        swa_val[f] = val(m.module)
    best_f = max(swa_val, key=swa_val.get)
    out["SWA"], out["swa_start"] = test(swas[best_f].module), best_f

    start = time.perf_counter()
    out["online CMD"] = common.evaluate_weights(model, rec.cmd_state_dict(-1), task)
    out["online CMD, full form"] = common.evaluate_weights(model, full.cmd_state_dict(-1), task)
    traj = cmdo.decompose(run.snapshots, modes=modes, samples=samples, seed=seed, layout=rec.layout)
    post = common.weights_state(model, traj.reconstruct(-1))
    out["post-hoc CMD"] = common.evaluate_weights(model, post, task)
    out["cmd_seconds"] = time.perf_counter() - start
    out["num_modes"] = rec.num_modes
    out["num_weights"] = rec.layout.numel
    out["records"] = run.snapshots.shape[1]
    out["val"] = {"EMA": ema_val, "SWA": swa_val}
    return out


def table(rows, tasks, optimizers) -> list[dict]:
    out = []
    for t in tasks:
        for o in optimizers:
            sel = [r for r in rows if r["task"] == t and r["optimizer"] == o]
            line = {"task": t, "optimizer": o, "seeds": len(sel)}
            for c in COLUMNS:
                line[c] = common.mean_std([r[c] for r in sel])
            line["ema_decay"] = sorted({r["ema_decay"] for r in sel})
            line["swa_start"] = sorted({r["swa_start"] for r in sel})
            out.append(line)
    return out


def paired(rows) -> str:
    """The default against the full form, seed by seed (both from the same records): the mean and std of
    the differences in points, each seed's difference, and how many seeds favour each."""
    out = ["| task | optimizer | online CMD − full form, mean ± std (points) | per seed | default better / worse |",
           "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["task"], r["optimizer"]) for r in rows)
    for task, optimizer in keys:
        diffs = [r["online CMD"] - r["online CMD, full form"] for r in rows
                 if (r["task"], r["optimizer"]) == (task, optimizer)]
        mean, std = common.mean_std(diffs)
        out.append(f"| {task} | {optimizer} | {mean:+.2f} ± {std:.2f} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                   f"{sum(d > 0 for d in diffs)} / {sum(d < 0 for d in diffs)} |")
    every = [r["online CMD"] - r["online CMD, full form"] for r in rows]
    mean, std = common.mean_std(every)
    out.append(f"| all | all | {mean:+.2f} ± {std:.2f} ({len(every)} runs) | | "
               f"{sum(d > 0 for d in every)} / {sum(d < 0 for d in every)} |")
    return "\n".join(out)


def markdown(lines) -> str:
    head = "| task | optimizer | " + " | ".join(COLUMNS) + " | EMA decay (val) | SWA start (val) |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for ln in lines:
        cells = [f"{ln[c][0]:.2f} ± {ln[c][1]:.2f}" for c in COLUMNS]
        rows.append(f"| {ln['task']} | {ln['optimizer']} | " + " | ".join(cells)
                    + f" | {', '.join(map(str, ln['ema_decay']))} | {', '.join(map(str, ln['swa_start']))} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 epochs, one optimizer, small data")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--tasks", default="digits,mnist1d")
    p.add_argument("--optimizers", default=",".join(common.OPTIMIZERS))
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10, help="online CMD warm-up records F")
    p.add_argument("--freeze-modes-after", type=int, default=None,
                   help="the 'online CMD' column's freeze_modes_after (default: the recorder's default)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="print the tables of a results file written by an earlier run, and exit")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            saved = json.load(f)
        print(markdown(saved["table"]) + "\n\n" + paired(saved["runs"]))
        return saved["table"]
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.epochs, a.samples, a.warmup, a.modes = 1, 3, 200, 2, 3
        a.optimizers = "SGD+momentum"
    tasks, optimizers = a.tasks.split(","), a.optimizers.split(",")
    freeze = None if a.freeze_modes_after is None else {"freeze_modes_after": a.freeze_modes_after}
    rows = []
    for t in tasks:
        task = common.load_task(t, quick=a.quick)
        for o in optimizers:
            for seed in range(a.seeds):
                r = one_run(task, o, seed, a.epochs, a.modes, a.samples, a.warmup, (0.9, 0.99, 0.999), (0.5, 0.75),
                            freeze)
                rows.append(r)
                print(f"{t:8s} {o:20s} seed {seed}: " + "  ".join(f"{c} {r[c]:.2f}" for c in COLUMNS)
                      + f"  ({r['train_seconds']:.1f}s)", flush=True)
    lines = table(rows, tasks, optimizers)
    md = markdown(lines)
    print(md + "\n\n" + paired(rows))
    name = "accuracy_quick" if a.quick else "accuracy"
    settings = dict(epochs=a.epochs, seeds=a.seeds, modes=a.modes, samples=a.samples, warmup=a.warmup,
                    freeze_modes_after=a.freeze_modes_after,
                    ema_decays=[0.9, 0.99, 0.999], swa_starts=[0.5, 0.75], batch_size=64,
                    optimizers={k: dict(v[1], cosine=v[2]) for k, v in common.OPTIMIZERS.items()})
    common.write_json(name + ".json", dict(settings=settings, env=common.environment(), runs=rows, table=lines,
                                           paper=PAPER), a.out)
    path = os.path.join(a.out or common.RESULTS, name + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "optimizer", "seeds"] + [f"{c} {s}" for c in COLUMNS for s in ("mean", "std")])
        for ln in lines:
            w.writerow([ln["task"], ln["optimizer"], ln["seeds"]] + [f"{v:.3f}" for c in COLUMNS for v in ln[c]])
    return lines


if __name__ == "__main__":
    main()
