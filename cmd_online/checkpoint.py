"""The CMDRecorder ``state_dict`` format: its writer and its reader side by side, and the checks a state
passes before anything is loaded (a version bump touches this file only).

:func:`write_state` writes a :class:`~cmd_online.recording.Recording` as a state; :func:`read_state`
checks one against the recording that loads it and returns what :meth:`Recording.restore` takes.
:func:`write_trajectory_state` and :func:`load_trajectory` are the same pair for the trajectory's
``torch.distributed.checkpoint`` form.

A state is a dict of plain tensors, numbers, strings and lists (``torch.load(weights_only=True)``
reads it). :func:`check_state` validates every field — types, dtypes, shapes, ranges, and the
number of modes M wherever it appears — against the recorder that loads it, and returns the parts
in one form whatever the version, so that a state that fails any check changes nothing.

Version 3 (this one) is built for ``torch.distributed.checkpoint`` (DCP) as much as for
``torch.save``: its structure depends on neither the phase nor the number of modes found, so a
freshly built recorder's ``state_dict()`` is the template DCP loads any checkpoint of the same
configuration into::

    {"meta":  bytes: torch.save of the replicated part (config, layout, counters, samples, warm-up
              history, references, the reference moments, and past the warm-up of an unsharded run
              the "checksum" of the statistics), read back with weights_only=True after its zip
              members' CRC-32s are checked,
     "stats": {"shift"/"mean"/"sumsq"/"modes": {parameter name: a tensor shaped like the parameter},
               "rows": {parameter name: the row indices this process holds, a vector},
               "comoment": {"mode_m": {parameter name: P's row m}, m < the mode bound}}}

Under FSDP2 every per-weight tensor is a DTensor placed like its parameter, so DCP saves, loads
and reshards it with the model (``rows`` then tells which rows each rank received); in one
process or under DDP they are plain tensors of the parameters' shapes. Rows of P beyond the modes
found, and the modes before the freeze, are zeros. Versions 2 (flat statistics; cmd_online
development builds) and 1 (cmd_online 0.1: one tensor per parameter, P as M × n blocks) still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import torch

from .config import CMDConfig
from .files import ChecksumError, checksum, pack, unpack, verify_checksum
from .layout import WRAPPER_COMPONENTS, Layout, check_tensor, core_name, name_differences
from .recording import Recording, metric_table
from .stats import mode_dtype
from .trajectory import CMDTrajectory, parts_checked
from .window import keeps_snapshots, snapshots_of_full

FORMAT = "cmd_online.CMDRecorder"
VERSION = 4
KEYS = ("config", "layout", "num_records", "skipped_records", "steps", "sample_index", "history",
        "reference_index", "references", "stats", "shards")
_STATS = ("count", "mean", "sumsq", "comoment", "ref_shift", "ref_mean", "ref_sumsq")


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
    """:func:`cmd_online.layout.check_tensor` of a state's field; a ValueError that says which state it is."""
    try:
        return check_tensor(field, value, kind, shape, finite=finite, convert=False)
    except (TypeError, ValueError) as e:
        raise _fail(field, str(e).removeprefix(f"{field} ")) from None


