"""When must a weight's mode be chosen? The default against the full form, rule by rule, from one run.

The default recorder fixes every weight's mode after ``freeze_modes_after`` = 3 window records and keeps
only the co-moment with that mode; the full form keeps all M co-moments and chooses the mode over the
whole window at the query. On MNIST-1D the default's CMD accuracy is below the full form's
(docs/benchmarks.md §1). This script asks which part of the late choice matters, without building any
new recorder: it trains once per (optimizer, seed), keeps every record (N × T, small here), takes the
full-form recorder's references, and evaluates mode-choice rules post hoc. Every rule fits a and b over
the same window as the recorder (float64 least squares), so rules differ only in each weight's mode:

- ``full form``: argmax_m |ρ_m| over the whole window (must equal the full-form recorder);
- ``fixed after k``: argmax over the window's first k records (k = 3 must equal the default recorder);
- ``best of top c at k``: the c best modes after k records kept as candidates, the best of them over
  the whole window chosen at the end (what a recorder keeping c co-moments per weight would give);
- ``best of c random``: c modes drawn at random per weight, the best of them over the whole window;
- ``best of c in a row``: the same with the modes b, b + 1, …, b + c − 1 (mod M) from one random b per
  weight (a recorder would store b alone).

It also reports how often a rule's early choice is the full form's final choice. The first two rules are
checked against the two recorders: ``modes_differ``, the weights whose mode differs from the recorder's
(where two modes score alike to float32 precision), and ``check``, the largest |difference| of the CMD
weights elsewhere.

    python benchmarks/mode_choice.py            # MNIST-1D, 4 optimizers × 5 seeds, 40 epochs
    python benchmarks/mode_choice.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def rules(ks=(3, 5, 10), candidates=(2, 3, 5), top_at=(3, 10)) -> list[tuple[str, str, int, int]]:
    """(name, kind, k, c) of every rule the run evaluates, in table order."""
    out = [("full form", "full", 0, 0)]
    out += [(f"fixed after {k}", "fixed", k, 1) for k in ks]
    out += [(f"best of top {c} at {k}", "top", k, c) for k in top_at for c in candidates]
    out += [(f"best of {c} random", "random", 0, c) for c in candidates]
    out += [(f"best of {c} in a row", "row", 0, c) for c in candidates if c > 2]
    return out


def _scores(W: np.ndarray, R: np.ndarray, cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P (N × M), Q (M) over the records ``cols`` and the choice score |P_m| / √Q_m (0 where Q_m = 0)."""
    Wc = W[:, cols] - W[:, cols].mean(1, keepdims=True)
    Rc = R[:, cols] - R[:, cols].mean(1, keepdims=True)
    P, Q = Wc @ Rc.T, (Rc ** 2).sum(1)
    return P, Q, np.abs(P) / np.sqrt(np.where(Q > 0, Q, np.inf))


