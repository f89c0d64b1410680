"""Recording: everything one recording holds, behind one narrow interface (take a record; answer queries).

It owns the warm-up history of the sampled weights, the references and their table, the streaming
statistics (:class:`~cmd_online.stats.StreamingMoments`, or :class:`~cmd_online.window.SnapshotMoments`)
and every counter: records taken, skipped, optimizer steps, records handed to the device kernel. The
kernel decision is asked in one place (:attr:`Recording.counts_on_device`), and so is the count of
records and of skipped ones (:meth:`Recording.records`, :meth:`Recording.skips`).

It knows nothing of hooks, options, locks, observers or worker threads: the façade
(:class:`~cmd_online.recorder.CMDRecorder`) and the offload driver (:mod:`cmd_online.offload`) drive it.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .clustering import Clustering, cluster
from .config import CMDConfig
from .distributed import ShardInfo, ranks_text
from .layout import Layout
from .progress import LOG
from .references import ReferenceTable
from .sampling import sample_indices
from .stats import AffineFit, StreamingMoments, mode_dtype, pin_references
from .trajectory import normalize_at, reconstruct
from .window import SnapshotMoments, keeps_snapshots

# Weights per block of a query's fit on a CPU: its float64 working set of about M + 10 block-sized
# vectors stays in the L2 cache, and the query's extra memory is a few MiB whatever N (docs/benchmarks.md).
FIT_BLOCK = 1 << 15
# Weights per block of the fit that freezes the modes: a one-time pass, so a small working set (a few
# MiB at M = 10) matters more than speed (docs/benchmarks.md, the freeze peak).
FREEZE_BLOCK = 1 << 13


class FitBlock(NamedTuple):
    """The fit of one block of weights: parameter ``tensor``, the block's ``local`` slice inside that
    parameter's (local, flat) weights, its ``flat`` slice of the local flat index, and the ``fit``."""

    tensor: int
    local: slice
    flat: slice
    fit: AffineFit


def finite_flags(weights: Sequence[torch.Tensor], shards: ShardInfo, exact: bool) -> tuple[torch.Tensor, list[int]]:
    """Device flags, one per parameter, that all its values on every rank are finite, and the
    parameter of each flag (one multi-tensor kernel per dtype).

    ``exact``: read the largest |w| of each tensor, which never overflows (the flat kernel's check,
    fast on accelerators); else the L2 norm, fast everywhere, which also flags finite values of
    |w| ≳ 1e19 in float32: :meth:`Recording.nonfinite` then looks at those tensors again, exactly.
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    order = [i for group in groups.values() for i in group]
    flags = []
    for group in groups.values():
        nonempty = [weights[i] if weights[i].numel() else weights[i].new_zeros(1) for i in group]
        norms = torch._foreach_norm(nonempty, float("inf")) if exact else torch._foreach_norm(nonempty)
        flags.append(torch.isfinite(torch.stack(norms)))
    return shards.all_ranks(torch.cat(flags)), order


def checked_metrics(metrics: Any) -> dict[str, float]:
    """``add_metrics``'s argument as name → float; a TypeError naming what is wrong."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name → number; got {type(metrics).__name__}")
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics: names must be non-empty str; got {name!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"metrics[{name!r}] must be a number; got {type(value).__name__}")
        checked[name] = float(value)
    return checked


def metric_table(metrics: dict[str, dict[int, float]], T: int) -> dict[str, torch.Tensor] | None:
    """The metrics as name → float64 tensor of T entries, NaN where none was added; None if there are none."""
    if not metrics:
        return None
    table = {}
    for name, values in metrics.items():
        column = torch.full((T,), math.nan, dtype=torch.float64)
        for at, value in values.items():
            if at < T:
                column[at] = value
        table[name] = column
    return table


