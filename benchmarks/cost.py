"""Cost of a record and of a query: time and memory of the recorder against the add_ floor, EMA, optimizer
steps and a naive full-history approach, for N = 1e5, 1e6, 1e7 weights and M = 2, 10, 32 modes.

Every configuration runs in a fresh subprocess (clean peak RSS) and uses only the public API. Inside one
process the operations are timed interleaved, round after round: the add_ floor, an EMA ``_foreach_lerp_``,
an SGD-momentum and an Adam step, ``rec.moments.update`` alone, and ``rec.record()`` followed by each query
(``cmd_parameters``, ``swapped`` entered and left, ``cmd_state_dict``, ``export`` to a file,
``trajectory()``), each query right after a record of its own. Each reported time is the median over rounds
and each ratio the median of the per-round ratios (a query against the record just before it), with its
interquartile range as the noise. The floor is one ``add_`` over a float32 tensor of (M + 3)·N elements
(full form: its statistics, read and written once) or 3·N (compact form: the floor docs/benchmarks.md
sets for a compact record).

Memory, in float32 per weight (4·N bytes), from the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) above the resident size before the recorder was built:

- held: ``rec.nbytes()``, statistics + scratch;
- setup peak: the warm-up and its clustering;
- full steady peak: one full-form record after the first ones; freeze peak: the record that freezes the modes
  (compact form, ``freeze_modes_after=4``, in the same process as its full steady peak);
- steady peak: the records that are timed;
- each query's extra peak: its peak above the resident size just before it, with what it returns or must hold
  (the CMD weights; ``swapped``: the saved trained weights; ``trajectory``: a, b, modes, references) apart.

    python benchmarks/cost.py                      # full grid, 1 thread, eager ("blocks") kernel
    python benchmarks/cost.py --kernels blocks,compiled
    python benchmarks/cost.py --quick              # smoke run (N = 1e4, in process)
    python benchmarks/cost.py --headline           # N = 1e6, M = 10 only, 3 fresh processes each form
    python benchmarks/cost.py --cases 4e6:10,1e7:10 --repeats 1 --out-name cost_large
    python benchmarks/cost.py --headline --flush   # every timed operation starting from memory
    python benchmarks/cost.py --profile            # torch.profiler tables of records and queries
    python benchmarks/cost.py --summary            # default vs full form at N = 1e6, 1e7 + the transformer LM
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = (0.45, 0.001, 0.35, 0.001, 0.197, 0.001)  # four "layers" with weights and biases
FLUSH_BYTES = 128 << 20  # --flush: several times the last-level cache of the machines measured (docs/benchmarks.md)
FREEZE_AFTER = 4  # compact form: records 2 and 3 of the window are full-form records, record 4 freezes
QUERIES = ("cmd_parameters", "swapped", "cmd_state_dict", "export", "trajectory")
MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """The process's peak resident size since the last :func:`reset_peak` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux ≥ 4.0, /proc/self/clear_refs), so that the peak of one
    operation is measured apart from earlier ones. False where the kernel refuses."""
    gc.collect()
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


def _shape(n: int, matrix: bool) -> tuple[int, ...]:
    """A layer's weight as a matrix of at most 1024 columns (as a Linear's), a bias as a vector: a state
    keeps one row marker (int64) per first-dimension row of each parameter (docs/concepts.md)."""
    if not matrix:
        return (n,)
    cols = next(c for c in range(min(n, 1024), 0, -1) if n % c == 0)
    return (n // cols, cols)


def make_params(N: int, device: str) -> list[torch.nn.Parameter]:
    sizes = [max(1, int(f * N)) for f in FRACTIONS]
    sizes[0] += N - sum(sizes)
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for i, n in enumerate(sizes):  # filled in place: no temporaries that would raise the peak before the recorder
        p = torch.nn.Parameter(torch.empty(_shape(n, i % 2 == 0), device=device).normal_(generator=g))
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
    """Run a tiny recorder, its queries and a post-hoc fit once, so that libraries imported on first use
    (scipy's clustering, …) are resident before the baseline RSS is read and do not count as its memory."""
    from cmd_online import CMDRecorder, decompose

    if _LOADED:
        return
    _LOADED.append(device)
    params = make_params(4000, device)
    model = torch.nn.ParameterList(params)
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), model, modes=2, samples=500, warmup=4, freeze_modes_after=3)
    for t in range(8):
        perturb(params, t)
        rec.record()
    with tempfile.TemporaryDirectory(dir=_scratch_dir()) as d:
        for query in _queries(rec, os.path.join(d, "cmd.pt")).values():
            query()
    decompose(torch.randn(4000, 8).cumsum(1), modes=2, samples=500)
    rec.close()