def choose(W: np.ndarray, R: np.ndarray, window: list[int], kind: str, k: int, c: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Each weight's mode under one rule, and the candidates it chose from (None for full/fixed)."""
    final = _scores(W, R, window)[2]
    if kind == "full":
        return final.argmax(1), None
    if kind == "random":
        cand = np.argsort(rng.random(final.shape), 1)[:, :c]
    elif kind == "row":  # modes b, b + 1, …, b + c − 1 (mod M) from a random b: one byte per weight
        base = rng.integers(0, final.shape[1], size=(final.shape[0], 1))
        cand = (base + np.arange(c)) % final.shape[1]
    else:
        early = _scores(W, R, window[:k])[2]
        if kind == "fixed":
            return early.argmax(1), None
        cand = np.argsort(-early, 1, kind="stable")[:, :c]
    pick = np.take_along_axis(final, cand, 1).argmax(1)
    return cand[np.arange(len(cand)), pick], cand


def reconstruct(W: np.ndarray, R: np.ndarray, window: list[int], modes: np.ndarray, at: int) -> np.ndarray:
    """The CMD weights a·r(at) + b, a and b fitted over the window for the given modes (float64)."""
    P, Q, _ = _scores(W, R, window)
    rows = np.arange(len(modes))
    a = np.where(Q[modes] > 0, P[rows, modes] / np.where(Q[modes] > 0, Q[modes], 1.0), 0.0)
    b = W[:, window].mean(1) - a * R[modes][:, window].mean(1)
    return a * R[modes, at] + b


def one_run(task, optimizer: str, seed: int, epochs: int, modes: int, samples: int, warmup: int,
            table: list, record_every: int | None = None) -> dict:
    settings = dict(modes=modes, samples=samples, warmup=warmup, seed=seed)
    run = common.train(task, optimizer, seed, epochs, record_every=record_every,
                       recorders=[dict(settings, freeze_modes_after=None), settings])
    full, default = run.recorders
    W = run.snapshots.double().numpy()
    R = full.references.double().numpy()
    window = list(range(full.trajectory().window_start, W.shape[1]))
    last = W.shape[1] - 1
    evaluate = lambda flat: common.evaluate_weights(  # noqa: E731
        run.model, common.weights_state(run.model, torch.as_tensor(flat, dtype=torch.float32)), task)
    rng = np.random.default_rng(seed)
    out = {"optimizer": optimizer, "seed": seed, "records": W.shape[1], "window": [window[0], last],
           "num_modes": int(R.shape[0]), "acc": {}, "agree": {}, "hit": {}, "check": {},
           "modes_differ": {}}
    final_modes = None
    for name, kind, k, c in table:
        chosen, cand = choose(W, R, window, kind, k, c, rng)
        flat = reconstruct(W, R, window, chosen, last)
        out["acc"][name] = evaluate(flat)
        if kind == "full":
            final_modes = chosen
        out["agree"][name] = float((chosen == final_modes).mean())
        if cand is not None:
            out["hit"][name] = float((cand == final_modes[:, None]).any(1).mean())
        recorder = {"full form": full, f"fixed after {default.config.freeze_modes_after}": default}.get(name)
        if recorder is not None:
            online = torch.cat([p.reshape(-1) for p in recorder.cmd_parameters(-1)]).double().numpy()
            same = recorder.trajectory().modes.numpy() == chosen  # differs only where two modes tie in float32
            out["check"][name] = float(np.abs(online - flat)[same].max())
            out["modes_differ"][name] = int((~same).sum())
            out["acc"][name + " (recorder)"] = common.evaluate_weights(run.model, recorder.cmd_state_dict(-1), task)
    return out


def summarise(runs: list[dict], table: list) -> list[dict]:
    """Per rule: accuracy minus the full form's, mean ± std per optimizer and over all runs, and agreement."""
    lines = []
    for name, *_ in table:
        diffs = {r["optimizer"]: [] for r in runs}
        for r in runs:
            diffs[r["optimizer"]].append(r["acc"][name] - r["acc"]["full form"])
        every = [d for ds in diffs.values() for d in ds]
        lines.append({"rule": name, "all": common.mean_std(every),
                      "worse": sum(d < 0 for d in every), "better": sum(d > 0 for d in every),
                      "per_optimizer": {o: common.mean_std(ds)[0] for o, ds in diffs.items()},
                      "agree": float(np.mean([r["agree"][name] for r in runs])),
                      "hit": float(np.mean([r["hit"][name] for r in runs])) if name in runs[0]["hit"] else None})
    return lines


def markdown(lines: list[dict]) -> str:
    optimizers = list(lines[0]["per_optimizer"])
    out = ["| rule | − full form, all runs (points) | better / worse | " + " | ".join(optimizers)
           + " | final mode among its choices |", "|---|---|---|" + "---|" * len(optimizers) + "---|"]
    for ln in lines:
        mean, std = ln["all"]
        share = ln["hit"] if ln["hit"] is not None else ln["agree"]
        out.append(f"| {ln['rule']} | {mean:+.2f} ± {std:.2f} | {ln['better']} / {ln['worse']} | "
                   + " | ".join(f"{ln['per_optimizer'][o]:+.2f}" for o in optimizers) + f" | {100 * share:.0f} % |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 epochs, one optimizer, small data")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--task", default="mnist1d")
    p.add_argument("--optimizers", default=",".join(common.OPTIMIZERS))
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--record-every", type=int, default=None,
                   help="a record every k optimizer steps instead of once per epoch")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.epochs, a.samples, a.warmup, a.modes, a.optimizers = 1, 10, 200, 3, 3, "SGD+momentum"
    table = rules() if not a.quick else rules(ks=(3,), candidates=(2,), top_at=(3,))
    task = common.load_task(a.task, quick=a.quick)
    runs = []
    for o in a.optimizers.split(","):
        for seed in range(a.seeds):
            runs.append(one_run(task, o, seed, a.epochs, a.modes, a.samples, a.warmup, table, a.record_every))
            r = runs[-1]
            print(f"{o:20s} seed {seed}: " + "  ".join(f"{n} {v:.1f}" for n, v in r["acc"].items()), flush=True)
    lines = summarise(runs, table)
    print(markdown(lines))
    settings = dict(task=a.task, epochs=a.epochs, seeds=a.seeds, modes=a.modes, samples=a.samples, warmup=a.warmup,
                    record_every=a.record_every)
    common.write_json("mode_choice_quick.json" if a.quick else "mode_choice.json",
                      dict(settings=settings, env=common.environment(), runs=runs, table=lines), a.out)
    return runs, lines


if __name__ == "__main__":
    main()
