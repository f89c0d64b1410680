"""What TensorBoard logging adds to a record, at N ≈ 10^5 weights, measured in one run.

Two recorders on the same weights, one real SummaryWriter. For each record: move the weights (not
timed), time ``base.record()`` (no logging), then ``rec.record()`` followed by ``rec.log(writer, record)``,
the very call the recorder makes itself when given ``writer=``. Log calls are split into the per-record kind (reference values and bytes) and the
interval kind (mode statistics, histograms, mode-by-layer figure, every ``log_every`` records). The
writer's background thread (pure-Python CRC of every event) is charged to logging by timing a final
``writer.flush()``. Ratios are (record + log) / record in the same run.

    python benchmarks/bench_logging.py      # full form (matplotlib / native figures), compact form, log_every 50
    python benchmarks/bench_logging.py --records 200 --out benchmarks/results/logging.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

import cmd_online as cmdo
import cmd_online.tensorboard as tb


def model_1e5() -> torch.nn.Module:
    """An MLP of 100 234 weights (64 → 512 → 128 → 10)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10))


def run(figures: str, freeze: int | None, records: int, modes: int, log_every: int) -> dict:
    tb.FIGURES = figures
    model = model_1e5()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    kwargs = dict(modes=modes, samples=1000, warmup=5, log_every=log_every, freeze_modes_after=freeze)
    base = cmdo.CMDRecorder(opt, model, **kwargs)
    rec = cmdo.CMDRecorder(opt, model, **kwargs)
    # a few latent directions plus noise, so that the weights cluster into modes
    gen = torch.Generator().manual_seed(1)
    loadings = [torch.randn(4, p.numel(), generator=gen) for p in params]
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        logger = tb.TensorBoardLogger(writer, every=log_every)
        rec_times, light, full, logged_rec, summary = [], [], [], [], []
        for t in range(rec.config["warmup"] + records):
            drive = torch.randn(4, generator=gen)
            with torch.no_grad():
                for p, load in zip(params, loadings):
                    p.add_((drive @ load).view_as(p), alpha=1e-3).add_(torch.randn(p.shape, generator=gen), alpha=1e-4)
            t0 = time.perf_counter()
            base.record()
            t1 = time.perf_counter()
            rec.record()
            t2 = time.perf_counter()
            if rec.phase == "warmup":
                continue
            before = logger.last_summary
            logger.log(rec, rec.num_records - 1)
            t3 = time.perf_counter()
            if t >= rec.config["warmup"] + 2:  # skip the warm-up-end figures (once per run)
                rec_times.append(t1 - t0)
                logged_rec.append(t2 - t1)
                (full if logger.last_summary != before else light).append(t3 - t2)
                if logger.last_summary != before:  # the O(M·N) summary alone, no writer
                    t4 = time.perf_counter()
                    tb.mode_summary(rec)["totals"].cpu()
                    summary.append(time.perf_counter() - t4)
        t0 = time.perf_counter()
        writer.flush()
        flush = time.perf_counter() - t0
        writer.close()
    record_mean = statistics.fmean(rec_times)
    total_log = sum(light) + sum(full) + flush
    med = statistics.median
    # medians resist the scheduler noise of a shared machine; the amortised figure from them assumes
    # one interval log per log_every records
    amortised_median = (med(logged_rec) + (1 - 1 / log_every) * med(light) + med(full) / log_every) / med(rec_times)
    return {
        "figures": figures, "form": "full" if freeze is None else f"compact (freeze_modes_after={freeze})",
        "N": rec.layout.numel, "M": rec.num_modes, "log_every": log_every, "records_timed": len(rec_times),
        "record_ms": 1e3 * record_mean,
        "record_ms_of_logging_recorder": 1e3 * statistics.fmean(logged_rec),
        "per_record_log_ms": 1e3 * statistics.fmean(light) if light else None,
        "interval_log_ms": 1e3 * statistics.fmean(full) if full else None,
        "final_flush_ms": 1e3 * flush,
        "ratio_per_record_kind": (record_mean + statistics.fmean(light)) / record_mean if light else None,
        "ratio_interval_kind": (record_mean + statistics.fmean(full)) / record_mean if full else None,
        "ratio_amortised": (sum(logged_rec) + total_log) / sum(rec_times),
        "median_record_ms": 1e3 * med(rec_times), "median_per_record_log_ms": 1e3 * med(light),
        "median_interval_log_ms": 1e3 * med(full),
        "median_ratio_per_record_kind": (med(logged_rec) + med(light)) / med(rec_times),
        "median_ratio_interval_kind": (med(logged_rec) + med(full)) / med(rec_times),
        "median_ratio_amortised": amortised_median,
        "median_mode_summary_ms": 1e3 * med(summary), "mode_summary_in_records": med(summary) / med(rec_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(fig, freeze, args.records, args.modes, every)
            for fig, freeze, every in (("auto", None, args.log_every), ("native", None, args.log_every),
                                       ("auto", 3, args.log_every), ("auto", None, 50))]
    for r in rows:
        print(f"{r['form']:<32} figures={r['figures']:<6} N={r['N']} M={r['M']} log_every={r['log_every']:<3} "
              f"median: record {r['median_record_ms']:.3f} ms, per-record log {r['median_per_record_log_ms']:.3f} ms "
              f"(x{r['median_ratio_per_record_kind']:.2f}), interval log {r['median_interval_log_ms']:.2f} ms "
              f"(x{r['median_ratio_interval_kind']:.2f}), amortised x{r['median_ratio_amortised']:.2f} | "
              f"means: amortised x{r['ratio_amortised']:.2f} | mode_summary alone {r['median_mode_summary_ms']:.2f} ms "
              f"= {r['mode_summary_in_records']:.1f} records")
    if args.out:
        meta = {"command": "python benchmarks/bench_logging.py " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "threads": args.threads}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