def _scratch_dir() -> str | None:
    """Where ``export`` writes: a RAM file system if there is one, so that the disk's speed is not measured."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _queries(rec, path: str) -> dict:
    def swapped():
        with rec.swapped():
            pass

    return {"cmd_parameters": rec.cmd_parameters, "swapped": swapped, "cmd_state_dict": rec.cmd_state_dict,
            "export": lambda: rec.export(path), "trajectory": rec.trajectory}


def worker(N: int, M: int, form: str, rounds: int, device: str, kernel: str | None = None, flush: bool = False,
           queries: bool = True) -> dict:
    """One configuration in this process: memory and time of the recorder in ``form`` against the others."""
    _load_lazy_modules(device)
    params = make_params(N, device)
    model = torch.nn.ParameterList(params)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    base = rss_bytes(), (torch.cuda.memory_allocated() if device == "cuda" else 0)
    out = {"N": N, "M": M, "form": form, "kernel": kernel, "device": device, "rounds": rounds, "flush": flush}
    if form == "naive":
        return _naive(out, params, M, device, base[0])
    rec, rec_times = _steady_recorder(out, params, model, M, form, kernel, rounds, device, base)
    with tempfile.TemporaryDirectory(dir=_scratch_dir()) as scratch:
        path = os.path.join(scratch, "cmd.pt")
        if queries:
            out["query_memory"] = _query_memory(rec, params, _queries(rec, path), device)
        order = _comparison_ops(rec, params, device, form, _queries(rec, path) if queries else {})
        rounds_seen = _interleaved(order, rounds, device, flush)
    times = {name: [t for seen in rounds_seen for n, t in seen if n == name] for name, _ in order}
    times["record"] = rec_times + times["record"]
    out["times_s"] = {k: quartiles(v) for k, v in times.items()}
    per_round = {name: [dict(seen)[name] for seen in rounds_seen] for name in ("add_floor", "ema_lerp", "adam_step",
                                                                                "update")}
    records = [[t for n, t in seen if n == "record"] for seen in rounds_seen]
    first_record = [r[0] for r in records]
    ratios = {"record/add_floor": [r / f for r, f in zip(first_record, per_round["add_floor"])],
              "update/add_floor": [u / f for u, f in zip(per_round["update"], per_round["add_floor"])],
              "record/ema_lerp": [r / e for r, e in zip(first_record, per_round["ema_lerp"])],
              "record/adam_step": [r / a for r, a in zip(first_record, per_round["adam_step"])]}
    for seen in rounds_seen:  # each query against the record right before it
        for (before, t0), (name, t1) in zip(seen, seen[1:]):
            if name in QUERIES and before == "record":
                ratios.setdefault(f"{name}/record", []).append(t1 / t0)
    out["ratios"] = {k: quartiles(v) for k, v in ratios.items()}
    rec.close()
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


def _steady_recorder(out: dict, params, model, M: int, form: str, kernel: str, rounds: int, device: str,
                     base: tuple[int, int]):
    """A recorder past its warm-up and first tracking records; its memory goes into ``out``. Returns the
    recorder and the times of its steady records."""
    from cmd_online import CMDRecorder

    N, warmup = sum(p.numel() for p in params), 8
    base_rss, base_alloc = base
    per_weight = lambda nbytes: nbytes / (4 * N)  # noqa: E731
    kwargs = dict(modes=M, samples=min(1000, N), warmup=warmup, kernel=kernel)
    if form != "default":  # "default": the library's own default form
        kwargs["freeze_modes_after"] = FREEZE_AFTER if form == "compact" else None
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), model, **kwargs)  # lr 0: timed steps leave the weights
    for t in range(warmup):
        perturb(params, t)
        rec.record()
    out["modes_found"] = rec.num_modes
    out["kernel"], out["kernel_is_default"] = rec.moments.kernel, kernel is None
    out["setup_peak_f32_per_weight"] = per_weight(peak_bytes() - base_rss)  # the clustering of the K × F history
    out["hwm_reset"] = reset_peak()
    held = []  # what the recorder holds after every record from the end of the warm-up on
    out["first_records_s"] = [timed(rec.record, device)]  # record 2 of the window (a compile happens here)
    held.append(rec.nbytes()["total"])
    out["first_tracking_peak_f32_per_weight"] = per_weight(peak_bytes() - base_rss)
    reset_peak()
    out["first_records_s"].append(timed(rec.record, device))  # record 3: the default form freezes here
    held.append(rec.nbytes()["total"])
    out["full_steady_peak_f32_per_weight"] = per_weight(peak_bytes() - base_rss)
    reset_peak()
    out["first_records_s"].append(timed(rec.record, device))  # record 4: the compact form freezes here
    held.append(rec.nbytes()["total"])
    if form == "compact":
        out["freeze_peak_f32_per_weight"] = per_weight(peak_bytes() - base_rss)
        out["freeze_excess_f32_per_weight"] = out["freeze_peak_f32_per_weight"] - out["full_steady_peak_f32_per_weight"]
        out["freeze_excess_mib"] = out["freeze_excess_f32_per_weight"] * 4 * N / MIB
    out["compact_after_freeze"] = rec.moments.compact
    out["first_records_s"].append(timed(rec.record, device))  # the first compact record (a compile happens here)
    if device == "cuda":  # the allocator's peak: the records' own from here on
        out["cuda_setup_peak_f32_per_weight"] = per_weight(torch.cuda.max_memory_allocated() - base_alloc)
        torch.cuda.reset_peak_memory_stats()
    held.append(rec.nbytes()["total"])
    reset_peak()
    rec_times = [timed(rec.record, device) for _ in range(max(3, rounds // 2))]
    out["peak_f32_per_weight"] = per_weight(peak_bytes() - base_rss)
    held.append(rec.nbytes()["total"])
    out["held_max_f32_per_weight"] = per_weight(max(held))
    out["after_warmup_peak_f32_per_weight"] = max(out[k] for k in ("first_tracking_peak_f32_per_weight", "full_steady_peak_f32_per_weight",
                                                                  "freeze_peak_f32_per_weight", "peak_f32_per_weight")
                                                  if k in out)
    out.update(_state_size(rec, N))
    if device == "cuda":
        out["cuda_peak_f32_per_weight"] = per_weight(torch.cuda.max_memory_allocated() - base_alloc)
    nb = rec.nbytes()
    out["stats_f32_per_weight"] = per_weight(nb["statistics"])
    out["scratch_f32_per_weight"] = per_weight(nb["scratch"])
    out["held_f32_per_weight"] = per_weight(nb["statistics"] + nb["scratch"])
    out["recorder_f32_per_weight"] = per_weight(nb["total"])
    return rec, rec_times


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested state (DTensors by their local part) plus packed bytes."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _state_size(rec, N: int) -> dict:
    """The recorder's ``state_dict()``: its bytes in memory and as a ``torch.save`` file, against the float32 model's."""
    state = rec.state_dict()
    with tempfile.TemporaryDirectory(dir=_scratch_dir()) as d:
        path = os.path.join(d, "state.pt")
        torch.save(state, path)
        file_bytes = os.path.getsize(path)
    return {"state_bytes": _tensor_bytes(state), "state_file_bytes": file_bytes, "model_bytes": 4 * N,
            "state_over_model": _tensor_bytes(state) / (4 * N), "state_file_over_model": file_bytes / (4 * N)}


def _output_bytes(name: str, result, params) -> int:
    """What a query returns, or must hold by its design: the part of its memory that is N-sized on purpose."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    if name == "trajectory":
        return sum(size(t) for t in (result.a, result.b, result.modes, result.references))
    return sum(size(p) for p in params)  # the CMD weights; swapped(): the saved trained weights


