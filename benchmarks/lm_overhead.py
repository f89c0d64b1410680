"""Per-step overhead of recording on a small causal transformer LM, against an EMA measured in the same run.

A 4-layer pre-norm transformer (d = 256, 4 heads, feed-forward 1024, 2048 tokens, tied embedding, context
128; about 3.7e6 weights) trains with AdamW on batches of random tokens. Four copies of it, with the same
initial weights, are stepped in one process, one step each per round in a rotating order:

- ``none``: the plain training step (forward, backward, ``optimizer.step()``);
- ``default``: a ``CMDRecorder`` with its defaults, recording every step (``record_every=1``);
- ``full``: the same with ``freeze_modes_after=None`` (the full form);
- ``EMA``: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(0.999)``, updated every step.

After a burn-in (the recorders' warm-up, clustering and freeze are behind it), each variant's overhead is the
median over rounds of its step time divided by the plain step's time in the same round, minus 1, with the
interquartile range of those paired ratios as the noise.

    python benchmarks/lm_overhead.py                 # 1 thread, 40 timed rounds
    python benchmarks/lm_overhead.py --threads 2 --rounds 20
    python benchmarks/lm_overhead.py --quick         # smoke run of the code on a tiny model

``benchmarks/cost.py --summary`` runs it next to the memory figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

VARIANTS = ("none", "default", "full", "EMA")


class TinyLM(nn.Module):
    """A pre-norm causal transformer language model with a tied embedding."""

    def __init__(self, vocab: int = 2048, d: int = 256, layers: int = 4, heads: int = 4, context: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        h = self.norm(self.blocks(h, mask=self.mask[:T, :T], is_causal=True))
        return h @ self.embed.weight.T


def quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


QUICK = dict(vocab=64, d=32, layers=1, heads=2, context=16)  # --quick: a smoke run of the same code


def build(variant: str, seed: int, dims: dict):
    """One copy of the model, its optimizer and the variant's recorder or EMA; returns (model, step, extra)."""
    from cmd_online import CMDRecorder

    torch.manual_seed(seed)
    model = TinyLM(**dims)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    extra = None
    if variant == "default":
        extra = CMDRecorder(opt, model, record_every=1)
    elif variant == "full":
        extra = CMDRecorder(opt, model, record_every=1, freeze_modes_after=None)
    elif variant == "EMA":
        extra = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))

    def step(tokens: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()  # a recorder records here, through its step hook
        if variant == "EMA":
            extra.update_parameters(model)

    return model, step, extra


def run(rounds: int = 40, burn_in: int = 30, batch: int = 8, threads: int = 1, seed: int = 0,
        quick: bool = False) -> dict:
    """Time the four variants interleaved; returns weights, step times and the paired overheads."""
    torch.set_num_threads(threads)
    dims = QUICK if quick else {}
    built = {v: build(v, seed, dims) for v in VARIANTS}
    N = sum(p.numel() for p in built["none"][0].parameters())
    g = torch.Generator().manual_seed(seed + 1)
    vocab, context = dims.get("vocab", 2048), dims.get("context", 128)
    batches = [torch.randint(0, vocab, (batch, context + 1), generator=g) for _ in range(8)]
    started = time.perf_counter()
    for i in range(burn_in):  # warm-up, clustering and freeze of the recorders happen here
        for v in VARIANTS:
            built[v][1](batches[i % len(batches)])
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # rotate: no variant always first
        for v in order:
            t = time.perf_counter()
            built[v][1](batches[r % len(batches)])
            times[v].append(time.perf_counter() - t)
    overhead = {v: quartiles([t / base - 1 for t, base in zip(times[v], times["none"])]) for v in VARIANTS[1:]}
    recorders = {v: built[v][2] for v in ("default", "full")}
    held = {v: rec.nbytes()["total"] / (4 * N) for v, rec in recorders.items()}
    phases = {v: (rec.phase, rec.moments.compact if rec.moments is not None else None) for v, rec in recorders.items()}
    ema_bytes = sum(p.numel() * p.element_size() for p in built["EMA"][2].parameters())
    for rec in recorders.values():
        rec.close()
    return {"weights": N, "threads": threads, "batch": batch, "context": context, "rounds": rounds, "burn_in": burn_in,
            "step_s": {v: quartiles(times[v]) for v in VARIANTS}, "overhead": overhead,
            "held_f32_per_weight": {**held, "EMA": ema_bytes / (4 * N)}, "phase_compact": phases,
            "wall_s": time.perf_counter() - started}


def table(result: dict) -> str:
    lines = [f"Transformer LM, {result['weights']:,} weights, batch {result['batch']} × {result['context']} tokens, "
             f"{result['threads']} thread(s), {result['rounds']} interleaved rounds after {result['burn_in']} steps:",
             "", "| variant | step ms (median) | overhead per step, median [IQR] | held f32/weight |", "|---|---|---|---|"]
    for v in VARIANTS:
        ms = 1e3 * result["step_s"][v]["median"]
        o = result["overhead"].get(v)
        cell = "—" if o is None else f"{100 * o['median']:+.1f} % [{100 * o['q1']:+.1f}, {100 * o['q3']:+.1f}]"
        held = result["held_f32_per_weight"].get(v)
        lines.append(f"| {v} | {ms:.1f} | {cell} | {'—' if held is None else f'{held:.2f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--burn-in", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny model (no meaningful timing)")
    a = p.parse_args(argv)
    result = run(a.rounds, a.burn_in, a.batch, a.threads, quick=a.quick)
    print(json.dumps(result) if a.json else table(result))
    return result


if __name__ == "__main__":
    main()
