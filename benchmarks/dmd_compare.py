"""DMD against CMD on a training trajectory with augmentation (the paper's Section 2 and Fig. 5).

The digits CNN is trained with augmentation (random shifts + noise) and SGD + momentum; a record is
taken every ``--record-every`` optimizer steps (T = 121 records by default, so that r = 90 is possible).
On the same snapshots: global DMD (T × T Gram, exact modes, amplitudes fitted to all snapshots) and the
per-node DMD ("node Koopman operator") with r = 10, 50, 90 (capped per node by its size and T − 1),
post-hoc CMD (M = 10, K = 1000) and online CMD (the recorder in its full form, ``freeze_modes_after=None``,
warm-up F records). Reported: the
reconstruction error ‖W − Ŵ‖_F / ‖W − W₀‖_F and test accuracy along the run (BatchNorm statistics
recomputed for every reconstructed model).

    python benchmarks/dmd_compare.py           # full (3 seeds)
    python benchmarks/dmd_compare.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cmd_online as cmdo  # noqa: E402
from cmd_online.baselines import dmd, node_dmd, node_groups  # noqa: E402


def finite_or_none(x: float):
    return x if math.isfinite(x) else None


def compare_seed(task, seed, epochs, record_every, warmup, ranks, modes, samples, eval_points) -> list[dict]:
    run = common.train(task, "SGD+momentum", seed, epochs, record_every=record_every,
                       recorders=[dict(modes=modes, samples=samples, warmup=warmup, seed=seed,
                                        freeze_modes_after=None)])
    W, w0 = run.snapshots.double(), run.snapshots[:, 0]
    N, T = W.shape
    window = list(range(warmup - 1, T))
    at = sorted({min(T - 1, max(0, round(i * (T - 1) / (eval_points - 1)))) for i in range(eval_points)})
    model = run.model
    groups = node_groups([(n, p.shape) for n, p in model.named_parameters()])

    def evaluate(name, recon, records):
        """recon(t) -> flat weights; errors over all records given and over the online window."""
        W_hat = torch.stack([recon(t) for t in records], 1)
        cols = {t: i for i, t in enumerate(records)}
        err_all = common.rel_error(W[:, records], W_hat, w0) if records[0] == 0 else None
        err_win = common.rel_error(W[:, window], W_hat[:, [cols[t] for t in window]], w0)
        curve = {}
        for t in at:
            if t in cols:
                w = W_hat[:, cols[t]].float()
                curve[t] = (common.evaluate_weights(model, common.weights_state(model, w), task)
                            if torch.isfinite(w).all() else None)
        return {"seed": seed, "method": name, "err_all": None if err_all is None else finite_or_none(err_all),
                "err_window": finite_or_none(err_win), "acc_curve": curve,
                "final_acc": curve.get(T - 1)}

    rows = [evaluate("trained", lambda t: W[:, t], list(range(T)))]
    for r in ranks:
        g = dmd(W, r, method="gram")
        rows.append(evaluate(f"DMD r={r}", g.reconstruct, list(range(T))))
        rows[-1]["rank_used"] = g.rank
        n = node_dmd(W, groups, r)
        rows.append(evaluate(f"node DMD r={r}", n.reconstruct, list(range(T))))
    post = cmdo.decompose(W.float(), modes=modes, samples=samples, seed=seed, layout=run.recorders[0].layout)
    rows.append(evaluate(f"post-hoc CMD M={modes}", post.reconstruct, list(range(T))))
    traj = run.recorders[0].trajectory()
    rows.append(evaluate(f"online CMD M={modes}", traj.reconstruct, window))
    rows[-1]["window_only"] = True  # the online model exists from the end of the warm-up on
    rows[-1]["freeze_modes_after"] = run.recorders[0].config.freeze_modes_after
    for row in rows:
        row["records"], row["num_weights"] = T, N
    return rows


def summarize(rows):
    names = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for name in names:
        sel = [r for r in rows if r["method"] == name]
        line = {"method": name, "seeds": len(sel)}
        for key in ("err_all", "err_window", "final_acc"):
            vals = [r[key] for r in sel]
            if key == "err_all" and sel[0].get("window_only"):
                line[key], line[key + "_diverged"] = None, 0
                continue
            line[key] = None if any(v is None for v in vals) else common.mean_std(vals)
            line[key + "_diverged"] = sum(v is None for v in vals)
        out.append(line)
    return out


def markdown(lines) -> str:
    def cell(ln, key, digits):
        if ln[key] is None:
            return f"diverged in {ln[key + '_diverged']}/{ln['seeds']}" if ln[key + "_diverged"] else "—"
        return f"{ln[key][0]:.{digits}f} ± {ln[key][1]:.{digits}f}"

    rows = ["| model | ‖W−Ŵ‖/‖W−W₀‖ all records | same, online window | final test acc % |", "|---|---|---|---|"]
    for ln in lines:
        rows.append(f"| {ln['method']} | {cell(ln, 'err_all', 3)} | {cell(ln, 'err_window', 3)} | "
                    f"{cell(ln, 'final_acc', 2)} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few records")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--record-every", type=int, default=6)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ranks, modes, samples, eval_points = [10, 50, 90], 10, 1000, 13
    if a.quick:
        a.seeds, a.epochs, a.record_every, a.warmup = 1, 2, 2, 3
        ranks, modes, samples, eval_points = [2, 5], 3, 200, 3
    task = common.load_task("digits", quick=a.quick)
    rows = []
    for seed in range(a.seeds):
        rows += compare_seed(task, seed, a.epochs, a.record_every, a.warmup, ranks, modes, samples, eval_points)
        print(f"seed {seed} done", flush=True)
    lines = summarize(rows)
    print(markdown(lines))
    common.write_json("dmd_compare_quick.json" if a.quick else "dmd_compare.json",
                      dict(settings=dict(task="digits (augmented)", optimizer="SGD+momentum", seeds=a.seeds,
                                         epochs=a.epochs, record_every=a.record_every, warmup=a.warmup,
                                         ranks=ranks, modes=modes, samples=samples),
                           env=common.environment(), runs=rows, table=lines), a.out)
    return lines


if __name__ == "__main__":
    main()
