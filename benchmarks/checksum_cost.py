"""What the checksums of the library's files and states cost on save and load (docs/reliability.md).

For a recorder of N weights (one parameter, ``modes=10``, past its warm-up) and its trajectory, times

- recorder state, save: ``rec.state_dict()`` + ``atomic_save`` (temporary file, fsync, rename); load:
  ``torch.load(weights_only=True)`` + ``load_state_dict`` into a freshly built recorder;
- trajectory, save: ``CMDTrajectory.save``; load: ``CMDTrajectory.load``;

each with the checksum (this code) and without it: for the state the same calls with the checksum
function replaced by a constant; for the trajectory a file without a checksum, which ``load`` checks
through its zip members' CRC-32s as earlier versions did (the cost the checksum replaces). Best of
``--repeats`` runs, with and without alternating, in seconds, and the ratio with/without; and the time
of the state's checksum alone.

    python benchmarks/checksum_cost.py                 # N = 1e6 and 1e7, 3 repeats
    python benchmarks/checksum_cost.py --sizes 1e5 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
import warnings

import torch

import cmd_online as cmdo
import cmd_online.checkpoint as checkpoint_module
from cmd_online.files import atomic_save, checksum

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def no_checksum():
    """The recorder's state without its checksum: computed as a constant, never verified."""
    saved = checkpoint_module.checksum, checkpoint_module.verify_checksum
    checkpoint_module.checksum = lambda items: {"algorithm": "none", "value": 0}
    checkpoint_module.verify_checksum = lambda stored, items, what: None
    try:
        yield
    finally:
        checkpoint_module.checksum, checkpoint_module.verify_checksum = saved


def best_of_interleaved(with_fn, without_fn, repeats: int, before=None) -> tuple[float, float]:
    """The best time of each of two functions, run alternately (a machine shared with other jobs slows
    both alike), ``before`` called untimed ahead of each run."""
    times = ([], [])
    for _ in range(repeats):
        for k, (fn, guard) in enumerate(((with_fn, contextlib.nullcontext), (without_fn, no_checksum))):
            with guard():
                if before is not None:
                    before()
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(n: int):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(n))
    opt = torch.optim.SGD([weight], lr=0.1)
    make = lambda: cmdo.CMDRecorder(opt, modes=10, samples=1000, warmup=5, freeze_modes_after=None)  # noqa: E731
    rec = make()
    g = torch.Generator().manual_seed(1)
    signals = torch.randn(10, 8, generator=g)
    mode = torch.arange(n) % 10
    for t in range(8):  # ten modes, so that ten rows of P are saved
        with torch.no_grad():
            weight.add_(signals[mode, t] * 0.01 + 1e-3 * torch.randn(n, generator=g))
        rec.record()
    return rec, make


def measure(n: int, repeats: int, folder: str) -> dict:
    rec, make = build(n)
    path, tpath = os.path.join(folder, "state.pt"), os.path.join(folder, "traj.cmd")
    out = {"N": n, "modes": rec.num_modes}

    def save_state():
        atomic_save(rec.state_dict(), path)

    targets = []

    def load_state():
        targets[-1].load_state_dict(torch.load(path, weights_only=True))

    def new_target():  # built untimed: the load is what is measured
        while targets:
            targets.pop().close()
        targets.append(make())

    out["state_save_with"], out["state_save_without"] = best_of_interleaved(save_state, save_state, repeats)
    out["state_bytes"] = os.path.getsize(path)
    atomic_save(rec.state_dict(), path)  # with its checksum, which the load without checks ignores
    out["state_load_with"], out["state_load_without"] = best_of_interleaved(load_state, load_state, repeats,
                                                                            before=new_target)
    state = rec.state_dict()
    meta = checkpoint_module.read_meta(state)
    parts = checkpoint_module.stats_checked(state["stats"], rec.layout.names, rec.num_modes, False)
    out["state_checksum_only"] = min(_timed(lambda: checksum(parts)) for _ in range(repeats))
    assert checksum(parts) == meta["checksum"]
    new_target()

    traj = rec.trajectory()
    traj.save(tpath)
    payload = torch.load(tpath, weights_only=True)
    bare = {k: v for k, v in payload.items() if k != "checksum"}
    old_path = tpath + ".old"
    atomic_save(bare, old_path)
    out["trajectory_bytes"] = os.path.getsize(tpath)
    out["trajectory_save_with"], out["trajectory_save_without"] = best_of_interleaved(
        lambda: traj.save(tpath), lambda: atomic_save(bare, old_path), repeats)
    out["trajectory_load_with"], out["trajectory_load_without"] = best_of_interleaved(
        lambda: cmdo.CMDTrajectory.load(tpath), lambda: cmdo.CMDTrajectory.load(old_path), repeats)
    for kind in ("state", "trajectory"):
        for op in ("save", "load"):
            out[f"{kind}_{op}_ratio"] = out[f"{kind}_{op}_with"] / out[f"{kind}_{op}_without"]
    rec.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated N (default 1e6,1e7)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-name", default="checksum_cost")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKSUM_BENCH_DIR")) as folder:
        for n in (int(float(s)) for s in args.sizes.split(",")):
            rows.append(measure(n, args.repeats, folder))
    result = {"rows": rows, "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
              "repeats": args.repeats}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out_name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, best of {args.repeats} (with and without alternating)")
    print("| N | file | MB | save with / without (s) | ratio | load with / without (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for kind in ("state", "trajectory"):
            print(f"| {r['N']:.0e} | {kind} | {r[f'{kind}_bytes'] / 1e6:.0f} | "
                  f"{r[f'{kind}_save_with']:.3f} / {r[f'{kind}_save_without']:.3f} | {r[f'{kind}_save_ratio']:.3f} | "
                  f"{r[f'{kind}_load_with']:.3f} / {r[f'{kind}_load_without']:.3f} | {r[f'{kind}_load_ratio']:.3f} |")
        print(f"  N = {r['N']:.0e}: the state's checksum alone takes {r['state_checksum_only']:.3f} s")


if __name__ == "__main__":
    main()
