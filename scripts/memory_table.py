"""Bytes held by a CMDRecorder, measured with ``nbytes()``, next to the formulas of docs/concepts.md.

    python scripts/memory_table.py [--weights-in 1000] [--weights-out 100] [--modes 10] [--samples 1000] [--warmup 20]

Records a ``torch.nn.Linear`` (N = in·out + out weights) for warmup + 10 records in the full form and
in the compact form (``freeze_modes_after=3``) and prints each part of ``nbytes()`` with its formula.
"""

import argparse

import torch

import cmd_online as cmdo
from cmd_online.stats import BLOCK, compact_block


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-in", type=int, default=1000)
    parser.add_argument("--weights-out", type=int, default=100)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    M, K, F = args.modes, args.samples, args.warmup
    for form, freeze in (("full", None), ("compact", 3)):
        model = torch.nn.Linear(args.weights_in, args.weights_out)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        rec = cmdo.CMDRecorder(optimizer, model, modes=M, samples=K, warmup=F, freeze_modes_after=freeze)
        for _ in range(F + 10):
            with torch.no_grad():  # a random walk stands in for training: only the sizes matter here
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            rec.record()
        N, M_found = rec.layout.numel, rec.num_modes
        capacity = max(2 * F, 64)  # columns of the reference table; doubles when full
        block = min(BLOCK if freeze is None else compact_block(N), N)  # the CPU record path works block by block
        formula = {
            "statistics": ((M_found + 3) * N * 4 if freeze is None else 3 * N * 4 + N) + 3 * M_found * 4,
            "scratch": (1 if freeze is None else 3) * block * 4,
            "history": K * F * 4,
            "references": M_found * capacity * 4,
            "indices": (K + M_found) * 8,
        }
        measured = rec.nbytes()
        rec.close()
        print(f"{form} form: N = {N:,} weights, M = {M_found} modes, K = {K}, F = {F}, "
              f"{rec.num_records} records")
        stats_formula = ("(M+3)·N·4 + 3·M·4" if freeze is None else "3·N·4 + N (uint8 mode) + 3·M·4")
        scratch_formula = f"B·4 (dx), B = {block:,}" if freeze is None else f"3·B·4 (dx, y−ν, mode), B = {block:,}"
        rows = [("statistics", stats_formula), ("scratch", scratch_formula),
                ("history", "K·F·4"),
                ("references", f"M·capacity·4 (capacity {capacity})"), ("indices", "(K+M)·8")]
        for part, text in rows:
            print(f"  {part:<11}{measured[part]:>12,} bytes   formula {text:<36}= {formula[part]:>12,}")
        print(f"  {'total':<11}{measured['total']:>12,} bytes   one float32 copy of the model: {4 * N:,} bytes")


if __name__ == "__main__":
    main()