class Recording:
    """The state of one recording: warm-up history, references, statistics and counters.

    Args:
        config (CMDConfig): the decomposition's settings (samples resolved for these weights).
        layout (Layout): the recorded parameters.
        shards (ShardInfo): what this process holds of each parameter.
        local_shapes (list of torch.Size): this process's shape of each parameter.
        param_device, device: where the parameters live, and where the statistics do.
        kernel (str or None): the statistics kernel (None: by device; decided by the statistics).
    """

    def __init__(self, config: CMDConfig, layout: Layout, shards: ShardInfo, local_shapes: list, param_device,
                 device, kernel: str | None):
        self.config, self.layout, self.shards, self.local_shapes = config, layout, shards, local_shapes
        self.sizes = [s.numel() for s in local_shapes]
        self.param_device, self.device, self.kernel = param_device, device, kernel
        self.dtype = layout.coefficient_dtype  # a and b: float32, or float64 if a parameter is
        self.sample_index = sample_indices(layout.sizes, config.samples, config.seed)
        self.sample_plan = shards.gather_plan(layout, self.sample_index, param_device)
        self.history = torch.zeros(config.samples, config.warmup, dtype=self.dtype, device=device)
        self.warmup_records = 0  # records of the warm-up taken so far
        self.steps = 0  # optimizer steps counted (the façade's hook counts them)
        self._skipped = 0  # records skipped by a host-side finite check
        self._device_attempts = 0  # tracking records handed to the flat kernel (their skips are counted there)
        self._skips_reported = 0
        self.metrics: dict[str, dict[int, float]] = {}  # add_metrics: name → {record: value}
        self.clustering: Clustering | None = None
        self.foreign_clustering = False  # a resumed state whose references another clustering picked
        self.reference_index: torch.Tensor | None = None
        self.ref_plan = self.slots = self.table = self.stats = None

    # ----------------------------------------------------------------------------- counts
    @property
    def tracking(self) -> bool:
        """Whether the warm-up has ended (references and statistics exist)."""
        return self.stats is not None

    @property
    def counts_on_device(self) -> bool:
        """Whether records are checked and counted on the device (the flat kernel after the warm-up): the one
        place that asks which kernel the statistics run."""
        return self.stats is not None and self.stats.kernel == "flat"

    @property
    def num_modes(self) -> int | None:
        """M, once the warm-up has ended (else None)."""
        return None if self.reference_index is None else self.reference_index.numel()

    @property
    def window_start(self) -> int:
        """First record of the fit window (the last warm-up record, F − 1)."""
        return self.config.warmup - 1

    def records(self) -> int:
        """Records taken, skipped ones not counted (the flat kernel: reads the device count)."""
        return self.warmup_records if self.stats is None else self.window_start + self.stats.window_count()

    def skips(self) -> int:
        """Records skipped because of NaN/Inf weights (the flat kernel: attempts minus the device count)."""
        if not self.counts_on_device:
            return self._skipped
        return self._skipped + self._device_attempts + 1 - self.stats.window_count()

    def untouched(self) -> bool:
        """No record was attempted yet (none taken, none skipped)."""
        return self.records() == 0 and self._skipped == 0

    def count_skip(self) -> int:
        """Count one record skipped by a check on the host; returns its index."""
        self._skipped += 1
        return self.records()

    def warn_skipped(self, index: int, bad: list[str], how: str = "") -> None:
        """Warn about one skipped record, naming (up to five of) the parameters that held NaN/Inf."""
        self._skips_reported += 1
        warnings.warn(f"CMDRecorder: record {index} skipped{how}: non-finite (NaN/Inf) values in "
                      f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; the statistics are unchanged",
                      RuntimeWarning, stacklevel=5)

    def report_skips(self) -> None:
        """Warn about records the flat kernel skipped since the last report (reads its count)."""
        if not self.counts_on_device:
            return
        skipped = self.skips()
        if skipped > self._skips_reported:
            warnings.warn(f"CMDRecorder: {skipped - self._skips_reported} record(s) skipped since the last report: "
                          f"non-finite (NaN/Inf) weights; the statistics are unchanged", RuntimeWarning, stacklevel=5)
            self._skips_reported = skipped

    def require_tracking(self, what: str) -> None:
        """A RuntimeError saying what is missing, before any record and during the warm-up."""
        if self.stats is None and self.warmup_records == 0 and self._skipped == 0:
            raise RuntimeError(f"{what} is not available: no record was taken yet ({self.steps} optimizer step(s) "
                               f"so far): call record() after your optimizer steps, or pass record_every "
                               f"(CMD weights exist after warmup={self.config.warmup} records)")
        if self.stats is None:
            remaining = self.config.warmup - self.warmup_records
            raise RuntimeError(f"{what} is not available during the warm-up: {remaining} more record(s) "
                               f"needed (warmup={self.config.warmup}, recorded {self.warmup_records})")

    # ----------------------------------------------------------------------------- taking records
    def values_of(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """What a record gathers: the sampled weights during the warm-up, the reference values after it."""
        return self.shards.assemble((self.ref_plan if self.tracking else self.sample_plan)(weights))

    def record(self, weights: list[torch.Tensor], check_finite: bool) -> bool:
        """Check and take one record on this thread (the freeze that may be due after it is the caller's,
        :meth:`freeze_when_due`). False if it was skipped (NaN/Inf, a warning) or failed on another rank."""
        if self.counts_on_device:
            self._device_record(weights, check_finite)
            return True
        values = self.values_of(weights)
        if check_finite:
            bad = self.nonfinite(weights)
            if bad:
                self.warn_skipped(self.count_skip(), bad)
                return False
        if not (self.stats is None and self.warmup_records == self.config.warmup - 1):
            self.take(weights, values)
            return True
        _, others = self.shards.attempt(lambda: self.take(weights, values))  # FSDP2: on every rank or on none
        return self.undo_warmup_end(others)

    def take(self, weights: list[torch.Tensor], values: torch.Tensor) -> None:
        """Apply one checked record (on the training thread, or the offload worker with host copies):
        ``values`` are the sampled weights during the warm-up, the reference values after it."""
        if self.stats is None:
            t = self.warmup_records
            self.history[:, t] = values
            if t == self.config.warmup - 1:
                self._start_tracking(weights)  # if it fails, the record is not taken: it can come again
            self.warmup_records = t + 1
            return
        self.table.write(self.window_start + self.stats.count, values)
        self.stats.update(weights, values)

    def _device_record(self, weights: list[torch.Tensor], check_finite: bool) -> None:
        """A record of the flat kernel after the warm-up: nothing here waits for the device."""
        refs = self.values_of(weights)
        ok = self.all_finite(weights) if check_finite else None
        self.table.reserve(self.window_start + self._device_attempts + 2)
        self.table.write(self.stats.count_t.long() + self.window_start, refs)  # overwritten if skipped
        self.stats.update(weights, refs, ok)
        self._device_attempts += 1

    def all_finite(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """One device flag: every value of every parameter, on every rank, is finite (nothing waits)."""
        return finite_flags(weights, self.shards, exact=True)[0].all()

    def nonfinite(self, weights: list[torch.Tensor]) -> list[str]:
        """The parameters holding NaN/Inf (checked on the host; empty for a record that may be taken)."""
        finite, order = finite_flags(weights, self.shards, exact=False)
        if bool(finite.all()):
            return []
        finite, order = finite_flags(weights, self.shards, exact=True)  # rare: an overflowing norm, or a NaN/Inf
        return [self.layout.names[order[j]] for j in torch.nonzero(~finite).flatten().tolist()]

    def undo_warmup_end(self, others: list[tuple[int, str]]) -> bool:
        """True if no other rank failed the record that ends the warm-up; otherwise the record is undone here:
        False, and a warning naming the ranks."""
        if not others:
            return True
        self._to_warmup()
        self.warmup_records = self.config.warmup - 1
        warnings.warn(f"CMDRecorder: record {self.warmup_records} (the end of the warm-up) was not taken on any "
                      f"rank: it failed on {ranks_text(others)}; the next record ends the warm-up", RuntimeWarning,
                      stacklevel=5)
        return False

    def ends_warmup_within(self, records: int) -> bool:
        """Whether the next ``records`` records may end the warm-up."""
        return self.stats is None and self.warmup_records + records >= self.config.warmup

    def freezes_within(self, records: int) -> bool:
        """Whether the modes may be due to freeze within the next ``records`` records."""
        due = self.config.freeze_modes_after
        return (self.stats is not None and due is not None and not self.stats.compact
                and self.stats.count + records >= due)

    # ----------------------------------------------------------------------------- phases
    def _start_tracking(self, weights: list[torch.Tensor]) -> None:
        """End of warm-up: cluster the sampled history, fix the references (Algorithm 1, steps 2–4). All or
        nothing: if it fails, the recording is still in the warm-up."""
        start = time.perf_counter()
        LOG.info("CMDRecorder: warm-up of %d records done; clustering %d sampled weights", self.config.warmup,
                 self.config.samples)
        try:
            found = self.cluster()
            position = torch.from_numpy(found.reference)
            self.set_references(self.sample_index[position], self.history[position.to(self.device)])
            self.clustering = found
            self.stats.update(weights, self.table.columns(self.config.warmup)[:, -1])
        except BaseException:
            self._to_warmup()
            raise
        sizes = np.bincount(found.labels[found.labels >= 0], minlength=found.num_modes).tolist()
        LOG.info("CMDRecorder: %d modes (sampled weights per mode: %s); CMD weights exist from record %d on; "
                 "the end of the warm-up took %.2f s", found.num_modes, sizes, self.window_start,
                 time.perf_counter() - start)

    def cluster(self) -> Clustering:
        """The clustering of the warm-up history (Algorithm 1)."""
        return cluster(self.history, self.config.modes, self.config.threshold, self.config.distance,
                       self.config.max_modes)

    def _to_warmup(self) -> None:
        """Back to the warm-up's last record: no clustering, references or statistics (a failed end of it)."""
        self.clustering = None
        self.reference_index = self.ref_plan = self.slots = self.table = self.stats = None
        self._device_attempts = 0

    def set_references(self, reference_index: torch.Tensor, values: torch.Tensor, stats: dict | None = None,
                       copy: bool = True) -> None:
        """References, their table and statistics — zeros, or those of a resumed state ``stats`` — all or
        nothing."""
        reference_index = reference_index.long().cpu()
        ref_plan = self.shards.gather_plan(self.layout, reference_index, self.param_device)
        slots = self.shards.reference_slots(self.layout, reference_index)
        table = ReferenceTable(values.to(self.device, self.dtype))
        moments = self.new_moments(reference_index.numel(), allocate=stats is None)
        if stats is not None:
            moments.restore(stats, copy)
        # a reference moves by rounding only at the resolution of its own parameter's dtype
        moments.ref_eps = self.layout.resolution(reference_index).to(self.device)
        if isinstance(moments, SnapshotMoments):  # the window's reference values and reference weights
            moments.ref_window = lambda: table.columns(self.window_start + moments.count)[:, self.window_start:]
            moments.pins = slots.within
        self.reference_index, self.ref_plan, self.slots, self.table = reference_index, ref_plan, slots, table
        self.stats = moments
        self._device_attempts = moments.window_count() - 1 if stats is not None else 0

    def new_moments(self, num_modes: int, allocate: bool = True) -> StreamingMoments:
        """Statistics of this recording's kind: :class:`SnapshotMoments` (the compact form throughout) when
        ``freeze_modes_after`` ≤ 4, else :class:`StreamingMoments` (the full form, frozen after k ≥ 5)."""
        due = self.config.freeze_modes_after
        options = dict(shift_dtype=self.dtype, kernel=self.kernel, allocate=allocate)
        if keeps_snapshots(due):
            return SnapshotMoments(self.sizes, num_modes, self.device, freeze_after=due, **options)
        return StreamingMoments(self.sizes, num_modes, self.device, **options)

    def freeze_when_due(self) -> None:
        """Fix each weight's mode once ``freeze_modes_after`` records of the window are taken. If it fails
        it comes again at the next record; under FSDP2 the ranks freeze together or not at all."""
        stats, due = self.stats, self.config.freeze_modes_after
        if stats is None or due is None or stats.compact:
            return
        if self.counts_on_device:  # read the device count only once the freeze can be due
            if self._device_attempts + 1 < due or stats.window_count() < due:
                return
        elif stats.count < due:
            return

        def fixed_modes() -> torch.Tensor:
            modes = torch.empty(sum(stats.sizes), dtype=mode_dtype(self.num_modes), device=self.device)
            for block in self.fit_blocks(block=FREEZE_BLOCK):  # small blocks: the freeze adds little to the peak
                modes[block.flat] = block.fit.modes.to(modes.dtype)
            return modes

        modes, others = self.shards.attempt(fixed_modes)
        if others:
            warnings.warn(f"CMDRecorder: the freeze of the modes failed on {ranks_text(others)}; no rank froze, and "
                          f"the freeze comes again at the next record", RuntimeWarning, stacklevel=5)
            return
        stats.freeze(modes)

    def restore(self, checked, metrics: dict[str, dict[int, float]], fresh: bool) -> None:
        """Take a state that passed every check (:func:`cmd_online.checkpoint.read_state`)."""
        self.history = checked.history.to(self.device, self.dtype).clone()
        self.steps = checked.steps
        self._skipped = self._skips_reported = checked.skipped_records
        self.clustering = None  # the sample correlations are not part of a state
        self.foreign_clustering = False
        self.metrics = metrics
        if checked.reference_index is None:
            self.warmup_records = checked.num_records
            self._to_warmup()
            return
        self.warmup_records = self.config.warmup
        self.set_references(checked.reference_index, checked.references, checked.stats, copy=not fresh)

    # ----------------------------------------------------------------------------- queries
    def fit_blocks(self, block: int | None = None, tensors: list[int] | None = None) -> Iterator[FitBlock]:
        """The fit of the statistics as they are, block by block (each block inside one parameter; references
        pinned to a = 1, b = 0 in their mode); a warning names the parameters whose statistics overflowed."""
        stats = self.stats
        size = block or (FIT_BLOCK if self.device.type == "cpu" else 1 << 22)
        resolved = stats.resolved_references()
        moving = resolved.tolist()
        overflowed = [] if bool(torch.isfinite(stats.ref_sumsq).all()) else list(self.layout.names)
        for tensor, local, flat in stats.block_plan(size):
            if tensors is not None and tensor not in tensors:
                continue
            fit = stats.fit(flat, resolved)
            pin_references(fit, *self.slots.within(flat.start, flat.stop), moving)
            name = self.layout.names[tensor]
            # S ≥ 0: its largest value is finite exactly when all are (and |P| ≤ √(SQ) then is too)
            if name not in overflowed and flat.stop > flat.start and not bool(stats.sumsq_of(flat).max() < math.inf):
                overflowed.append(name)
            yield FitBlock(tensor, local, flat, fit)
        if overflowed:
            warnings.warn(f"CMDRecorder: the statistics of {', '.join(overflowed[:5])}{' …' if len(overflowed) > 5 else ''}"
                          f" overflowed float32 (weights near its largest value, or moving by more than ~1e19 between "
                          f"records): their CMD weights are not meaningful", RuntimeWarning, stacklevel=3)

    def cmd_tensors(self, at: int, dtypes: list[torch.dtype]) -> Iterator[tuple[int, torch.Tensor]]:
        """(parameter, its CMD weights at record ``at`` in ``dtypes[parameter]``), one parameter at a time."""
        self.report_skips()
        records = self.records()
        at = normalize_at(at, records)
        column = self.table.columns(records)[:, at]
        overflow = []
        for i, shape in enumerate(self.local_shapes):
            out = torch.empty(shape.numel(), dtype=dtypes[i], device=self.device)
            for block in self.fit_blocks(tensors=[i]):
                a, b = (x.to(self.dtype) for x in (block.fit.a, block.fit.b))  # as trajectory() holds them
                out[block.local] = reconstruct(a, b, block.fit.modes, column).to(out.dtype)
            if out.numel() and not all(map(math.isfinite, torch.aminmax(out))):  # one pass, no mask
                overflow.append(self.layout.names[i])
            yield i, out.view(shape).to(self.param_device)
        if overflow:
            warnings.warn(f"CMDRecorder: the CMD weights of {', '.join(overflow[:5])}{' …' if len(overflow) > 5 else ''}"
                          f" at record {at} are not all finite: the fit goes beyond the range of "
                          f"{self.dtype} (weights near its largest value?)", RuntimeWarning, stacklevel=4)

    def clustered_fit(self) -> tuple[torch.Tensor, ...]:
        """:meth:`flat_fit`, after the clustering of the samples that a resumed recording does again from the
        kept warm-up history (for the trajectory's ``sample_modes``): both in the ranks' agreed part of a query."""
        if self.clustering is None and not self.foreign_clustering:
            found = self.cluster()
            # the same clustering as the state's if it picks the same references (a state of an earlier version
            # may have clustered otherwise: its modes are not these labels' modes)
            if torch.equal(self.sample_index[torch.from_numpy(found.reference).long()].cpu(), self.reference_index.cpu()):
                self.clustering = found
            else:
                self.foreign_clustering = True
        return self.flat_fit()

    def flat_fit(self) -> tuple[torch.Tensor, ...]:
        """a, b and modes of every local weight as flat tensors (a, b float64 if a parameter is), and per
        mode the sum of R² and the number of weights (2 × M) over the weights this process owns."""
        self.report_skips()
        N, M = sum(self.sizes), self.num_modes
        a, b = (torch.empty(N, dtype=self.dtype, device=self.device) for _ in range(2))
        modes = torch.empty(N, dtype=torch.int32, device=self.device)
        totals = torch.zeros(2, M, dtype=torch.float64, device=self.device)
        for block in self.fit_blocks():
            fit = block.fit
            a[block.flat], b[block.flat], modes[block.flat] = fit.a, fit.b, fit.modes
            owned = range(self.sizes[block.tensor])[self.shards.owned_part(block.tensor)]
            start, stop = max(owned.start, block.local.start), min(owned.stop, block.local.stop)
            if start < stop:  # a weight held by several ranks counts once
                part = slice(start - block.local.start, stop - block.local.start)
                totals[0].index_add_(0, fit.modes[part], fit.r2[part])
                totals[1] += torch.bincount(fit.modes[part], minlength=M)
        return a, b, modes, totals

    def trajectory_meta(self, totals: torch.Tensor) -> dict[str, Any]:
        """What a trajectory holds besides a, b and the modes: references, their indices and flags, and each
        mode's mean R² from ``totals`` (sums of R² and counts per mode, this process's part)."""
        totals = self.shards.all_sum(totals)
        T = self.records()
        c = self.clustering  # None: a resumed state whose clustering is not this one (its samples are left out)
        return dict(references=self.table.columns(T).clone(),
                    reference_index=self.reference_index.clone(), window_start=self.window_start, layout=self.layout,
                    mode_r2=(totals[0] / totals[1].clamp_min(1)).float(),
                    set_aside=~self.stats.resolved_references(),
                    sample_index=None if c is None else self.sample_index.clone(),
                    sample_history=None if c is None else self.history.cpu().clone(),
                    sample_modes=None if c is None else torch.from_numpy(c.labels).clone(),
                    metrics=metric_table(self.metrics, T))

    def r2(self) -> list[torch.Tensor]:
        """Each local weight's R² over the window, per parameter."""
        self.report_skips()
        out = torch.empty(sum(self.sizes), dtype=torch.float32, device=self.device)
        for block in self.fit_blocks():
            out[block.flat] = block.fit.r2
        return [v.to(self.param_device) for v in self.stats.views(out)]

    def add_metrics(self, metrics: Any, at: int) -> None:
        """Keep ``metrics`` (checked: :func:`checked_metrics`) at record ``at``."""
        checked = checked_metrics(metrics)
        records = self.records()
        if records == 0:
            raise RuntimeError("add_metrics needs a record to attach the metrics to, and no record was taken yet: "
                               "call record() after your optimizer steps, or pass record_every")
        at = normalize_at(at, records)
        for name, value in checked.items():
            self.metrics.setdefault(name, {})[at] = value

    def nbytes(self) -> dict[str, int]:
        """Bytes held in tensors, by part (statistics, scratch, history, references, indices)."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        stats = self.stats
        return {"statistics": 0 if stats is None else stats.nbytes(),
                "scratch": 0 if stats is None else stats.scratch_nbytes(), "history": size(self.history),
                "references": 0 if self.table is None else self.table.nbytes(),
                "indices": size(self.sample_index) + size(self.reference_index)}
