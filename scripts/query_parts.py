"""Where a query's time and extra memory go, and what a smaller fit block would change.

Builds a full-form recorder (M = 10) on benchmarks/cost.py's synthetic parameters and reports, timed
interleaved with a record (medians of per-round ratios): ``fit_blocks()`` walked once with the library's
block and with other sizes, the exact argmax over the M rows alone (``cmd_online.stats._best_mode``, a
private function: this is a diagnostic), ``cmd_parameters()`` and ``trajectory()``. Then the extra peak
RSS of a ``fit_blocks()`` walk (each block dropped) with the queries' block and with the freeze's
(``cmd_online.recorder.FREEZE_BLOCK``), and the N bytes of the modes: the parts of the freeze's peak; and
the extra peak of ``cmd_parameters()`` and ``trajectory()`` beyond what they return. With glibc's default heap, freed
blocks may stay resident and count; ``MALLOC_MMAP_THRESHOLD_=65536`` returns every block to the system on
free, so that the peaks count live tensors only.

    python scripts/query_parts.py [--weights 1e6] [--modes 10] [--rounds 9] [--memory-only]
    MALLOC_MMAP_THRESHOLD_=65536 python scripts/query_parts.py --weights 1e7 --memory-only
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cost  # noqa: E402
from cmd_online import CMDRecorder  # noqa: E402
from cmd_online.recorder import FIT_BLOCK, FREEZE_BLOCK  # noqa: E402
from cmd_online.stats import _best_mode  # noqa: E402

MIB = 1 << 20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=float, default=1e6)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--memory-only", action="store_true", help="leave out the timing")
    a = p.parse_args()
    torch.set_num_threads(1)
    N = int(a.weights)
    cost._load_lazy_modules("cpu")
    params = cost.make_params(N, "cpu")
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), modes=a.modes, samples=1000, warmup=8)
    for t in range(11):
        cost.perturb(params, t)
        rec.record()
    st = rec.moments

    def walk(block=None):
        for _ in rec.fit_blocks(block=block):
            pass

    def argmax_only():
        Q = st.ref_sumsq
        for _, _, flat in st.block_plan():
            _best_mode([row[flat] for row in st.comoment], Q)

    ops = {"record": rec.record, f"fit_blocks() ({FIT_BLOCK})": walk,
           **{f"fit_blocks(block={b})": (lambda b=b: walk(b)) for b in (1 << 17, 1 << 14, FREEZE_BLOCK)},
           "argmax only": argmax_only,
           "cmd_parameters()": rec.cmd_parameters, "trajectory()": rec.trajectory}
    times = {k: [] for k in ops}
    for _ in range(0 if a.memory_only else a.rounds):
        for k, fn in ops.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    print(f"N = {N:.0e}, M = {rec.num_modes}, full form, {a.rounds} interleaved rounds, 1 thread")
    for k, v in times.items() if not a.memory_only else ():
        ratio = statistics.median(x / r for x, r in zip(v, times["record"]))
        print(f"  {k:26s} {1e3 * statistics.median(v):8.1f} ms   / record {ratio:5.2f}")

    def extra_peak(fn, output=0):
        peaks = []
        for _ in range(2):
            cost.reset_peak()
            before = cost.rss_bytes()
            result = fn()
            peaks.append((cost.peak_bytes() - before) / MIB - output)
            del result
        return max(peaks)

    print("  extra peak RSS, MiB (1 float32 per weight = %.1f MiB):" % (4 * N / MIB))
    print(f"    fit_blocks() walk ({FIT_BLOCK})         {extra_peak(walk):6.1f}")
    print(f"    fit_blocks(block={1 << 17}) walk   {extra_peak(lambda: walk(1 << 17)):6.1f}")
    print(f"    the freeze's walk ({FREEZE_BLOCK})       {extra_peak(lambda: walk(FREEZE_BLOCK)):6.1f}")
    print(f"    modes (N bytes)              {N / MIB:6.1f}")
    print(f"    cmd_parameters() beyond its N float32      {extra_peak(rec.cmd_parameters, 4 * N / MIB):6.1f}")
    print(f"    trajectory() beyond its a, b, modes (3·N)  {extra_peak(rec.trajectory, 12 * N / MIB):6.1f}")


if __name__ == "__main__":
    main()
