"""Where the time of an eager compact record goes: the passes of the CPU block kernel, timed apart.

Rebuilds the passes of ``cmd_online.stats``' compact block step (kernel "blocks") on synthetic float32
tensors of N weights, block by block, and times each group against the compact floor (``add_`` over 3·N
float32), interleaved, one thread; then variants of the gather of each weight's own y − ν. A diagnostic
for docs/benchmarks.md §4, not a benchmark of the library itself (``benchmarks/cost.py`` times that).

    python scripts/compact_record_parts.py [--weights 1e7] [--block 131072] [--rounds 9]

    full step     dx = (w − c) − μ, μ += dx/n, S += dx²·(n−1)/n, modes uint8 → int32, index_select,
                  p += dx·own
    head only     the dx, μ and S passes
    gather only   the modes copy and index_select
    copy only     the uint8 → int32 copy of the modes
    int32 modes   the full step with modes held as int32 (no copy)
    take / index  the full step with torch.take (int64 index) / advanced indexing instead of index_select
    norm          the recorder's finite check (L2 norm, one boolean)
"""

import argparse
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=float, default=1e7)
    p.add_argument("--block", type=int, default=1 << 17)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    torch.set_num_threads(1)
    N, B, M = int(a.weights), a.block, a.modes
    g = torch.Generator().manual_seed(0)
    w, c = torch.randn(N, generator=g), torch.randn(N, generator=g)
    mu, S, pc = torch.zeros(N), torch.zeros(N), torch.zeros(N)
    modes8 = torch.randint(0, M, (N,), dtype=torch.uint8, generator=g)
    modes32 = modes8.int()
    ref = torch.randn(M, generator=g)
    dx, own = torch.empty(B), torch.empty(B)
    idx, idx64 = torch.empty(B, dtype=torch.int32), torch.empty(B, dtype=torch.int64)
    floor = torch.zeros(3 * N)
    blocks = [slice(s, min(s + B, N)) for s in range(0, N, B)]

    def head(f):
        d = dx[:f.stop - f.start]
        torch.sub(w[f], c[f], out=d)
        m = mu[f]
        d.sub_(m)
        m.add_(d, alpha=0.1)
        S[f].addcmul_(d, d, value=0.9)
        return d

    def step(gather):
        def run():
            for f in blocks:
                d = head(f)
                pc[f].addcmul_(d, gather(f, d.numel()))
        return run

    def gather_select(f, n):
        i = idx[:n]
        i.copy_(modes8[f])
        return torch.index_select(ref, 0, i, out=own[:n])

    def gather_int32(f, n):
        return torch.index_select(ref, 0, modes32[f], out=own[:n])

    def gather_take(f, n):
        i = idx64[:n]
        i.copy_(modes8[f])
        return torch.take(ref, i)

    def gather_index(f, n):
        i = idx[:n]
        i.copy_(modes8[f])
        return ref[i]

    ops = {
        "floor (add_ over 3N)": lambda: floor.add_(1.0),
        "full step": step(gather_select),
        "head only": lambda: [head(f) for f in blocks],
        "gather only": lambda: [gather_select(f, f.stop - f.start) for f in blocks],
        "copy only": lambda: [idx[:f.stop - f.start].copy_(modes8[f]) for f in blocks],
        "int32 modes": step(gather_int32),
        "take": step(gather_take),
        "index": step(gather_index),
        "norm": lambda: bool(torch.isfinite(torch.stack(torch._foreach_norm([w]))).all()),
    }
    times = {k: [] for k in ops}
    for _ in range(a.rounds):
        for k, fn in ops.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    base = times["floor (add_ over 3N)"]
    print(f"N = {N:.0e}, block = {B}, M = {M}, {a.rounds} interleaved rounds, 1 thread")
    for k, v in times.items():
        ratio = statistics.median(x / b for x, b in zip(v, base))
        print(f"  {k:22s} {1e3 * statistics.median(v):8.2f} ms   / floor {ratio:5.2f}")


if __name__ == "__main__":
    main()
