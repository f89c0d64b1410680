"""Clustering distance: 1 − |corr| (the default) against the Euclidean distance between rows of |corr|.

The paper does not fix the distance; the authors' code uses the Euclidean one. For each seed one
training (the task's CNN, SGD + momentum, one record per epoch) carries two online recorders that
differ only in ``distance=``: the same samples, the same warm-up history (both in the full form,
``freeze_modes_after=None``, so that the modes come from the clustering and the whole window). Reported per distance: the
number of modes, the CMD test accuracy at the last record (online, and post hoc on all records), and
between the two distances the adjusted Rand index (ARI) of the sample clusterings (1 = the same
partition, 0 = chance).

    python benchmarks/distance_compare.py            # mnist1d, 3 seeds
    python benchmarks/distance_compare.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cmd_online as cmdo  # noqa: E402

DISTANCES = ("correlation", "euclidean")


def compare_seed(task, seed: int, epochs: int, warmup: int, modes: int, samples: int) -> dict:
    kwargs = [dict(modes=modes, samples=samples, warmup=warmup, seed=seed, distance=d, freeze_modes_after=None)
              for d in DISTANCES]
    run = common.train(task, "SGD+momentum", seed, epochs, recorders=kwargs)
    row = {"seed": seed, "trained": common.accuracy(run.model, task.x_test, task.y_test)}
    labels = {}
    for distance, rec in zip(DISTANCES, run.recorders):
        c = rec.clustering
        labels[distance] = c.labels
        row[f"{distance}_modes"] = rec.num_modes
        row[f"{distance}_freeze_modes_after"] = rec.config.freeze_modes_after
        row[f"{distance}_online"] = common.evaluate_weights(run.model, rec.cmd_state_dict(-1), task)
        post = cmdo.decompose(run.snapshots, modes=modes, samples=samples, seed=seed, layout=rec.layout,
                              distance=distance)
        row[f"{distance}_posthoc"] = common.evaluate_weights(
            run.model, common.weights_state(run.model, post.reconstruct(-1)), task)
    varying = (labels["correlation"] >= 0) & (labels["euclidean"] >= 0)
    row["ari_samples"] = float(adjusted_rand_score(labels["correlation"][varying], labels["euclidean"][varying]))
    return row


def markdown(rows) -> str:
    def cell(key):
        values = np.array([r[key] for r in rows], dtype=float)
        return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"

    lines = ["| distance | modes | CMD test acc % (online) | CMD test acc % (post hoc) |", "|---|---|---|---|"]
    for d in DISTANCES:
        lines.append(f"| {d} | {cell(d + '_modes')} | {cell(d + '_online')} | {cell(d + '_posthoc')} |")
    lines.append(f"| (trained network) | | {cell('trained')} | |")
    lines.append("")
    lines.append(f"ARI between the two sample clusterings: {cell('ari_samples')} (seeds: {len(rows)})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few epochs")
    p.add_argument("--task", default="mnist1d")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.epochs, a.warmup, a.modes, a.samples = 1, 5, 3, 3, 200
    task = common.load_task(a.task, quick=a.quick)
    rows = [compare_seed(task, seed, a.epochs, a.warmup, a.modes, a.samples) for seed in range(a.seeds)]
    print(markdown(rows))
    common.write_json("distance_compare_quick.json" if a.quick else "distance_compare.json",
                      dict(settings=vars(a), env=common.environment(), runs=rows), a.out)
    return rows


if __name__ == "__main__":
    main()