def _query_memory(rec, params, queries: dict, device: str) -> dict:
    """Each query's extra peak above the resident size just before it, right after a record."""
    N = sum(p.numel() for p in params)
    out = {}
    for name, query in queries.items():
        rec.record()
        reset_peak()
        before = rss_bytes()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before_alloc = torch.cuda.memory_allocated()
        result = query()
        extra = peak_bytes() - before
        output = _output_bytes(name, result, params)
        out[name] = {"extra_peak_f32_per_weight": extra / (4 * N), "output_f32_per_weight": output / (4 * N),
                     "extra_peak_mib": extra / MIB, "beyond_output_mib": (extra - output) / MIB}
        if device == "cuda":
            out[name]["cuda_extra_peak_f32_per_weight"] = (torch.cuda.max_memory_allocated() - before_alloc) / (4 * N)
        del result
    return out


def _comparison_ops(rec, params, device: str, form: str, queries: dict) -> list[tuple[str, object]]:
    """The operations of one round, in order; those besides the recorder's are allocated only now, so that
    they do not count in its memory. Every query comes right after a record."""
    N = sum(p.numel() for p in params)
    floor_buf = torch.zeros(N * (3 if rec.moments.compact else rec.num_modes + 3), device=device)
    ema = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=0.0, momentum=0.9, foreach=True)
    adam = torch.optim.Adam(params, lr=0.0, foreach=True)
    sgd.step()
    adam.step()  # state allocated outside the timing
    weights = [p.detach().reshape(-1) for p in params]
    refs = rec.references[:, -1].clone()  # the reference values of the last record
    order = [("add_floor", lambda: floor_buf.add_(1.0)),
             ("ema_lerp", lambda: torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)),
             ("sgd_momentum_step", sgd.step), ("adam_step", adam.step),
             ("update", lambda: rec.moments.update(weights, refs)),
             ("record", rec.record)]
    for name, query in queries.items():
        order += [(name, query), ("record", rec.record)]
    return order


