"""One statistics update with each kernel and form of ``StreamingMoments``, timed against the add_ floors and EMA.

Times ``StreamingMoments.update`` (the public API the recorder calls once per record) with M = 10 on synthetic
tensors, for each kernel (``"blocks"``, ``"flat"``, ``"compiled"``) in the full form and, after ``freeze``
with random modes, in the compact form:

    full/<kernel>     P as M rows, (M + 3)·N float32 of statistics
    compact/<kernel>  each weight's co-moment with its own mode, 4·N float32 + N mode labels
    fin               the recorder's finite check on a CPU (one L2 norm per tensor, one boolean to the host)

floor: ``add_`` over (M + 3)·N float32 (full form); floorc: over 3·N (compact form); ema:
``torch._foreach_lerp_`` over the N weights. Each ratio is the median over interleaved rounds of the
per-round ratio [interquartile range]; times are CUDA-event medians on a GPU (perf_counter on CPU). The
first call of each variant is timed apart (``torch.compile`` compiles there). Sizes: N = 1e6 or 1e7 in
six tensors (cost.py's four layers with biases), or ResNet-18's 62 parameter tensors (11.7 M weights).
``--block-sizes`` also times the blocks kernel with other block sizes than the library's
``cmd_online.stats.BLOCK`` (set for the variant's construction only), to check that choice.

    python benchmarks/update_variants.py 1e6 1e7 resnet18        # all kernels, CPU or GPU
    python benchmarks/update_variants.py 1e7 --block-sizes 32768,524288
    python benchmarks/update_variants.py --quick                 # smoke run on CPU, no compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from cmd_online import stats  # noqa: E402
from cmd_online.stats import StreamingMoments  # noqa: E402

M = 10
FRACTIONS = (0.45, 0.001, 0.35, 0.001, 0.197, 0.001)


def resnet18_sizes() -> list[int]:
    """Parameter sizes of torchvision's ResNet-18 (1000 classes), in ``parameters()`` order, without torchvision."""
    sizes, c_in = [64 * 3 * 49, 64, 64], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = c_in if block == 0 else c_out
            sizes += [c_out * first * 9, c_out, c_out, c_out * c_out * 9, c_out, c_out]
            if block == 0 and (stride != 1 or c_in != c_out):
                sizes += [c_out * c_in, c_out, c_out]  # downsample: 1×1 conv and BatchNorm
        c_in = c_out
    return sizes + [512 * 1000, 1000]


def sizes_for(case: str) -> list[int]:
    if case == "resnet18":
        return resnet18_sizes()
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


def moments(sizes, device, kernel: str, compact: bool, weights, block: int | None = None) -> StreamingMoments:
    """StreamingMoments past its first two records (and frozen with random modes if ``compact``)."""
    saved = stats.BLOCK
    if block is not None:
        stats.BLOCK = block  # read at construction and at freeze
    try:
        st = StreamingMoments(sizes, M, device, kernel=kernel)
        g = torch.Generator().manual_seed(0)
        st.update([w - 0.01 for w in weights], torch.randn(M, generator=g).to(device))
        st.update(weights, torch.randn(M, generator=g).to(device))
        if compact:
            st.freeze(torch.randint(0, M, (sum(sizes),), generator=g).to(device))
    finally:
        stats.BLOCK = saved
    return st


def measure(case: str, device: str, rounds: int, kernels: list[str], block_sizes: list[int]) -> dict:
    sizes = sizes_for(case)
    N = sum(sizes)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, generator=g).to(device) for n in sizes]
    refs = torch.randn(M, generator=g).to(device) * 1e-3
    floor, floorc = torch.zeros(N * (M + 3), device=device), torch.zeros(N * 3, device=device)
    ema = [w.clone() for w in weights]
    ops = {"floor": lambda: floor.add_(1.0), "floorc": lambda: floorc.add_(1.0),
           "ema": lambda: torch._foreach_lerp_(ema, weights, 0.001),
           "fin": lambda: bool(torch.isfinite(torch.stack(torch._foreach_norm(weights))).all())}
    variants = [(form, kernel, None) for kernel in kernels for form in ("full", "compact")]
    variants += [(form, "blocks", b) for b in block_sizes for form in ("full", "compact")]
    run = timer(device)
    setup = {}  # the first records (and freeze) of each variant: the full form's compile happens here
    for form, kernel, block in variants:
        name = f"{form}/{kernel}" + ("" if block is None else f"/B={block}")
        made = []
        setup[name] = run(lambda: made.append(moments(sizes, device, kernel, form == "compact", weights, block)))
        ops[name] = lambda st=made[0]: st.update(weights, refs)
    first = {k: run(fn) for k, fn in ops.items()}  # warm-up; the compact form's compile happens here
    for fn in ops.values():
        fn()
    times = {k: [] for k in ops}
    for _ in range(rounds):
        for k, fn in ops.items():
            times[k].append(run(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(k, den):
        xs = [a / b for a, b in zip(times[k], times[den])]
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}

    ratios = {k: {"floor": ratio(k, "floorc" if k.startswith("compact") else "floor"), "ema": ratio(k, "ema")}
              for k in ops}
    print(f"case {case}: N={N} tensors={len(sizes)} device={device} rounds={rounds}")
    for k, v in med.items():
        r = ratios[k]["floor"]
        den = "floorc" if k.startswith("compact") else "floor"
        print(f"  {k:22s} {1e6 * v:10.1f} us  /{den:6s} {r['median']:5.2f} [{r['q1']:.2f}, {r['q3']:.2f}]  "
              f"/ema {ratios[k]['ema']['median']:6.2f}  first call {1e3 * first[k]:9.1f} ms", flush=True)
    return {"N": N, "tensors": len(sizes), "median_s": med, "ratios": ratios, "first_call_s": first, "setup_s": setup}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cases", nargs="*", default=["1e6", "1e7", "resnet18"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--kernels", default=",".join(stats.KERNELS), help="kernels to time (default all)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled kernel")
    p.add_argument("--block-sizes", default="", help="also the blocks kernel with these block sizes")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 1e4, 3 rounds, no compile, no file")
    p.add_argument("--out", default=None, help="directory of the JSON (default benchmarks/results)")
    a = p.parse_args(argv)
    kernels = [k for k in a.kernels.split(",") if k and not (k == "compiled" and (a.no_compile or a.quick))]
    if a.quick:
        a.cases, a.rounds = ["1e4"], 3
    torch.set_num_threads(1)
    blocks = [int(float(b)) for b in a.block_sizes.split(",") if b]
    results = {case: measure(case, a.device, a.rounds, kernels, blocks) for case in a.cases}
    if not a.quick or a.out:
        common.write_json(f"update_variants_{a.device}.json",
                          dict(settings=dict(M=M, rounds=a.rounds, kernels=kernels, block=stats.BLOCK,
                                             block_sizes=blocks, argv=sys.argv[1:] if argv is None else argv,
                                             load_average=os.getloadavg()),
                               env=common.environment(), cases=results), a.out)
    return {case: r["median_s"] for case, r in results.items()}


if __name__ == "__main__":
    main()
