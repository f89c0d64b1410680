"""Modes sweep (the paper's Figs. 6, 9, 11): CMD test accuracy and reconstruction error against M and K.

One training per seed (MNIST-1D CNN, SGD + momentum, one record per epoch) carries one online recorder
per setting (M ∈ {1, 2, 5, 10, 20} at K = 1000, K ∈ {50, …, 2000} at M = 10); the post-hoc CMD of
the same snapshots uses the same M, K and seed. The online recorders are the full form
(``freeze_modes_after=None``: modes chosen over the whole window, as post hoc). Reconstruction error is ‖W − Ŵ‖_F / ‖W − W₀‖_F over
the online fit window (records F−1 … T−1) for both, and over all records for post-hoc.

    python benchmarks/modes_sweep.py           # full (3 seeds)
    python benchmarks/modes_sweep.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cmd_online as cmdo  # noqa: E402


def settings(modes_list, samples_list, default_modes, default_samples):
    out = [(m, default_samples) for m in modes_list]
    out += [(default_modes, k) for k in samples_list if (default_modes, k) not in out]
    return out


def sweep_seed(task, optimizer, seed, epochs, warmup, configs) -> list[dict]:
    recorders = [dict(modes=m, samples=k, warmup=warmup, seed=seed, freeze_modes_after=None) for m, k in configs]
    run = common.train(task, optimizer, seed, epochs, recorders=recorders)
    W, w0 = run.snapshots, run.snapshots[:, 0]
    T = W.shape[1]
    window = slice(warmup - 1, T)
    rows = [{"seed": seed, "M": None, "K": None, "method": "trained",
             "test_acc": common.accuracy(run.model, task.x_test, task.y_test)}]
    for (m, k), rec in zip(configs, run.recorders):
        traj = rec.trajectory()
        W_on = torch.stack([traj.reconstruct(t) for t in range(warmup - 1, T)], 1)
        rows.append({"seed": seed, "M": m, "K": k, "method": "online", "modes_found": traj.num_modes,
                     "freeze_modes_after": rec.config.freeze_modes_after,
                     "err_window": common.rel_error(W[:, window], W_on, w0),
                     "test_acc": common.evaluate_weights(run.model, rec.cmd_state_dict(-1), task)})
        post = cmdo.decompose(W, modes=m, samples=k, seed=seed, layout=rec.layout)
        W_post = torch.stack([post.reconstruct(t) for t in range(T)], 1)
        rows.append({"seed": seed, "M": m, "K": k, "method": "post-hoc", "modes_found": post.num_modes,
                     "err_window": common.rel_error(W[:, window], W_post[:, window], w0),
                     "err_all": common.rel_error(W, W_post, w0),
                     "test_acc": common.evaluate_weights(run.model, common.weights_state(run.model,
                                                                                         post.reconstruct(-1)), task)})
    return rows


def summarize(rows, configs):
    out = []
    for method in ("online", "post-hoc"):
        for m, k in configs:
            sel = [r for r in rows if r["method"] == method and r["M"] == m and r["K"] == k]
            line = {"method": method, "M": m, "K": k, "seeds": len(sel),
                    "test_acc": common.mean_std([r["test_acc"] for r in sel]),
                    "err_window": common.mean_std([r["err_window"] for r in sel])}
            if method == "post-hoc":
                line["err_all"] = common.mean_std([r["err_all"] for r in sel])
            out.append(line)
    trained = [r["test_acc"] for r in rows if r["method"] == "trained"]
    out.append({"method": "trained", "test_acc": common.mean_std(trained), "seeds": len(trained)})
    return out


def markdown(lines) -> str:
    rows = ["| method | M | K | test acc % | ‖W−Ŵ‖/‖W−W₀‖ (window) | (all records) |", "|---|---|---|---|---|---|"]
    for ln in lines:
        if ln["method"] == "trained":
            rows.append(f"| trained | | | {ln['test_acc'][0]:.2f} ± {ln['test_acc'][1]:.2f} | | |")
            continue
        all_ = f"{ln['err_all'][0]:.3f} ± {ln['err_all'][1]:.3f}" if "err_all" in ln else ""
        rows.append(f"| {ln['method']} | {ln['M']} | {ln['K']} | {ln['test_acc'][0]:.2f} ± {ln['test_acc'][1]:.2f} | "
                    f"{ln['err_window'][0]:.3f} ± {ln['err_window'][1]:.3f} | {all_} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few epochs, two settings")
    p.add_argument("--task", default="mnist1d")
    p.add_argument("--optimizer", default="SGD+momentum")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    modes_list, samples_list = [1, 2, 5, 10, 20], [50, 125, 250, 500, 1000, 2000]
    default_modes, default_samples = 10, 1000
    if a.quick:
        a.seeds, a.epochs, a.warmup = 1, 4, 2
        modes_list, samples_list, default_modes, default_samples = [1, 3], [50], 3, 200
    configs = settings(modes_list, samples_list, default_modes, default_samples)
    task = common.load_task(a.task, quick=a.quick)
    rows = []
    for seed in range(a.seeds):
        rows += sweep_seed(task, a.optimizer, seed, a.epochs, a.warmup, configs)
        print(f"seed {seed} done", flush=True)
    lines = summarize(rows, configs)
    print(markdown(lines))
    common.write_json("modes_sweep_quick.json" if a.quick else "modes_sweep.json",
                      dict(settings=dict(task=a.task, optimizer=a.optimizer, seeds=a.seeds, epochs=a.epochs,
                                         warmup=a.warmup, configs=configs),
                           env=common.environment(), runs=rows, table=lines), a.out)
    return lines


if __name__ == "__main__":
    main()
