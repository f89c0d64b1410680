"""Post-hoc CMD at N = 10^7 weights × T = 100 records: does the chunked fit stay within memory?

The trajectory itself is N·T float32 (4 GB at full size); the fit works through it in chunks of
bounded float64 temporaries, so the peak memory beyond W should stay at O(chunk + N) (a, b, modes).

    python benchmarks/posthoc_scale.py            # N = 10^7, T = 100 (run time: docs/benchmarks.md)
    python benchmarks/posthoc_scale.py --quick    # N = 10^5
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import cmd_online as cmdo


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10^5 instead of 10^7")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "posthoc_scale.json"))
    args = parser.parse_args()
    N, T, M = (10**5 if args.quick else 10**7), 100, 10
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, T)
    profiles = torch.stack([torch.sin(torch.pi * (m + 1) * t) for m in range(M)])  # nearly orthogonal
    W = torch.empty(N, T)
    rows = 1 << 20
    for start in range(0, N, rows):  # W = a·profile[mode] + b + noise, built in blocks
        n = min(rows, N - start)
        mode = torch.randint(0, M, (n,), generator=g)
        a = (0.5 + 1.5 * torch.rand(n, 1, generator=g)) * torch.randn(n, 1, generator=g).sign()  # |a| ≥ 0.5
        W[start:start + n] = (a * profiles[mode] + torch.randn(n, 1, generator=g)
                              + 0.01 * torch.randn(n, T, generator=g))
    w_mib = W.numel() * 4 / 2**20
    before = peak_mib()
    start_time = time.perf_counter()
    traj = cmdo.decompose(W, modes=M, samples=1000)
    seconds = time.perf_counter() - start_time
    after = peak_mib()
    err = ((torch.stack([traj.reconstruct(s) for s in (0, T // 2, T - 1)], 1) - W[:, [0, T // 2, T - 1]]).norm()
           / W[:, [0, T // 2, T - 1]].norm()).item()
    result = {"N": N, "T": T, "M": traj.num_modes, "W_MiB": round(w_mib, 1),
              "peak_before_fit_MiB": round(before, 1), "peak_after_fit_MiB": round(after, 1),
              "fit_growth_MiB": round(after - before, 1), "fit_growth_bytes_per_weight": round((after - before) * 2**20 / N, 2),
              "seconds": round(seconds, 1), "relative_reconstruction_error": round(err, 5)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
