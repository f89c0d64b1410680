"""Variants of one statistics update, timed against the add_ floor and EMA, on a GPU (or CPU).

Measures the implementation choices of ``StreamingMoments.update`` with M = 10 on synthetic tensors:

    v0  per-tensor eager passes (sub, sub_, add_, addcmul_ ×2 per tensor)   full form
    vF  multi-tensor passes (torch._foreach_*) + one broadcast P kernel per tensor   full form
        (dx from an allocating _foreach_sub; StreamingMoments(foreach=True) writes dx into its
        preallocated scratch instead, with _foreach_copy_ and two _foreach_sub_: one more pass over N)
    vC  torch.compile of the per-tensor update (cmd_online.stats._full_update)   full form
    c0, cF, cC: the same three for the compact form (index_select of each weight's own reference)
    fin: the finite check of CMDRecorder (one L2 norm per tensor, one boolean to the host)

floor: ``add_`` over (M + 3)·N floats (full form statistics); floorc: over 5·N (compact);
ema: ``torch._foreach_lerp_`` over the N weights. Times are CUDA-event medians over 30 interleaved
rounds (perf_counter on CPU); the sizes are N = 1e6 or 1e7 in six tensors (cost.py's four layers with
biases), or ResNet-18's 62 parameter tensors (11.7 M weights, needs torchvision).

    python benchmarks/update_variants.py 1e6 1e7 resnet18      # on a CUDA machine
    python benchmarks/update_variants.py --quick               # smoke run on CPU, no compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cmd_online.stats import _fused_compact as _compact_update, _fused_full as _full_update  # noqa: E402

M = 10
FRACTIONS = (0.45, 0.001, 0.35, 0.001, 0.197, 0.001)


def sizes_for(case: str) -> list[int]:
    if case == "resnet18":
        import torchvision

        return [p.numel() for p in torchvision.models.resnet18().parameters()]
    N = int(float(case))
    sizes = [max(1, int(f * N)) for f in FRACTIONS]
    sizes[0] += N - sum(sizes)
    return sizes


def timer(device: str):
    if device == "cuda":
        def run(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def measure(case: str, device: str, rounds: int, compiled: bool) -> dict[str, float]:
    sizes = sizes_for(case)
    N = sum(sizes)
    W = [torch.randn(n, device=device) for n in sizes]
    C = [w.clone() for w in W]
    MU = [torch.zeros(n, device=device) for n in sizes]
    S = [torch.zeros(n, device=device) for n in sizes]
    P = [torch.zeros(M, n, device=device) for n in sizes]
    PC = [torch.zeros(n, device=device) for n in sizes]
    MO = [torch.randint(0, M, (n,), device=device, dtype=torch.int32) for n in sizes]
    DX = [torch.empty(n, device=device) for n in sizes]
    OWN = [torch.empty(n, device=device) for n in sizes]
    dr = torch.randn(M, device=device) * 1e-3
    SC = torch.tensor([0.1, 0.9], device=device)
    floor = torch.zeros(N * (M + 3), device=device)
    floorc = torch.zeros(N * 5, device=device)
    ema = [w.clone() for w in W]

    def per_tensor_passes(i):  # dx = (w − c) − μ into the scratch, then μ and S, for tensor i
        dx = DX[i]
        torch.sub(W[i], C[i], out=dx)
        dx.sub_(MU[i])
        MU[i].add_(dx, alpha=0.1)
        S[i].addcmul_(dx, dx, value=0.9)
        return dx

    def multi_tensor_passes():  # the same for all tensors at once, dx freshly allocated
        dx = torch._foreach_sub(W, C)
        torch._foreach_sub_(dx, MU)
        torch._foreach_add_(MU, dx, alpha=0.1)
        torch._foreach_addcmul_(S, dx, dx, value=0.9)
        return dx

    def v0():
        for i in range(len(W)):
            P[i].addcmul_(dr.unsqueeze(1), per_tensor_passes(i).unsqueeze(0))

    def vF():
        for P_i, dx in zip(P, multi_tensor_passes()):
            P_i.addcmul_(dr.unsqueeze(1), dx.unsqueeze(0))

    def c0():
        for i in range(len(W)):
            PC[i].addcmul_(per_tensor_passes(i), torch.index_select(dr, 0, MO[i], out=OWN[i]))

    def cF():
        torch._foreach_addcmul_(PC, multi_tensor_passes(), [dr[m] for m in MO])

    def fin():
        torch.stack(torch._foreach_norm(W)).isfinite().all().item()

    ops = dict(floor=lambda: floor.add_(1.0), floorc=lambda: floorc.add_(1.0),
               ema=lambda: torch._foreach_lerp_(ema, W, 0.001), fin=fin, v0=v0, vF=vF, c0=c0, cF=cF)
    if compiled:
        fu = torch.compile(_full_update, dynamic=True)
        cu = torch.compile(_compact_update, dynamic=True)
        ops["vC"] = lambda: [fu(w, C[i], MU[i], S[i], P[i].unbind(0), dr, SC) for i, w in enumerate(W)]
        ops["cC"] = lambda: [cu(w, C[i], MU[i], S[i], PC[i], MO[i], dr, SC) for i, w in enumerate(W)]
    for fn in ops.values():  # warm-up (and compile)
        fn()
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    run = timer(device)
    times = {k: [] for k in ops}
    for _ in range(rounds):
        for k, fn in ops.items():
            times[k].append(run(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"case {case}: N={N} tensors={len(sizes)} device={device}")
    for k, v in med.items():
        print(f"  {k:6s} {1e6 * v:9.1f} us  /floor {v / med['floor']:.2f}  /floorc {v / med['floorc']:.2f}  "
              f"/ema {v / med['ema']:.2f}")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cases", nargs="*", default=["1e6", "1e7", "resnet18"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 1e4, 3 rounds, no compile")
    a = p.parse_args(argv)
    if a.quick:
        a.cases, a.rounds, a.no_compile = ["1e4"], 3, True
    torch.set_num_threads(1)
    return {case: measure(case, a.device, a.rounds, not a.no_compile) for case in a.cases}


if __name__ == "__main__":
    main()