def _interleaved(order: list, rounds: int, device: str, flush: bool) -> list[list[tuple[str, float]]]:
    """(name, time) of each operation, run one after another, round after round. With ``flush``, a buffer larger
    than the last-level cache is read before each (clean lines, no write-backs), so that every operation
    starts from memory, as after a forward and backward pass."""
    flush_buf = torch.ones(FLUSH_BYTES // 4, device=device) if flush else None
    seen = []
    for _ in range(rounds):
        this = []
        for name, fn in order:
            if flush_buf is not None:
                flush_buf.sum()
            this.append((name, timed(fn, device)))
        seen.append(this)
    return seen


def spawn(args: list[str], cold_compile: bool = False) -> dict:
    """A worker in a fresh process that imports this checkout's cmd_online (with ``cold_compile``, an empty
    torch.compile cache, so that its first records show the whole one-time compile)."""
    env = dict(os.environ)
    if cold_compile:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cost_inductor_")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def rounds_for(N: int, quick: bool) -> int:
    if quick:
        return 3
    return 40 if N <= 1e5 else 15 if N <= 1e6 else 9 if N <= 4e6 else 5


def _label(r, numbered: bool = False) -> str:
    """The form, its kernel where not the default, and with ``numbered`` the fresh process it ran in."""
    return (r["form"] + ("" if r.get("kernel_is_default", True) else f" ({r['kernel']})")
            + (f" #{r['process']}" if numbered and "process" in r else ""))


def markdown(rows) -> str:
    """Three tables: record time against the floors, queries against the record, memory."""
    recs = [r for r in rows if r["form"] != "naive"]
    numbered = any(r.get("process", 1) > 1 for r in recs)  # several processes per configuration: say which
    ms = lambda r, k: f"{1e3 * r['times_s'][k]['median']:.3g}"  # noqa: E731

    def rq(r, k):
        q = r["ratios"].get(k)
        return "" if q is None else f"{q['median']:.2f} [{q['q1']:.2f}, {q['q3']:.2f}]"

    lines = ["| N | M | form | record ms | update ms | floor ms | EMA ms | Adam ms | record/floor | update/floor | "
             "record/EMA |", "|" + "---|" * 11]
    for r in recs:
        lines.append(f"| {r['N']:.0e} | {r['M']} | {_label(r, numbered)} | {ms(r, 'record')} | {ms(r, 'update')} | "
                     f"{ms(r, 'add_floor')} | {ms(r, 'ema_lerp')} | {ms(r, 'adam_step')} | "
                     f"{rq(r, 'record/add_floor')} | {rq(r, 'update/add_floor')} | {rq(r, 'record/ema_lerp')} |")
    with_queries = [r for r in recs if "query_memory" in r]
    if with_queries:
        lines += ["", "| N | M | form | " + " | ".join(f"{q} ms (/record)" for q in QUERIES) + " |",
                  "|" + "---|" * (3 + len(QUERIES))]
        for r in with_queries:
            cells = [f"{ms(r, q)} ({rq(r, q + '/record')})" for q in QUERIES]
            lines.append(f"| {r['N']:.0e} | {r['M']} | {_label(r, numbered)} | " + " | ".join(cells) + " |")
        lines += ["", "| N | M | form | " + " | ".join(f"{q}: extra peak f32/w (MiB beyond output)" for q in QUERIES)
                  + " |", "|" + "---|" * (3 + len(QUERIES))]
        for r in with_queries:
            m = r["query_memory"]
            cells = [f"{m[q]['extra_peak_f32_per_weight']:.2f} ({m[q]['beyond_output_mib']:.1f})" for q in QUERIES]
            lines.append(f"| {r['N']:.0e} | {r['M']} | {_label(r, numbered)} | " + " | ".join(cells) + " |")
    lines += ["", "| N | M | form | held f32/weight (stats + scratch) | steady peak | full steady peak | freeze peak | "
              "freeze − full steady | set-up peak | first records s (2nd, 3rd, 4th, 5th of the window) |",
              "|" + "---|" * 10]
    for r in recs:
        freeze = ("| | |" if "freeze_peak_f32_per_weight" not in r else
                  f"| {r['freeze_peak_f32_per_weight']:.2f} | {r['freeze_excess_f32_per_weight']:.2f} "
                  f"({r['freeze_excess_mib']:.1f} MiB) |")
        lines.append(f"| {r['N']:.0e} | {r['M']} | {_label(r, numbered)} | {r['held_f32_per_weight']:.2f} "
                     f"({r['stats_f32_per_weight']:.2f} + {r['scratch_f32_per_weight']:.2f}) | "
                     f"{r['peak_f32_per_weight']:.2f} | {r['full_steady_peak_f32_per_weight']:.2f} {freeze} "
                     f"{r['setup_peak_f32_per_weight']:.2f} | {', '.join(f'{t:.3g}' for t in r['first_records_s'])} |")
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
            out[f"{_label(r)} N={r['N']:.0e} M={r['M']}"] = 1e9 * r["times_s"]["update"]["median"] / elems
    return out


def provenance() -> dict:
    """Which cmd_online was measured: its file and this checkout's commit (with uncommitted changes or not)."""
    import cmd_online

    out = {"cmd_online": os.path.dirname(os.path.abspath(cmd_online.__file__))}
    try:
        git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        out["commit"] = git("rev-parse", "HEAD")
        out["library_changed_since_commit"] = bool(git("status", "--porcelain", "cmd_online"))
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N = 1e4, M = 2, few rounds, in process")
    p.add_argument("--headline", action="store_true", help="N = 1e6, M = 10 only, --repeats processes each form")
    p.add_argument("--summary", action="store_true",
                   help="the adoption figures: memory and state size of the default and the full form at "
                        "--sizes, and the per-step overhead on a small transformer LM against an EMA")
    p.add_argument("--sizes", default="1e6,1e7", help="--summary: the N to measure (default 1e6,1e7)")
    p.add_argument("--cases", default=None, help="N:M pairs, e.g. 4e6:10,1e7:10 (default: the grid)")
    p.add_argument("--forms", default="full,compact", help="forms to measure (default full,compact)")
    p.add_argument("--kernels", default="default",
                   help="recorder kernels: default (the device's), blocks, flat, compiled; e.g. default,compiled")
    p.add_argument("--compile", action="store_true", help="also measure kernel='compiled'")
    p.add_argument("--no-queries", action="store_true", help="time the records only")
    p.add_argument("--cold-compile", action="store_true", help="an empty torch.compile cache in every worker")
    p.add_argument("--naive", action="store_true", help="with --cases: also the naive full history")
    p.add_argument("--profile", action="store_true", help="profile records and queries (results/cost_profile.txt)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print the tables of a results file written by an earlier run, and exit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration (headline: 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default by N)")
    p.add_argument("--flush", action="store_true",
                   help="evict the caches before every timed operation (each starts from memory)")
    p.add_argument("--worker", nargs=4, metavar=("N", "M", "FORM", "ROUNDS"), help=argparse.SUPPRESS)
    p.add_argument("--kernel", default="default", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="directory of the JSON (default benchmarks/results)")
    p.add_argument("--out-name", default=None, help="name of the JSON, without .json")
    return p.parse_args(argv)


def plan(a: argparse.Namespace) -> tuple[list, list, int]:
    """The (N, M) configurations to measure, those of the naive full history, and processes per configuration."""
    if a.quick:
        return [(10_000, 2)], [(10_000, 2)], 1
    if a.headline:
        return [(1_000_000, 10)], [], a.repeats or 3
    if a.cases:
        grid = [(int(float(n)), int(m)) for n, m in (c.split(":") for c in a.cases.split(","))]
        return grid, ([(n, 10) for n in sorted({n for n, _ in grid})] if a.naive else []), a.repeats or 1
    grid = [(N, M) for N in (100_000, 1_000_000, 10_000_000) for M in (2, 10, 32)]
    return grid, [(N, 10) for N in (100_000, 1_000_000, 10_000_000)], a.repeats or 1


def measure(a: argparse.Namespace, N: int, M: int, form: str, kernel: str) -> dict:
    """One configuration: in this process for --quick (a smoke run checks the code path, not a clean peak
    RSS), else in a fresh one."""
    rounds = a.rounds or rounds_for(N, a.quick)
    if a.quick:
        return worker(N, M, form, rounds, a.device, None if kernel == "default" else kernel, a.flush, not a.no_queries)
    return spawn([str(N), str(M), form, str(rounds), "--kernel", kernel, "--device", a.device,
                  "--threads", str(a.threads)] + (["--flush"] if a.flush else [])
                 + (["--no-queries"] if a.no_queries else []), a.cold_compile)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        N, M, form, rounds = int(float(a.worker[0])), int(a.worker[1]), a.worker[2], int(a.worker[3])
        kernel = None if a.kernel == "default" else a.kernel
        print(json.dumps(worker(N, M, form, rounds, a.device, kernel, a.flush, not a.no_queries)))
        return None
    if a.render:
        with open(a.render) as f:
            rows = json.load(f)["runs"]
        print(markdown(rows))
        return rows
    if a.profile:
        return profile(a)
    if a.summary:
        return summary(a)
    kernels = a.kernels.split(",") + (["compiled"] if a.compile and "compiled" not in a.kernels else [])
    forms = a.forms.split(",")
    grid, naive, repeats = plan(a)
    rows, started = [], time.time()
    for N, M in grid:
        for form in forms:
            for kernel in kernels:
                for repeat in range(repeats):
                    r = measure(a, N, M, form, kernel)
                    r["process"] = repeat + 1
                    rows.append(r)
                    query = (f", cmd_parameters/record {r['ratios']['cmd_parameters/record']['median']:.2f}"
                             if "cmd_parameters/record" in r["ratios"] else "")
                    print(f"N={N:.0e} M={M} {_label(r)} #{repeat + 1}: record "
                          f"{1e3 * r['times_s']['record']['median']:.3g} ms, "
                          f"record/floor {r['ratios']['record/add_floor']['median']:.2f}{query}, held "
                          f"{r['held_f32_per_weight']:.2f}, steady peak {r['peak_f32_per_weight']:.2f} f32/weight "
                          f"[{time.time() - started:.0f} s]", flush=True)
    for N, M in naive:
        rows.append(worker(N, M, "naive", 0, a.device) if a.quick else
                    spawn([str(N), str(M), "naive", "0", "--device", a.device, "--threads", str(a.threads)]))
    print(markdown(rows))
    print(f"wall time {time.time() - started:.0f} s")
    name = a.out_name or ("cost_quick" if a.quick else "cost_headline" if a.headline else "cost")
    if not a.out_name:
        name += ("_flush" if a.flush else "") + ("_cuda" if a.device == "cuda" else "")
    settings = dict(threads=a.threads, device=a.device, fractions=FRACTIONS, flush=a.flush, kernels=kernels,
                    cold_compile=a.cold_compile,
                    forms=forms, freeze_modes_after=FREEZE_AFTER, argv=sys.argv[1:] if argv is None else argv,
                    wall_s=round(time.time() - started), load_average=os.getloadavg())
    common.write_json(name + ".json", dict(settings=settings, env={**common.environment(), **provenance()}, runs=rows,
                                           ns_per_element=linearity(rows)), a.out)
    return rows


def summary(a):
    """The figures of issue 23 in one run: for the default and the full form (M = 10), the most the recorder
    holds after any record past the warm-up (``nbytes()``), its peak RSS above the model's over those records,
    its ``state_dict()`` against the model's bytes, a record against its byte floor; then the per-step overhead
    on a small transformer LM of the default, the full form and an ``AveragedModel`` EMA
    (``benchmarks/lm_overhead.py``), each in a fresh process."""
    started, rows = time.time(), []
    for N in (int(float(n)) for n in a.sizes.split(",")):
        for form in ("default", "full"):
            rounds = a.rounds or (9 if N <= 1e6 else 5)
            r = spawn([str(N), "10", form, str(rounds), "--device", a.device, "--threads", str(a.threads),
                       "--no-queries"])
            r["tensor_peak_f32_per_weight"] = tensor_peak(N, form, a.device)
            rows.append(r)
            print(f"N={N:.0e} {form}: held ≤ {r['held_max_f32_per_weight']:.2f}, peak after the warm-up "
                  f"{r['tensor_peak_f32_per_weight']:.2f} f32/weight (tensors; "
                  f"{r['after_warmup_peak_f32_per_weight']:.2f} RSS), state {r['state_over_model']:.2f}× the "
                  f"model [{time.time() - started:.0f} s]", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]))
    lm_cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "lm_overhead.py"), "--json", "--threads",
              str(a.threads)] + (["--rounds", str(a.rounds)] if a.rounds else [])
    res = subprocess.run(lm_cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"lm_overhead failed:\n{res.stderr[-3000:]}")
    lm = json.loads(res.stdout.strip().splitlines()[-1])
    import lm_overhead  # noqa: E402 - beside this file

    lines = ["| N | form | held f32/weight, most after the warm-up | peak f32/weight after the warm-up: tensors "
             "(RSS) | state_dict / model bytes (file) | record ms | record / its byte floor |", "|" + "---|" * 7]
    for r in rows:
        q = r["ratios"]["record/add_floor"]
        lines.append(f"| {r['N']:.0e} | {r['form']} | {r['held_max_f32_per_weight']:.2f} | "
                     f"{r['tensor_peak_f32_per_weight']:.2f} ({r['after_warmup_peak_f32_per_weight']:.2f}) | "
                     f"{r['state_over_model']:.2f} "
                     f"({r['state_file_over_model']:.2f}) | {1e3 * r['times_s']['record']['median']:.3g} | "
                     f"{q['median']:.2f} [{q['q1']:.2f}, {q['q3']:.2f}] |")
    text = "\n".join(lines) + "\n\n" + lm_overhead.table(lm)
    print(text)
    print(f"wall time {time.time() - started:.0f} s")
    settings = dict(threads=a.threads, device=a.device, sizes=a.sizes, argv=sys.argv[1:],
                    wall_s=round(time.time() - started), load_average=os.getloadavg())
    common.write_json((a.out_name or "cost_summary") + ".json",
                      dict(settings=settings, env={**common.environment(), **provenance()}, runs=rows, lm=lm), a.out)
    return rows, lm


