"""The read side of :class:`~cmd_online.recorder.CMDRecorder`: its queries of the recording (CMD weights,
the trajectory and its DCP form, R², views of the references and statistics, bytes held, metrics),
as :class:`Queries`, a part of the recorder (its base class), and :func:`serialised`, the decorator of
every public member that reads or changes the recording.

They rely on the recorder's ``_locked()`` (its lock, once pending offloaded records are told),
``_recording``, ``_parameters``, ``_shards``, ``_offload``, ``_shortcut``, ``params`` and ``num_records``.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch

from . import distributed as dist_utils
from .checkpoint import write_trajectory_state
from .files import atomic_save
from .recording import FitBlock
from .references import ReferenceSlots
from .stats import StreamingMoments
from .summary import RecordingSummary
from .trajectory import CMDTrajectory


def serialised(method=None, *, flush: bool = False):
    """Run the method inside the recorder's ``_locked(flush)``: its lock, once the offload worker's pending
    records are applied and told. Records, queries and state changes happen one at a time."""
    def wrap(method):
        @functools.wraps(method)
        def locked(self, *args, **kwargs):
            with self._locked(flush):
                return method(self, *args, **kwargs)
        return locked
    return wrap if method is None else wrap(method)


class Queries:
    """What a recorder answers (see the module)."""

    # ----------------------------------------------------------------------------- read-only views
    @property
    @serialised
    def references(self) -> torch.Tensor:
        """The reference values, M × num_records (a view: do not modify; it changes with the next record)."""
        self._recording.require_tracking("references")
        return self._recording.table.columns(self.num_records)

    @property
    @serialised
    def reference_slots(self) -> ReferenceSlots | None:
        """Where the reference weights this process holds sit in its flat index (None during the warm-up;
        with offload, waits for pending records)."""
        return self._recording.slots

    @property
    @serialised
    def summary(self) -> RecordingSummary | None:
        """What observers read of the statistics: a frozen :class:`~cmd_online.summary.RecordingSummary` of them
        now (None during the warm-up; with offload, waits for pending records)."""
        stats = self._recording.stats
        return None if stats is None else RecordingSummary.of(stats)

    @property
    @serialised
    def moments(self) -> StreamingMoments | None:
        """Internal: the live streaming statistics, for tests and benchmarks (None during the warm-up; with
        offload, waits for pending records). They change with every record and may change shape between
        versions; observers read :attr:`summary`."""
        return self._recording.stats

    @serialised
    def fit_blocks(self, block: int | None = None, tensors: list[int] | None = None) -> Iterator[FitBlock]:
        """The fit of every local weight, block by block: extra memory of a few blocks, whatever N.

        Each block lies inside one parameter; references are pinned to a = 1, b = 0 in their mode.

        Args:
            block (int): weights per block (default: a cache-sized block on CPU, larger on accelerators).
            tensors (list of int): only the blocks of these parameters (default all).
        """
        self._recording.require_tracking("fit_blocks")
        self._recording.report_skips()
        return self._recording.fit_blocks(block, tensors)

    # ----------------------------------------------------------------------------- CMD weights and the fit
    def _cmd_tensors(self, at: int, what: str = "cmd_parameters") -> Iterator[tuple[int, torch.Tensor]]:
        """(parameter, its CMD weights at record ``at``), one parameter at a time."""
        self._recording.require_tracking(what)
        return self._recording.cmd_tensors(at, self._parameters.current_dtypes())

    @serialised
    def cmd_parameters(self, at: int = -1) -> list[torch.Tensor]:
        """CMD weights at record ``at``, one tensor per optimizer parameter (local shards under FSDP)."""
        return [tensor for _, tensor in self._cmd_tensors(at)]

    @serialised
    def cmd_state_dict(self, at: int = -1) -> dict[str, Any]:
        """The model's state_dict with CMD weights for the recorded parameters (buffers are live)."""
        model = self._parameters.model()
        self._recording.require_tracking("cmd_state_dict")
        self._parameters.refuse_if_replaced("cmd_state_dict")
        params = self.params
        full = self._shards.full_tensors(self._shards.agreed("cmd_state_dict()", lambda: self.cmd_parameters(at)),
                                         params)
        by_id = {id(p): v for p, v in zip(params, full)}
        sd = model.state_dict(keep_vars=True)
        # the parameters the optimizer does not hold are the live ones, whole (gathered under FSDP2)
        return {k: by_id[id(v)] if id(v) in by_id else dist_utils.whole(v) if isinstance(v, torch.Tensor) else v
                for k, v in sd.items()}

    @serialised
    def export(self, path, at: int = -1) -> None:
        """Write ``cmd_state_dict(at)`` as a normal checkpoint, atomically (rank 0 only when distributed).

        Load it with ``model.load_state_dict(torch.load(path))``.
        """
        self._recording.require_tracking("export")
        self._parameters.refuse_if_replaced("export")
        sd = self.cmd_state_dict(at)
        if dist_utils.is_writer():
            atomic_save(sd, path)

    @serialised
    def trajectory(self) -> CMDTrajectory:
        """The CMD model so far, as a :class:`CMDTrajectory` with full tensors.

        Under FSDP2 it is collective: every rank gathers a, b (float32, float64 for a float64 model)
        and the modes (int32) of all N weights, 12 bytes per weight of the whole model, plus as much
        again for a moment; for a model whose a and b do not fit in one process, save
        :meth:`trajectory_state_dict` with torch.distributed.checkpoint instead.
        """
        recording = self._recording
        recording.require_tracking("trajectory")
        a, b, modes, totals = self._shards.agreed("trajectory()", recording.clustered_fit)
        meta = recording.trajectory_meta(totals)
        a, b, modes = (self._shards.gather_flat(x, recording.sizes) for x in (a, b, modes))
        return CMDTrajectory(**meta, a=a, b=b, modes=modes)

    @serialised
    def add_metrics(self, metrics: dict[str, float], at: int = -1) -> None:
        """Keep metrics of record ``at`` — e.g. the trained and the CMD model's test accuracy — for
        :meth:`trajectory` (``CMDTrajectory.metrics``) and so for its report (``cmd-online report``).

        Args:
            metrics (dict): metric name → number (a float, int or one-element tensor). A name
                ``"group/label"`` is drawn with the other labels of its group in one panel of the
                report, e.g. ``{"test accuracy/trained": 0.95, "test accuracy/CMD": 0.97}``.
            at (int): the record they belong to; negative counts from the end (default -1, the last).

        Adding a metric again at the same record replaces it. Metrics are kept in ``state_dict()``.
        """
        self._recording.add_metrics(metrics, at)

    @serialised
    def trajectory_state_dict(self) -> dict[str, Any]:
        """The CMD model as a state_dict for ``torch.distributed.checkpoint``, without gathering anything.

        ``{"meta": bytes, "a", "b", "modes": {parameter name: a tensor shaped like the parameter}}``,
        placed like the parameters (DTensors under FSDP2): ``dcp.save({"trajectory": ...})`` writes each
        rank's part; :func:`cmd_online.checkpoint.load_trajectory` reads it back as a
        :class:`CMDTrajectory` in one process. Collective under FSDP2 (the modes' R² are summed). Outside
        FSDP2 ``meta`` holds a checksum of a, b and the modes, which ``CMDTrajectory.from_state_dict`` checks.
        """
        self._recording.require_tracking("trajectory_state_dict")
        fit = self._shards.agreed("trajectory_state_dict()", self._recording.clustered_fit)
        return write_trajectory_state(self._recording, fit)

    @serialised
    def r2(self) -> list[torch.Tensor]:
        """Each weight's R² (ρ² with its mode's reference) over the window, per parameter (local shards)."""
        self._recording.require_tracking("r2")
        return self._recording.r2()

    @serialised
    def nbytes(self) -> dict[str, int]:
        """Bytes held in tensors by this recorder, by part (statistics, scratch, history, references,
        indices, the offload's host ``staging`` buffers) and their ``total``."""
        out = {**self._recording.nbytes(), "staging": 0 if self._offload is None else self._offload.nbytes()}
        out["total"] = sum(out.values())
        return out

    @serialised
    def log(self, writer, step: int | None = None) -> None:
        """Log mode statistics to a TensorBoard ``writer`` now, at ``step`` (default: the last record).

        Mode statistics are written every ``log_every`` calls' records, as with ``writer=``; one
        logger per writer keeps that schedule (held weakly with the writer).
        """
        self._shortcut.log(self, writer, self.num_records - 1 if step is None else step)