def check_header(state: Any, *, config: CMDConfig, layout: Layout, strict: bool = True) -> int:
    """The format, version, entries, configuration and parameters (:func:`check_parameters`) of a state (or
    of a version-3 state's ``meta``); returns the version."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("state is not a CMDRecorder state_dict")
    version = state.get("version")
    if version not in (1, 2, 3, VERSION):
        raise ValueError(f"CMDRecorder state_dict version {version!r} is not supported (expected 1 to {VERSION})")
    missing = [key for key in KEYS if key not in state and not (key == "stats" and version >= 3)]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}; it is not a complete CMDRecorder state_dict")
    saved = CMDConfig.from_dict(state["config"])
    for key, value in config.items():
        if saved[key] != value:
            raise ValueError(f"state was recorded with {key}={saved[key]!r}, but this recorder has {key}={value!r}; "
                             f"build the recorder with the same configuration")
    check_parameters(Layout.from_dict(state["layout"]), layout, strict)
    return version


def _listed(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f"; … ({len(items) - limit} more)" if len(items) > limit else "")


def check_parameters(saved: Layout, now: Layout, strict: bool = True) -> None:
    """That a state recorded for the parameters ``saved`` fits a recorder of the parameters ``now``: as many
    tensors, of the same shapes in the same order, and (if ``strict``) the same names up to wrappers
    (:func:`cmd_online.layout.name_differences`). The ValueError says what differs."""
    if len(saved.shapes) != len(now.shapes):
        n, more = min(len(saved.shapes), len(now.shapes)), len(now.shapes) > len(saved.shapes)
        extra = (now if more else saved).names[n:]
        listed = ", ".join(map(repr, extra[:3])) + (" …" if len(extra) > 3 else "")
        raise ValueError(
            f"state was recorded for {len(saved.shapes)} parameter tensors, but this recorder has {len(now.shapes)} "
            f"({'it also has' if more else 'the state also has'} {listed}): a recorder records the parameters its "
            f"optimizer holds when the recorder is built (param groups added later with add_param_group are not "
            f"recorded); build the recorder where the recorded run built it ("
            f"{'before' if more else 'after'} add_param_group)")
    shapes = [f"{name!r} is {tuple(a)} in the state, {tuple(b)} now" for name, a, b in zip(now.names, saved.shapes,
                                                                                           now.shapes) if a != b]
    if shapes:
        raise ValueError(f"state was recorded for parameters of other shapes than this optimizer's: {_listed(shapes)}")
    if strict:
        differ = name_differences(saved.names, now.names)
        if differ:
            swapped = sorted(core_name(saved.names[i]) for i in differ) == sorted(core_name(now.names[i]) for i in differ)
            raise ValueError(
                f"state was recorded for parameters of other names{' (the same ones in another order)' if swapped else ''}"
                f": {_listed([f'parameter {i} is {saved.names[i]!r} in the state, {now.names[i]!r} now' for i in differ])}"
                f" (names are compared without the components {', '.join(sorted(WRAPPER_COMPONENTS))} and one "
                f"leading prefix on each side, such as DDP's 'module.'); give the optimizer the recorded parameters in "
                f"the recorded order, or, if these are the same parameters renamed, load with "
                f"load_state_dict(state, strict=False), which matches them by position")


def check_state(state: Any, *, config: CMDConfig, layout: Layout, shards: dict, sample_index: torch.Tensor,
                local_size: int, strict: bool = True) -> CheckedState:
    """Validate a ``CMDRecorder.state_dict()`` against the recorder that loads it.

    Args:
        state: the state (any object: everything is checked).
        config, layout, shards, sample_index: the loading recorder's; the state must match them.
        local_size (int): the number of weights this process holds (its statistics' length).
        strict (bool): the parameters' names must agree up to wrappers (default True); False matches them
            by position only.

    Raises ValueError naming the first field that fails.
    """
    version = check_header(state, config=config, layout=layout, strict=strict)
    if version < 3 and state["shards"] != shards:  # versions ≥ 3 tell the rows of each statistic
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
    freeze = config.freeze_modes_after
    compact = freeze is not None and count >= freeze
    # the forms: full (a shift, M rows), compact (1 row and the modes; a shift in versions ≤ 3, folded into
    # the mean on loading), or a recorder's that keeps snapshots before its freeze (version 4: no shift)
    snapshots = not compact and "shift" not in stats and keeps_snapshots(freeze)
    for name in ("mean", "sumsq") + (("shift",) if "shift" in stats or not (compact or snapshots) else ()):
        _tensor(stats.get(name), f"stats.{name}", (local_size,))
    for name in ("ref_shift", "ref_mean", "ref_sumsq"):
        _tensor(stats[name], f"stats.{name}", (M,))
    if (not snapshots and bool((stats["sumsq"] < 0).any())) or bool((stats["ref_sumsq"] < 0).any()):
        raise _fail("stats", "holds a negative sum of squares")
    one_row = compact or snapshots
    rows = stats["comoment"]
    if not isinstance(rows, (list, tuple)) or len(rows) != (1 if one_row else M):
        raise _fail("stats.comoment", f"must be a list of {1 if one_row else M} rows ({'compact' if one_row else 'full'} "
                    f"form after {count} records of the window); got {type(rows).__name__} of "
                    f"{len(rows) if isinstance(rows, (list, tuple)) else '?'}")
    for m, row in enumerate(rows):
        _tensor(row, f"stats.comoment[{m}]", (local_size,))
    if one_row != ("modes" in stats):
        raise _fail("stats", "has modes in the full form, or none in the compact form")
    if one_row:
        modes = _tensor(stats["modes"], "stats.modes", (local_size,), "int")
        if local_size and (int(modes.min()) < 0 or int(modes.max()) >= M):
            raise _fail("stats.modes", f"must lie in [0, {M})")
    if keeps_snapshots(freeze) and not one_row:  # version ≤ 3, the full form before the freeze
        return snapshots_of_full(stats, freeze)
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


# ------------------------------------------------------------------------------------------ version 3
def read_meta(state: dict) -> dict:
    """The replicated part of a ``CMDRecorder.state_dict()`` (version 3) as a dict: ``num_records``,
    ``skipped_records``, ``steps``, ``config``, ``layout``, ``history``, ``references``, … ."""
    if not isinstance(state, dict) or "meta" not in state:
        raise ValueError("state is not a CMDRecorder state_dict of version 3 (no 'meta')")
    return unpack(state["meta"])


def per_parameter(names: list[str], shapes: list[tuple[int, ...]], fields: dict[str, list[torch.Tensor]],
                  rows: list[torch.Tensor], bound: int, like) -> dict:
    """The ``stats`` part of a version-3 state from per-parameter tensors (this process's parts).

    Args:
        names, shapes: each parameter's name and this process's shape of it.
        fields: ``shift``, ``mean``, ``sumsq``, ``modes`` and ``comoment`` (a list of rows): per
            parameter, flat views of this process's part (None for zeros).
        rows: the row indices this process holds, per parameter.
        bound (int): the rows of P the state holds (the mode bound).
        like (callable): ``like(i, local)`` places a tensor like parameter i (a DTensor under FSDP2).
    """
    def block(flat_views, dtype):
        out = {}
        for i, (name, shape) in enumerate(zip(names, shapes)):
            view = flat_views[i] if flat_views is not None else None
            local = view.view(shape) if view is not None else torch.zeros((), dtype=dtype).expand(shape)
            out[name] = like(i, local)
        return out

    comoment = fields["comoment"]
    shift = {"shift": block(fields["shift"], torch.float32)} if "shift" in fields else {}
    return {
        **shift,
        "mean": block(fields["mean"], torch.float32),
        "sumsq": block(fields["sumsq"], torch.float32),
        "modes": block(fields["modes"], torch.uint8),
        "rows": {name: like(i, r) for i, (name, r) in enumerate(zip(names, rows))},
        "comoment": {f"mode_{m}": block(comoment[m] if m < len(comoment) else None, torch.float32)
                     for m in range(bound)},
    }


def from_per_parameter(meta: dict, stats: Any, rows: list[tuple[int, int]], local, *, config: CMDConfig,
                       layout: Layout, strict: bool = True) -> dict:
    """A version-3 state as the version-2 form :func:`check_state` validates (flat statistics).

    Args:
        meta (dict): the unpacked ``meta``; its header is checked first (:func:`check_header`).
        stats: the state's ``stats``.
        rows: the rows [start, stop) of each parameter this process holds.
        local (callable): ``local(i, value, shape, field)``, this process's part of a per-weight tensor
            of parameter i (a DTensor's local part, or the held rows of a whole plain tensor).
        config, layout: the loading recorder's.
        strict (bool): as for :func:`check_state`.

    The per-parameter tensors are found under the names the state was recorded with (its layout), so a
    state loads into a recorder whose names differ by wrappers (``_orig_mod.``, ``module.``, …). The ``rows`` markers must name exactly the rows this process holds: a shard saved by another rank
    (a per-rank ``torch.save``) is refused.
    """
    if not isinstance(stats, dict):
        raise _fail("stats", f"must be a dict of per-parameter tensors; got {type(stats).__name__}")
    check_header(meta, config=config, layout=layout, strict=strict)
    state = {key: meta[key] for key in KEYS if key in meta and key != "stats"}
    state.update(format=FORMAT, version=VERSION, stats=None, shards=meta.get("shards"))
    if meta.get("reference_index") is None:
        return state
    names = _stats_names(stats, Layout.from_dict(meta["layout"]).names, layout.names)
    shapes = [tuple(s) for s in layout.shapes]
    _check_rows(stats, names, shapes, rows, local)
    compact = bool(meta.get("compact"))
    snapshots = "shift" not in stats  # the layout of a recorder that keeps snapshots (version 4)
    M = meta["reference_index"].numel() if isinstance(meta["reference_index"], torch.Tensor) else 0

    def flat(*path: str) -> torch.Tensor:
        return torch.cat([_local(stats, (*path, name), i, shape, local).reshape(-1)
                          for i, (name, shape) in enumerate(zip(names, shapes))])

    one_row = compact or snapshots
    out = {kind: flat(kind) for kind in (([] if snapshots else ["shift"]) + ["mean", "sumsq"]
                                         + (["modes"] if one_row else []))}
    held = stats.get("comoment")
    rows_needed = [f"mode_{m}" for m in range(1 if one_row else M)]
    if (config.threshold is not None and config.max_modes is None
            and not (isinstance(held, dict) and all(row in held for row in rows_needed))):
        raise ValueError(f"the state has {M} mode(s) but this recorder holds no rows of P for them: with threshold= "
                         f"and no max_modes a recorder has no mode bound before its warm-up ends, so a freshly built "
                         f"one cannot take a checkpoint of a later phase through torch.distributed.checkpoint; "
                         f"build it with max_modes= (at least {M}), or save with torch.save and restore with "
                         f"load_state_dict")
    out["comoment"] = [flat("comoment", row) for row in rows_needed]
    out.update({key: meta.get(key) for key in ("count", "ref_shift", "ref_mean", "ref_sumsq")})
    parts = stats_checked(stats, names, M, compact, snapshots)
    if "checksum" in meta and not any(type(t).__name__ == "DTensor" for _, t in parts):
        try:
            verify_checksum(meta["checksum"], parts, "the statistics")
        except ChecksumError as e:
            raise ValueError(f"{e}: the state is damaged (corrupted in the file it was read from?), or it was saved "
                             f"after a later record changed the recorder's tensors (state_dict() holds references: "
                             f"save it at once); nothing was loaded") from None
    state["stats"] = out
    return state


def _check_rows(stats: dict, names, shapes: list[tuple[int, ...]], rows: list[tuple[int, int]], local) -> None:
    """That the ``rows`` markers of a state name exactly the rows this process holds of each parameter."""
    for i, (name, shape) in enumerate(zip(names, shapes)):
        start, stop = rows[i]
        marker = _local(stats, ("rows", name), i, shape[:1] if shape else (1,), local)
        if marker.shape != (stop - start,) or not torch.equal(marker.cpu().long(), torch.arange(start, stop)):
            raise _fail(f"stats.rows.{name}", f"does not name rows [{start}, {stop}) of {name!r}: a shard saved by "
                        f"another rank, or of another sharding (reshard with torch.distributed.checkpoint)")


def stats_checked(stats: dict, names, M: int, compact: bool, snapshots: bool = False) -> list[tuple[str, Any]]:
    """What the checksum of a version-3 or 4 state covers: every per-parameter tensor a resume reads (the
    row markers, shift (the full form's layout), mean, sums of squares, the modes once frozen or kept
    from the start (``snapshots``), and P's rows of the M modes, or the one row of the compact form),
    keyed by the recorded names."""
    one_row = compact or snapshots
    kinds = ([] if snapshots else ["shift"]) + ["mean", "sumsq"] + (["modes"] if one_row else [])
    out = []
    for name in names:
        out.append((f"rows.{name}", stats["rows"][name]))
        out.extend((f"{kind}.{name}", stats[kind][name]) for kind in kinds)
        out.extend((f"comoment.mode_{m}.{name}", stats["comoment"][f"mode_{m}"][name])
                   for m in range(1 if one_row else M))
    return out


def _stats_names(stats: dict, saved: tuple[str, ...], now: tuple[str, ...]) -> tuple[str, ...]:
    """The names the per-parameter statistics are stored under: the recorded ones (``torch.save``), or this
    recorder's where the state is its own template filled in place (``torch.distributed.checkpoint``)."""
    held = stats.get("rows")
    if isinstance(held, dict) and not all(name in held for name in saved) and all(name in held for name in now):
        return now
    return saved


def _local(stats: dict, path: tuple[str, ...], i: int, shape: tuple[int, ...], local) -> torch.Tensor:
    field = "stats." + ".".join(path)
    group = stats
    for depth, key in enumerate(path):
        if not isinstance(group, dict) or key not in group:
            why = ("a state saved with a smaller mode bound, or damaged" if path[0] == "comoment" and depth == 1
                   else "damaged or edited: the state's layout names this parameter")
            raise _fail(field, f"is missing ({why})")
        group = group[key]
    try:
        return local(i, group, shape, field)
    except ValueError as e:
        raise _fail(field, str(e).removeprefix(f"state[{field!r}] ")) from None


# ------------------------------------------------------------------------------------------ the writer
def write_state(recording: Recording) -> dict[str, Any]:
    """``CMDRecorder.state_dict()`` of a recording: ``{"meta": bytes, "stats": per-parameter statistics}``
    (this version); past the warm-up, outside FSDP2, ``meta`` holds the statistics' checksum."""
    stats, meta = _per_parameter_stats(recording), _meta(recording)
    if recording.tracking and not recording.shards.sharded:  # whole tensors: a checksum that holds anywhere
        meta["checksum"] = checksum(stats_checked(stats, recording.layout.names, recording.num_modes,
                                                  recording.stats.compact,
                                                  keeps_snapshots(recording.config.freeze_modes_after)))
    return {"meta": pack(meta), "stats": stats}


def _mode_bound(recording: Recording) -> int:
    """Rows of P in a state: the configured bound, else the modes found (0 during the warm-up)."""
    bound = recording.config.mode_bound
    return bound if bound is not None else (recording.num_modes or 0)


def _meta(recording: Recording) -> dict[str, Any]:
    """The replicated part of a state."""
    stats, records, table = recording.stats, recording.records(), recording.table
    moments = {name: None if stats is None else getattr(stats, name) for name in ("ref_shift", "ref_mean",
                                                                                  "ref_sumsq")}
    return {"format": FORMAT, "version": VERSION, "config": recording.config.to_dict(),
            "layout": recording.layout.to_dict(), "num_records": records, "skipped_records": recording.skips(),
            "steps": recording.steps, "sample_index": recording.sample_index, "history": recording.history,
            "reference_index": recording.reference_index,
            "references": None if table is None else table.columns(records),
            "count": 0 if stats is None else stats.window_count(), "compact": stats is not None and stats.compact,
            "shards": recording.shards.describe(), **moments, "metrics": metric_table(recording.metrics, records)}


def _per_parameter_stats(recording: Recording) -> dict:
    """The per-parameter statistics of a state (:func:`per_parameter`): zeros of the final shapes during the
    warm-up, the template a checkpoint of any phase loads into."""
    sizes, bound, stats = recording.sizes, _mode_bound(recording), recording.stats
    snapshots = keeps_snapshots(recording.config.freeze_modes_after)
    if stats is None:
        stats = recording.new_moments(bound)
    modes = stats.modes
    if modes is None:  # the full form: zeros, as a checkpoint of any phase has modes
        modes = torch.zeros(sum(sizes), dtype=mode_dtype(max(bound, 1)), device=recording.device)
    views = lambda flat: None if flat is None else list(torch.split(flat, sizes))  # noqa: E731
    fields = {name: views(getattr(stats, name)) for name in ("mean", "sumsq")}
    if not snapshots:  # the full form's layout, in every phase
        fields["shift"] = views(stats.shift) if stats.shift is not None else None
    fields["modes"] = views(modes)
    if snapshots:  # one row of P in every phase
        bound = 1
    fields["comoment"] = [views(row) for row in stats.comoment[:bound]]
    shards = recording.shards
    rows = [torch.arange(*shards.rows(i), device=recording.device) for i in range(len(sizes))]
    return per_parameter(list(recording.layout.names), [tuple(s) for s in recording.local_shapes], fields, rows,
                         bound, shards.like_param)


# ------------------------------------------------------------------------------------------ the reader
def metrics_of_state(table: Any) -> dict[str, dict[int, float]]:
    """The metrics of a state (name → vector, NaN where none) back as name → {record: value}; checked."""
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() == 1
                                              and v.is_floating_point() for k, v in table.items()):
        raise ValueError("state['meta']['metrics'] must map metric names to float vectors; this is not a "
                         "CMDRecorder state_dict of this recorder (damaged or edited?)")
    return {name: {i: float(v) for i, v in enumerate(values.tolist()) if not math.isnan(v)}
            for name, values in table.items()}


def read_state(state: Any, recording: Recording, strict: bool = True) -> tuple[CheckedState, dict, bool]:
    """A state of any version checked against the recording that loads it: the checked parts, the metrics
    (name → {record: value}), and whether its flat statistics are new tensors (taken, not copied again)."""
    loaded, metrics, fresh = state, {}, False
    shards, layout = recording.shards, recording.layout
    if isinstance(state, dict) and "meta" in state:  # version 3 and later
        meta = unpack(state["meta"])
        metrics = metrics_of_state(meta.get("metrics"))
        loaded = from_per_parameter(meta, state.get("stats"), [shards.rows(i) for i in range(len(layout.names))],
                                    shards.from_state, config=recording.config, layout=layout, strict=strict)
        fresh = True
    checked = check_state(loaded, config=recording.config, layout=layout, shards=shards.describe(),
                          sample_index=recording.sample_index, local_size=sum(recording.sizes), strict=strict)
    return checked, metrics, fresh


# ------------------------------------------------------------------------------------------ the trajectory
def write_trajectory_state(recording: Recording, fit: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """``CMDRecorder.trajectory_state_dict()`` from the recording and its ``fit`` (:meth:`Recording.flat_fit`):
    ``{"meta": bytes, "a", "b", "modes": {parameter name: a tensor shaped like the parameter}}``, placed like the
    parameters; outside FSDP2 ``meta`` holds a checksum of a, b and the modes. Read by :func:`load_trajectory`."""
    a, b, modes, totals = fit
    a, b, modes = (recording.stats.views(x) for x in (a, b, modes))
    meta = {**recording.trajectory_meta(totals), "layout": recording.layout.to_dict()}
    shapes, names, shards = [tuple(s) for s in recording.local_shapes], recording.layout.names, recording.shards
    place = lambda xs: {name: shards.like_param(i, x.view(shape))  # noqa: E731
                        for i, (name, x, shape) in enumerate(zip(names, xs, shapes))}
    state = {"a": place(a), "b": place(b), "modes": place(modes)}
    if not shards.sharded:  # whole tensors: a checksum that holds wherever they are loaded
        meta["checksum"] = checksum(parts_checked(state, names))
    return {"meta": pack(meta), **state}


def load_trajectory(checkpoint_id, key: str = "trajectory"):
    """Read a :class:`~cmd_online.CMDTrajectory` saved with ``dcp.save({key: rec.trajectory_state_dict()})``
    into this one process (no process group needed): two plain ``torch.distributed.checkpoint`` loads,
    the replicated part first, then a, b and the modes at their whole shapes.

    Args:
        checkpoint_id (str or path): the checkpoint's folder (as given to ``dcp.save``).
        key (str): the trajectory's key in the saved state (default "trajectory").
    """
    import torch.distributed.checkpoint as dcp

    header = {key: {"meta": b""}}
    dcp.load(header, checkpoint_id=checkpoint_id)
    meta = unpack(header[key]["meta"])
    layout = Layout.from_dict(meta["layout"])
    dtype = layout.coefficient_dtype
    template = {"meta": b""}
    for name, kind in (("a", dtype), ("b", dtype), ("modes", torch.int32)):
        template[name] = {n: torch.empty(shape, dtype=kind) for n, shape in zip(layout.names, layout.shapes)}
    state = {key: template}
    dcp.load(state, checkpoint_id=checkpoint_id)
    return CMDTrajectory.from_state_dict(state[key])