def tensor_peak(N: int, form: str, device: str) -> float:
    """The most the recorder holds at any moment after the warm-up, in float32 per weight: before each record
    from the warm-up's end on, plus the tensors the record creates that are alive at once
    (``benchmarks/live_bytes.py``; the resident size also holds library code and the allocator's free
    lists, about 10 MB whatever N on this machine)."""
    from cmd_online import CMDRecorder
    from live_bytes import recorder_peaks

    params, warmup = make_params(N, device), 8
    kwargs = {} if form == "default" else {"freeze_modes_after": None}
    rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), modes=10, samples=min(1000, N), warmup=warmup, **kwargs)
    peaks = []
    for t in range(warmup + 6):  # the warm-up's end, the snapshots and the freeze (default), compact records
        perturb(params, t)
        before, added = recorder_peaks(rec, rec.record)
        if rec.phase == "tracking":
            peaks.append((before + added) / (4 * N))
    rec.close()
    return max(peaks)


def profile(a):
    """Where the time of a record and of a query goes (torch.profiler, CPU), M = 10: records of the full and
    the compact form at N = 1e6, the compact record at N = 1e7, and cmd_parameters and trajectory() at 1e6
    (each query's second call, right after a record)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from cmd_online import CMDRecorder

    text = []

    def table(prof, title):
        text.append(f"## {title}, threads = {a.threads}\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        print(text[-1], flush=True)

    for N, form in ((1_000_000, "full"), (1_000_000, "compact"), (10_000_000, "compact")):
        params = make_params(N, a.device)
        kw = dict(modes=10, samples=1000, warmup=8, freeze_modes_after=FREEZE_AFTER if form == "compact" else None)
        rec = CMDRecorder(torch.optim.SGD(params, lr=0.0), **kw)
        for t in range(14):
            perturb(params, t)
            rec.record()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                rec.record()
        table(prof, f"record, {form} form, N = {N:.0e}, M = 10, 10 records")
        if N == 1_000_000 and form == "full":
            for name in ("cmd_parameters", "trajectory"):
                getattr(rec, name)()  # the first call in a process also pays for first touches of new memory
                rec.record()
                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    getattr(rec, name)()
                table(prof, f"{name}(), {form} form, N = {N:.0e}, M = 10, the second call, right after a record")
        rec.close()
        del rec, params
    path = os.path.join(a.out or common.RESULTS, "cost_profile.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(text) + "\n")
    return text


if __name__ == "__main__":
    main()
