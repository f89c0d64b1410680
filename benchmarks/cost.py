"""Cost of one record: time and peak memory of the recorder against EMA, an optimizer step, the add_ floor
and a naive full-history approach, for N = 1e5, 1e6, 1e7 weights and M = 2, 10, 32 modes.

Every configuration runs in a fresh subprocess (clean peak RSS). Inside one process the operations are
timed interleaved, round after round (record, stats update only, EMA ``_foreach_lerp_``, SGD-momentum
step, Adam step, ``add_`` floor), so the ratios compare operations under the same background load;
each reported time is the median over rounds and each ratio the median of the per-round ratios, with
its interquartile range as the noise. The floor is one ``add_`` over a float32 tensor with as many
elements as the statistics (read + write once: the memory-bound limit of a statistics update).

Peak memory: ``ru_maxrss`` after the steady records minus the resident size before the recorder was built
(parameters and gradients exist already; CUDA: ``torch.cuda.max_memory_allocated``), in float32 per weight.
The peak is reset (``/proc/self/clear_refs``) after the warm-up and first tracking records, whose one-time
peak (clustering, the fit that freezes the modes) is reported apart as ``setup_peak_f32_per_weight``.

    python benchmarks/cost.py              # full grid, 1 thread
    python benchmarks/cost.py --quick      # smoke run (N = 1e4)
    python benchmarks/cost.py --headline   # N = 1e6, M = 10 only, 3 fresh processes each form
    python benchmarks/cost.py --headline --flush   # the same, every timed operation starting from memory
    python benchmarks/cost.py --profile    # torch.profiler table of one record at N = 1e6, M = 10
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FRACTIONS = (0.45, 0.001, 0.35, 0.001, 0.197, 0.001)  # four "layers" with weights and biases
FLUSH_BYTES = 128 << 20  # --flush: several times the last-level cache of the machines measured (docs/benchmarks.md)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux ≥ 4.0, /proc/self/clear_refs), so that the peak of the
    steady records is measured apart from one-time set-up peaks. False where the kernel refuses."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first, or they stay resident
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_params(N: int, device: str) -> list[torch.nn.Parameter]:
    sizes = [max(1, int(f * N)) for f in FRACTIONS]
    sizes[0] += N - sum(sizes)
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for n in sizes:  # filled in place: no temporaries that would raise the peak before the recorder
        p = torch.nn.Parameter(torch.empty(n, device=device).normal_(generator=g))
        p.grad = torch.empty_like(p).normal_(generator=g)
        params.append(p)
    return params


def perturb(params, t: int, chunks: int = 64):
    """In place, no temporaries: chunk j of every tensor moves by its own random step, so the
    warm-up history has many independent motions and the clustering finds the M modes asked for."""
    g = torch.Generator().manual_seed(1000 + t)
    with torch.no_grad():
        for p in params:
            for j, part in enumerate(p.chunk(chunks)):
                part.add_(float(torch.randn(1, generator=g)))


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


_LOADED: list = []


def _load_lazy_modules(device: str) -> None:
    """Run a tiny recorder and post-hoc fit once, so that libraries the recorder imports on first use
    (scipy's clustering, …) are resident before the baseline RSS is read and do not count as its memory."""
    from cmd_online import CMDRecorder, decompose

    if _LOADED:
        return
    _LOADED.append(device)
    params = make_params(4000, device)
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), modes=2, samples=500, warmup=4, freeze_modes_after=2)
    for t in range(7):
        perturb(params, t)
        rec.record()
    rec.trajectory()
    decompose(torch.randn(4000, 8).cumsum(1), modes=2, samples=500)


