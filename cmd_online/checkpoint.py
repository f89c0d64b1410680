"""The CMDRecorder ``state_dict`` format, and the checks a state passes before anything is loaded.

A state is a dict of plain tensors, numbers, strings and lists (``torch.load(weights_only=True)``
reads it). :func:`check_state` validates every field — types, dtypes, shapes, ranges, and the
number of modes M wherever it appears — against the recorder that loads it, and returns the parts
in one form whatever the version, so that a state that fails any check changes nothing.

Version 2 (this one): per-weight statistics as flat tensors over this process's weights, P as a
list of M rows (one row, p, in the compact form). Version 1 (cmd_online 0.1): one tensor per
parameter, P as M × n blocks; it is converted on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import CMDConfig
from .layout import Layout

FORMAT = "cmd_online.CMDRecorder"
VERSION = 2
KEYS = ("config", "layout", "num_records", "skipped_records", "steps", "sample_index", "history",
        "reference_index", "references", "stats", "shards")
_STATS = ("count", "shift", "mean", "sumsq", "comoment", "ref_shift", "ref_mean", "ref_sumsq")


@dataclass
class CheckedState:
    """The parts of a state that passed :func:`check_state`, in version 2's form."""

    num_records: int
    skipped_records: int
    steps: int
    history: torch.Tensor
    reference_index: torch.Tensor | None
    references: torch.Tensor | None
    stats: dict | None


def _fail(field: str, problem: str) -> ValueError:
    what = "the statistics " if field.startswith("stats") else ""
    return ValueError(f"{what}state[{field!r}] {problem}; this is not a CMDRecorder state_dict of this recorder "
                      f"(damaged or edited?)")


def _count(state: dict, field: str, low: int = 0) -> int:
    value = state[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(field, f"must be an int ≥ {low}; got {value!r}")
    return value


def _tensor(value: Any, field: str, shape: tuple[int, ...], kind: str = "float", finite: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(field, f"must be a tensor; got {type(value).__name__}")
    if kind == "float" and not value.is_floating_point():
        raise _fail(field, f"must hold floating-point values; got {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise _fail(field, f"must hold integers; got {value.dtype}")
    if tuple(value.shape) != shape:
        raise _fail(field, f"must have shape {shape}; got {tuple(value.shape)}")
    if finite and kind == "float" and not bool(torch.isfinite(value).all()):
        raise _fail(field, "holds NaN or Inf values")
    return value


def check_state(state: Any, *, config: CMDConfig, layout: Layout, shards: dict, sample_index: torch.Tensor,
                local_size: int) -> CheckedState:
    """Validate a ``CMDRecorder.state_dict()`` against the recorder that loads it.

    Args:
        state: the state (any object: everything is checked).
        config, layout, shards, sample_index: the loading recorder's; the state must match them.
        local_size (int): the number of weights this process holds (its statistics' length).

    Raises ValueError naming the first field that fails.
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("state is not a CMDRecorder state_dict")
    version = state.get("version")
    if version not in (1, VERSION):
        raise ValueError(f"CMDRecorder state_dict version {version!r} is not supported (expected 1 or {VERSION})")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}; it is not a complete CMDRecorder state_dict")
    saved = CMDConfig.from_dict(state["config"])
    for key, value in config.items():
        if saved[key] != value:
            raise ValueError(f"state was recorded with {key}={saved[key]!r}, but this recorder has {key}={value!r}; "
                             f"build the recorder with the same configuration")
    if Layout.from_dict(state["layout"]).shapes != layout.shapes:
        raise ValueError("state was recorded for parameters of other shapes than this optimizer's")
    if state["shards"] != shards:
        raise ValueError(f"state was recorded with sharding {state['shards']}, but this recorder has {shards}")
    K, F = config.samples, config.warmup
    index = _tensor(state["sample_index"], "sample_index", (K,), "int")
    if not torch.equal(index.cpu().long(), sample_index):
        raise ValueError("state has other sampled weights than this recorder (different seed or layout)")
    num_records, skipped, steps = (_count(state, k) for k in ("num_records", "skipped_records", "steps"))
    history = _tensor(state["history"], "history", (K, F))
    if state["reference_index"] is None:
        if num_records >= F or state["references"] is not None or state["stats"] is not None:
            raise _fail("reference_index", f"is None (a warm-up state) but num_records = {num_records} ≥ warmup "
                        f"= {F}, or references or stats are set")
        return CheckedState(num_records, skipped, steps, history, None, None, None)
    if num_records < F:
        raise _fail("num_records", f"is {num_records}, but a state past the warm-up has at least warmup = {F}")
    reference_index = state["reference_index"]
    M = reference_index.numel() if isinstance(reference_index, torch.Tensor) else 0
    limit = K if config.modes is None else min(config.modes, K)
    _tensor(reference_index, "reference_index", (M,), "int")
    if not 1 <= M <= limit:
        raise _fail("reference_index", f"must name 1 to {limit} references; got {M}")
    if not bool(torch.isin(reference_index.cpu().long(), sample_index).all()) \
            or reference_index.unique().numel() != M:
        raise _fail("reference_index", "must name distinct sampled weights (the references are sampled weights)")
    references = _tensor(state["references"], "references", (M, num_records))
    stats = _check_stats(state["stats"], version, config, M, num_records - (F - 1), local_size)
    return CheckedState(num_records, skipped, steps, history, reference_index.cpu().long(), references, stats)


def _check_stats(stats: Any, version: int, config: CMDConfig, M: int, count: int, local_size: int) -> dict:
    if not isinstance(stats, dict):
        raise _fail("stats", f"must be a dict past the warm-up; got {type(stats).__name__}")
    missing = [key for key in _STATS if key not in stats]
    if missing:
        raise _fail("stats", f"is missing {', '.join(missing)}")
    if version == 1:
        stats = _from_version_1(stats, M)
    if stats["count"] != count:
        raise _fail("stats", f"holds {stats['count']!r} records of the window, but num_records says {count}")
    for name in ("shift", "mean", "sumsq"):
        _tensor(stats[name], f"stats.{name}", (local_size,))
    for name in ("ref_shift", "ref_mean", "ref_sumsq"):
        _tensor(stats[name], f"stats.{name}", (M,))
    if bool((stats["sumsq"] < 0).any()) or bool((stats["ref_sumsq"] < 0).any()):
        raise _fail("stats", "holds a negative sum of squares")
    freeze = config.freeze_modes_after
    compact = freeze is not None and count >= freeze
    rows = stats["comoment"]
    if not isinstance(rows, (list, tuple)) or len(rows) != (1 if compact else M):
        raise _fail("stats.comoment", f"must be a list of {1 if compact else M} rows ({'compact' if compact else 'full'} "
                    f"form after {count} records of the window); got {type(rows).__name__} of "
                    f"{len(rows) if isinstance(rows, (list, tuple)) else '?'}")
    for m, row in enumerate(rows):
        _tensor(row, f"stats.comoment[{m}]", (local_size,))
    if compact != ("modes" in stats):
        raise _fail("stats", "has modes in the full form, or none in the compact form")
    if compact:
        modes = _tensor(stats["modes"], "stats.modes", (local_size,), "int")
        if local_size and (int(modes.min()) < 0 or int(modes.max()) >= M):
            raise _fail("stats.modes", f"must lie in [0, {M})")
    return stats


def _from_version_1(stats: dict, M: int) -> dict:
    """Version-1 statistics (one tensor per parameter; P as M × n blocks) as version 2's flat tensors."""
    try:
        flat = {name: torch.cat([t.reshape(-1) for t in stats[name]]) for name in ("shift", "mean", "sumsq")}
        blocks = stats["comoment"]
        if "modes" in stats:
            flat["comoment"] = [torch.cat([p.reshape(-1) for p in blocks])]
            flat["modes"] = torch.cat([m.reshape(-1) for m in stats["modes"]])
        else:
            flat["comoment"] = [torch.cat([P[m].reshape(-1) for P in blocks]) for m in range(M)]
    except (TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise _fail("stats", f"is not version-1 statistics: {e}") from None
    return {**stats, **flat}