def worker(N: int, M: int, form: str, rounds: int, device: str, compile_update: bool, flush: bool = False) -> dict:
    """One configuration in this process: memory and time of the recorder in ``form`` against the others."""
    _load_lazy_modules(device)
    params = make_params(N, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_bytes(), (torch.cuda.memory_allocated() if device == "cuda" else 0)
    out = {"N": N, "M": M, "form": form + ("+compile" if compile_update else ""), "device": device, "rounds": rounds}
    if form == "naive":
        return _naive(out, params, M, device, base[0])
    rec, rec_times = _steady_recorder(out, params, M, form, rounds, device, compile_update, base)
    out["flush"] = flush
    times = _interleaved(_comparison_ops(rec, params, device), rounds, device, flush)
    times["record"] = rec_times + times["record"]
    out["times_s"] = {k: quartiles(v) for k, v in times.items()}
    out["ratios"] = {f"{num}/{den}": quartiles([a / b for a, b in zip(times[num][-rounds:], times[den])])
                     for num, den in [("record", "add_floor"), ("update", "add_floor"), ("record", "ema_lerp"),
                                      ("update", "ema_lerp"), ("record", "sgd_momentum_step"),
                                      ("record", "adam_step")]}
    return out


def _naive(out: dict, params, M: int, device: str, base_rss: int) -> dict:
    """Every record kept as a copy of the weights; post-hoc CMD of them at the end."""
    from cmd_online import decompose

    N, T = sum(p.numel() for p in params), 20
    history = []
    times = [timed(lambda: history.append(torch.cat([p.detach().reshape(-1) for p in params])), device)
             for _ in range(T)]
    out["record_s"] = quartiles(times[1:])
    out["records_kept"] = T
    out["peak_f32_per_weight"] = (peak_bytes() - base_rss) / (4 * N)
    W = torch.stack(history, 1)
    del history
    out["posthoc_fit_s"] = timed(lambda: decompose(W, modes=M, samples=min(1000, N)), device)
    out["peak_with_fit_f32_per_weight"] = (peak_bytes() - base_rss) / (4 * N)
    return out


def _steady_recorder(out: dict, params, M: int, form: str, rounds: int, device: str, compile_update: bool,
                     base: tuple[int, int]):
    """A recorder past its warm-up and first tracking records; its one-time and steady peak memory go into
    ``out``. Returns the recorder and the times of its steady records."""
    from cmd_online import CMDRecorder

    N, warmup = sum(p.numel() for p in params), 8
    base_rss, base_alloc = base
    kwargs = dict(modes=M, samples=min(1000, N), warmup=warmup)
    if form == "compact":
        kwargs["freeze_modes_after"] = 3  # frozen during the 3 warm records below, before timing
    if compile_update:
        kwargs["compile_update"] = True
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), **kwargs)  # lr 0: the timed steps leave the weights unchanged
    for t in range(warmup):
        perturb(params, t)
        rec.record()
    out["modes_found"] = rec.num_modes
    out["first_records_s"] = [timed(rec.record, device) for _ in range(3)]  # first tracking records (compile, freeze)
    # one-time peaks: clustering of the K × F history, the fit that freezes the modes (compact form)
    out["setup_peak_f32_per_weight"] = (peak_bytes() - base_rss) / (4 * N)
    out["hwm_reset"] = reset_peak()
    if device == "cuda":  # likewise the allocator's peak: the records' own from here on
        out["cuda_setup_peak_f32_per_weight"] = (torch.cuda.max_memory_allocated() - base_alloc) / (4 * N)
        torch.cuda.reset_peak_memory_stats()
    rec_times = [timed(rec.record, device) for _ in range(max(3, rounds // 2))]
    out["peak_f32_per_weight"] = (peak_bytes() - base_rss) / (4 * N)
    if device == "cuda":
        out["cuda_peak_f32_per_weight"] = (torch.cuda.max_memory_allocated() - base_alloc) / (4 * N)
    nb = rec.nbytes()
    out["stats_f32_per_weight"] = nb["statistics"] / (4 * N)
    out["recorder_f32_per_weight"] = nb["total"] / (4 * N)
    return rec, rec_times


def _comparison_ops(rec, params, device: str) -> dict:
    """The operations timed against each other; those besides the record are allocated only now, so that
    they do not count in the recorder's peak."""
    floor_buf = torch.zeros(rec.nbytes()["statistics"] // 4, device=device)
    ema = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=0.0, momentum=0.9, foreach=True)
    adam = torch.optim.Adam(params, lr=0.0, foreach=True)
    sgd.step()
    adam.step()  # state allocated outside the timing
    weights = rec._local_weights()
    refs = torch.zeros(rec.num_modes, device=device)
    return {
        "record": rec.record,
        "update": lambda: rec._stats.update(weights, refs),
        "ema_lerp": lambda: torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001),
        "sgd_momentum_step": sgd.step,
        "adam_step": adam.step,
        "add_floor": lambda: floor_buf.add_(1.0),
    }


def _interleaved(ops: dict, rounds: int, device: str, flush: bool) -> dict[str, list[float]]:
    """Times of each operation, run one after another, round after round. With ``flush``, a buffer larger
    than the last-level cache is read before each (clean lines, no write-backs), so that every operation
    starts from memory, as after a forward and backward pass."""
    flush_buf = torch.ones(FLUSH_BYTES // 4, device=device) if flush else None
    times = {k: [] for k in ops}
    for _ in range(rounds):
        for k, fn in ops.items():
            if flush_buf is not None:
                flush_buf.sum()
            times[k].append(timed(fn, device))
    return times


def spawn(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def rounds_for(N: int, quick: bool) -> int:
    if quick:
        return 3
    return 40 if N <= 1e5 else 15 if N <= 1e6 else 5


def markdown(rows) -> str:
    lines = ["| N | M | form | record ms | update ms | add_ floor ms | EMA lerp ms | SGD-m step ms | Adam step ms | "
             "record/floor | record/EMA | peak f32/weight (steady) | set-up peak | stats f32/weight |",
             "|" + "---|" * 14]
    for r in rows:
        if r["form"] == "naive":
            continue
        t, q = r["times_s"], r["ratios"]
        ms = lambda k: f"{1e3 * t[k]['median']:.3g}"  # noqa: E731
        rq = lambda k: f"{q[k]['median']:.2f} [{q[k]['q1']:.2f}, {q[k]['q3']:.2f}]"  # noqa: E731
        lines.append(f"| {r['N']:.0e} | {r['M']} | {r['form']} | {ms('record')} | {ms('update')} | {ms('add_floor')} | "
                     f"{ms('ema_lerp')} | {ms('sgd_momentum_step')} | {ms('adam_step')} | {rq('record/add_floor')} | "
                     f"{rq('record/ema_lerp')} | {r['peak_f32_per_weight']:.2f} | {r['setup_peak_f32_per_weight']:.2f} | "
                     f"{r['stats_f32_per_weight']:.2f} |")
    naive = [r for r in rows if r["form"] == "naive"]
    if naive:
        lines += ["", "| N | naive: record ms (copy) | peak f32/weight after 20 records | post-hoc fit s (M) |",
                  "|---|---|---|---|"]
        for r in naive:
            lines.append(f"| {r['N']:.0e} | {1e3 * r['record_s']['median']:.3g} | {r['peak_f32_per_weight']:.1f} | "
                         f"{r['posthoc_fit_s']:.2f} ({r['M']}) |")
    return "\n".join(lines)


def linearity(rows) -> dict:
    """Median update time per (N · (M + 3)) full / (N · 4) compact element: flat when cost is linear."""
    out = {}
    for r in rows:
        if r["form"] in ("full", "compact"):
            elems = r["N"] * ((r["M"] + 3) if r["form"] == "full" else 4)
            out[f"{r['form']} N={r['N']:.0e} M={r['M']}"] = 1e9 * r["times_s"]["update"]["median"] / elems
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N = 1e4, M = 2, few rounds")
    p.add_argument("--headline", action="store_true", help="N = 1e6, M = 10, full and compact, 3 processes each")
    p.add_argument("--profile", action="store_true", help="profile one record at N = 1e6, M = 10 (full, compact)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also measure CMDRecorder(compile_update=True)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per form with --headline (default 3)")
    p.add_argument("--flush", action="store_true",
                   help="evict the caches before every timed operation (each starts from memory)")
    p.add_argument("--worker", nargs=4, metavar=("N", "M", "FORM", "ROUNDS"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        N, M, form, rounds = int(float(a.worker[0])), int(a.worker[1]), a.worker[2], int(a.worker[3])
        compile_update = form.endswith("+compile")
        print(json.dumps(worker(N, M, form.replace("+compile", ""), rounds, a.device, compile_update, a.flush)))
        return None
    if a.profile:
        return profile(a)
    from cmd_online import CMDRecorder

    forms = ["full", "compact"]
    if a.compile:
        if "compile_update" in inspect.signature(CMDRecorder.__init__).parameters:
            forms += ["full+compile", "compact+compile"]
        else:
            print("CMDRecorder has no compile_update option in this version: not measured", file=sys.stderr)
    if a.quick:
        grid, naive = [(10_000, 2)], [(10_000, 2)]
    elif a.headline:
        grid, naive = [(1_000_000, 10)] * a.repeats, []
    else:
        grid = [(N, M) for N in (100_000, 1_000_000, 10_000_000) for M in (2, 10, 32)]
        naive = [(N, 10) for N in (100_000, 1_000_000, 10_000_000)]
    rows = []
    for N, M in grid:
        for form in forms:
            if a.quick:  # in-process: a smoke run checks the code path, not a clean peak RSS
                rows.append(worker(N, M, form.replace("+compile", ""), 3, a.device, form.endswith("+compile"),
                                   a.flush))
            else:
                rows.append(spawn([str(N), str(M), form, str(rounds_for(N, a.quick)), "--device", a.device,
                                   "--threads", str(a.threads)] + (["--flush"] if a.flush else [])))
            r = rows[-1]
            print(f"N={N:.0e} M={M} {form}: record {1e3 * r['times_s']['record']['median']:.3g} ms, "
                  f"record/floor {r['ratios']['record/add_floor']['median']:.2f}, "
                  f"record/EMA {r['ratios']['record/ema_lerp']['median']:.2f}, "
                  f"peak {r['peak_f32_per_weight']:.2f} f32/weight", flush=True)
    for N, M in naive:
        rows.append(worker(N, M, "naive", 0, a.device, False) if a.quick else
                    spawn([str(N), str(M), "naive", "0", "--device", a.device, "--threads", str(a.threads)]))
    md = markdown(rows)
    print(md)
    name = "cost_quick" if a.quick else "cost_headline" if a.headline else "cost"
    name += "_flush" if a.flush else ""
    name += "_cuda" if a.device == "cuda" else ""
    common.write_json(name + ".json", dict(settings=dict(threads=a.threads, device=a.device, fractions=FRACTIONS,
                                                         flush=a.flush),
                                           env=common.environment(), runs=rows, ns_per_element=linearity(rows)),
                      a.out)
    return rows


def profile(a):
    """Where the time of one record goes (torch.profiler, CPU), full and compact, N = 1e6, M = 10."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from cmd_online import CMDRecorder

    text = []
    for form in ("full", "compact"):
        params = make_params(1_000_000, a.device)
        kw = dict(modes=10, samples=1000, warmup=8, **({"freeze_modes_after": 1} if form == "compact" else {}))
        rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), **kw)
        for t in range(12):
            perturb(params, t)
            rec.record()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                rec.record()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        text.append(f"## {form} form, N = 1e6, M = 10, 10 records, threads = {a.threads}\n{table}")
        print(text[-1])
    path = os.path.join(a.out or common.RESULTS, "cost_profile.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(text))
    return text


if __name__ == "__main__":
    main()
