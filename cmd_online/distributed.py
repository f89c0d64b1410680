"""How the recorder sees parameters that torch.distributed may have sharded.

Plain tensors (single process, or DDP where every rank holds identical copies) need nothing: each
rank records the same values and reaches the same state without communication (:class:`ShardInfo`).

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns parameters into DTensors sharded by rows,
``Shard(0)`` on a 1-D device mesh with ``torch.chunk`` semantics: rank r holds rows
[r·c, min((r+1)·c, d0)) with c = ⌈d0 / world_size⌉, so the last ranks may hold fewer rows or none.
:class:`RowShards` keeps statistics for those rows only. Sampled and reference weights are chosen on
the global flat index space (the same on every rank); each rank reads the ones it holds, writes
zeros elsewhere, and one small ``all_reduce(SUM)`` completes the vector (adding zeros is exact).
Full tensors are gathered only when asked (CMD state dicts, exports, trajectories).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .layout import GatherPlan, Layout, coefficient_dtype
from .references import ReferenceSlots


def _dtensor_module():
    """torch.distributed.tensor if some code has loaded it (any DTensor implies it), else None.

    Importing it costs about half a second, so a plain single-process run never does.
    """
    return sys.modules.get("torch.distributed.tensor")


def is_writer() -> bool:
    """True on the process that writes files and logs: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def ranks_text(failures: list[tuple[int, str]]) -> str:
    """'rank 1 (MemoryError: ...)' for the failures of other ranks."""
    return ", ".join(f"rank {rank} ({text})" for rank, text in failures)


def _is_dtensor(p: torch.Tensor) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(p, module.DTensor)


def whole(value: torch.Tensor) -> torch.Tensor:
    """A tensor of a module's state_dict as a plain whole tensor: a DTensor is gathered (collective)."""
    return value.full_tensor().detach() if _is_dtensor(value) else value.detach()


def reshard(model: torch.nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward (the root module's own, and every module's
    with ``reshard_after_forward=False``), so that the next forward gathers the sharded ones again."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    if kind is None:
        return
    for module in model.modules():
        if isinstance(module, kind):
            module.reshard()


class ShardInfo:
    """Parameters held whole by this process (single process or DDP)."""

    sharded = False  # True when each process holds only a part of some parameters (FSDP2)

    @staticmethod
    def of(params: Sequence[torch.Tensor], model: torch.nn.Module | None = None) -> "ShardInfo":
        """The sharding of ``params``: whole tensors, or row shards for FSDP2 DTensors.

        Args:
            params (list of tensors): the optimizer's parameters, in order.
            model (torch.nn.Module): only to name a parameter in an error (default None).

        Raises ValueError for DTensor placements the recorder cannot follow (anything but ``Shard(0)``
        or ``Replicate()`` on one 1-D mesh), naming the parameter and its placements.
        """
        if not any(_is_dtensor(p) for p in params):
            return ShardInfo(params)
        return RowShards(params, model)

    def __init__(self, params: Sequence[torch.Tensor]):
        self._rows = [(0, p.shape[0] if p.dim() else 1) for p in params]

    def local(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The part of each parameter this process holds."""
        return list(params)

    def gather_plan(self, layout: Layout, flat_index: torch.Tensor, device) -> GatherPlan:
        return GatherPlan(layout, flat_index, device)

    def assemble(self, values: torch.Tensor) -> torch.Tensor:
        """Values read by a gather plan, completed with the other ranks' parts (none here)."""
        return values

    def all_ranks(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-parameter flags that hold on every rank."""
        return flags

    def local_offset(self, tensor: int, offset: int) -> int | None:
        """Offset of a parameter element inside this process's part, or None if another rank holds it."""
        return offset

    def local_sizes(self, layout: Layout) -> list[int]:
        """Number of weights of each parameter this process holds."""
        return layout.sizes

    def reference_slots(self, layout: Layout, reference_index: torch.Tensor) -> ReferenceSlots:
        """Where the reference weights this process holds sit in its local flat index."""
        tensor, offset = layout.locate(reference_index)
        starts = [0]
        for size in self.local_sizes(layout)[:-1]:
            starts.append(starts[-1] + size)
        slots = []
        for m, (t, o) in enumerate(zip(tensor.tolist(), offset.tolist())):
            local = self.local_offset(t, o)
            if local is not None:
                slots.append((starts[t] + local, m))
        slots.sort()
        return ReferenceSlots(tuple(p for p, _ in slots), tuple(m for _, m in slots))

    def rows(self, i: int) -> tuple[int, int]:
        """The rows [start, stop) of parameter ``i`` this process holds."""
        return self._rows[i]

    def like_param(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """A per-weight statistic of parameter ``i`` (this process's part, shaped like it) in a state_dict:
        placed like the parameter. Here the tensor itself."""
        return local

    def from_state(self, i: int, value, shape: tuple[int, ...], field: str) -> torch.Tensor:
        """This process's part of a per-weight statistic of parameter ``i`` (whole shape ``shape``) from a
        state: a plain tensor of the whole shape (a DTensor is refused: it needs the sharded run)."""
        if _is_dtensor(value):
            raise ValueError(f"state[{field!r}] is a DTensor of a sharded run: load such a state into a sharded "
                             f"run, or reshard it with torch.distributed.checkpoint (docs/distributed.md)")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            raise ValueError(f"state[{field!r}] must be a tensor of shape {tuple(shape)}; got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return value

    def full_tensors(self, local: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from this process's parts."""
        return list(local)

    def full_flat(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat vector over all parameters from per-parameter local parts."""
        return torch.cat([t.reshape(-1) for t in local])

    def owned_part(self, i: int) -> slice:
        """The part of parameter ``i``'s local (flat) weights this process counts in sums over all ranks."""
        return slice(None)

    def gather_flat(self, flat: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """One flat vector over all parameters from this process's flat parts (``sizes`` weights each):
        here the tensor itself, no copy."""
        return flat

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every rank (in place)."""
        return values

    def agree(self, error: BaseException | None) -> list[tuple[int, str]]:
        """Whether this process's part of a step that the ranks must take together failed (``error``) on any
        rank: the other ranks' failures as (rank, "Type: message"). Here: none (one process, or DDP, whose
        ranks never communicate through the recorder)."""
        return []

    def attempt(self, work: Callable[[], Any]) -> tuple[Any, list[tuple[int, str]]]:
        """``work()`` on this process, agreed with the other ranks: under FSDP2 every rank learns whether it
        failed on any (:meth:`agree`), so that no rank goes on alone into a collective or another phase. This
        rank's error is raised once the ranks agreed; returns the result and the other ranks' failures."""
        error = result = None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then raised
            error = e
        others = self.agree(error)
        if error is not None:
            raise error
        return result, others

    def agreed(self, what: str, work: Callable[[], Any]) -> Any:
        """``work()``, this process's part of a collective query (:meth:`attempt`); another rank's failure raises
        a RuntimeError naming it."""
        result, others = self.attempt(work)
        if others:
            raise RuntimeError(f"CMDRecorder.{what} failed on {ranks_text(others)}; nothing was gathered on any rank")
        return result

    def describe(self) -> dict:
        return {"kind": "whole"}


def _at_offset_zero(t: torch.Tensor) -> torch.Tensor:
    """The same memory as ``t``, as a tensor with storage offset 0 (a slice of its storage).

    ``torch.save`` fails on a DTensor whose local tensor is a view at an offset of its storage ("invalid
    python storage"); the statistics are such views of flat buffers. The result aliases ``t``, so
    torch.distributed.checkpoint still loads in place.
    """
    if t.storage_offset() == 0:
        return t
    if t.numel() == 0:  # nothing to alias (a rank holding no rows): a tensor of its own
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    size = t.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.storage_offset() * size
    storage = t.untyped_storage()[start:start + extent * size]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, t.shape, t.stride())


class _ShardPlan:
    """Reads fixed global flat indices from this rank's row shards: zeros where another rank owns them."""

    def __init__(self, size: int, parts: list[tuple[int, torch.Tensor, torch.Tensor]], device):
        self.size = size
        self.parts = parts  # (tensor number, local offsets, positions in the output)
        self.positions = torch.cat([pos for _, _, pos in parts]) if parts else None
        self.device = device

    def __call__(self, flat_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        dtype = coefficient_dtype(t.dtype for t in flat_tensors)
        out = torch.zeros(self.size, dtype=dtype, device=self.device)  # the same dtype on every rank
        if self.positions is not None:
            values = torch.cat([flat_tensors[t].index_select(0, idx) for t, idx, _ in self.parts])
            out.index_copy_(0, self.positions, values.to(dtype))
        return out


class RowShards(ShardInfo):
    """Parameters split by rows over one 1-D device mesh (FSDP2), possibly mixed with replicated ones.

    Each parameter has the rows this rank *holds* (its local tensor) and the rows it *owns* (the
    ones it contributes to collectives): the same for ``Shard(0)``; for a replicated parameter
    (``Replicate()`` or a plain tensor, identical on every rank) every rank holds all rows and
    rank 0 owns them, so no value is counted twice.
    """

    sharded = True

    def __init__(self, params: Sequence[torch.Tensor], model: torch.nn.Module | None = None):
        names = {}
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
        mesh = None
        sharded = []
        for i, p in enumerate(params):
            what = f"parameter {names[id(p)]!r} (optimizer parameter {i})" if id(p) in names \
                else f"optimizer parameter {i}"
            if not _is_dtensor(p):
                sharded.append(False)
                continue
            placements = tuple(p.placements)
            if p.device_mesh.ndim != 1 or len(placements) != 1:
                raise ValueError(f"{what} is a DTensor on a {p.device_mesh.ndim}-D device mesh with placements "
                                 f"{placements}; CMDRecorder supports a 1-D mesh with Shard(0) or Replicate() "
                                 f"(FSDP2 fully_shard); gather it or record a 1-D sharded model")
            placement = placements[0]
            placement_types = _dtensor_module()
            row_shard = type(placement) is placement_types.Shard and placement.dim == 0 and p.dim() >= 1
            if not (row_shard or type(placement) is placement_types.Replicate):
                raise ValueError(f"{what} is a DTensor with placements {placements}; CMDRecorder supports "
                                 f"only Shard(0) (FSDP2 fully_shard's default) and Replicate(); tensor-parallel "
                                 f"or partial placements are not supported")
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise ValueError(f"{what} lives on device mesh {p.device_mesh}, other parameters on {mesh}; "
                                 f"CMDRecorder needs all sharded parameters on one mesh")
            sharded.append(row_shard)
        self.mesh, self.placements = mesh, [p.placements[0] if _is_dtensor(p) else None for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.row_sizes = [math.prod(p.shape[1:]) if p.dim() else 1 for p in params]
        # owned[r][t] = (first row, end row) of parameter t owned by rank r; held = this rank's local rows
        self.owned, self.held = [[] for _ in range(self.world_size)], []
        for p, is_sharded in zip(params, sharded):
            rows = p.shape[0] if p.dim() else 1
            chunk = -(-rows // self.world_size)
            for r in range(self.world_size):
                start = min(r * chunk, rows) if is_sharded else 0
                stop = min(start + chunk, rows) if is_sharded else (rows if r == 0 else 0)
                self.owned[r].append((start, stop))
            self.held.append(self.owned[self.rank][-1] if is_sharded else (0, rows))
        self._rows = self.held
        self.device = self.local(params[:1])[0].device  # where the collectives' tensors live (NCCL: the GPU)
        for i, (p, local) in enumerate(zip(params, self.local(params))):
            start, stop = self.held[i]
            if local.numel() != (stop - start) * self.row_sizes[i]:
                raise ValueError(f"optimizer parameter {i}: local shard of shape {tuple(local.shape)} is not rows "
                                 f"[{start}, {stop}) of {tuple(p.shape)} as torch.chunk splits them; "
                                 f"CMDRecorder supports the even-chunk Shard(0) layout of fully_shard")

    def local(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():  # the local tensor itself, not an autograd view of it
            return [p.to_local() if _is_dtensor(p) else p for p in params]

    def _owned_mask(self, tensor: torch.Tensor, row: torch.Tensor, rank: int) -> torch.Tensor:
        bounds = torch.tensor(self.owned[rank], dtype=torch.int64).reshape(-1, 2)
        return (row >= bounds[tensor, 0]) & (row < bounds[tensor, 1])

    def gather_plan(self, layout: Layout, flat_index: torch.Tensor, device) -> _ShardPlan:
        flat_index = torch.as_tensor(flat_index, dtype=torch.int64).cpu()
        tensor, offset = layout.locate(flat_index)
        row_size = torch.tensor(self.row_sizes, dtype=torch.int64).clamp_min(1)[tensor]
        row = offset // row_size
        mine = self._owned_mask(tensor, row, self.rank)
        held_start = torch.tensor([s for s, _ in self.held], dtype=torch.int64)[tensor]
        local_offset = offset - held_start * row_size
        positions = torch.arange(len(flat_index))
        parts = [(t, local_offset[mine & (tensor == t)].to(device), positions[mine & (tensor == t)].to(device))
                 for t in torch.unique(tensor[mine]).tolist()]
        return _ShardPlan(len(flat_index), parts, device)

    def assemble(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def all_ranks(self, flags: torch.Tensor) -> torch.Tensor:
        as_int = flags.to(torch.int32)  # gloo and NCCL reduce int32, not bool
        dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=self.group)
        return as_int.bool()

    def local_sizes(self, layout: Layout) -> list[int]:
        return [(stop - start) * size for (start, stop), size in zip(self.held, self.row_sizes)]

    def like_param(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """The statistic as a DTensor with parameter ``i``'s mesh and placement (a plain tensor for a plain
        parameter): torch.distributed.checkpoint then saves, loads and reshards it with the model."""
        placement = self.placements[i]
        if placement is None:
            return local
        whole = self.shapes[i][:1] + tuple(local.shape[1:]) if local.dim() else self.shapes[i]
        stride = [1] * len(whole)
        for d in range(len(whole) - 2, -1, -1):
            stride[d] = stride[d + 1] * whole[d + 1]
        return _dtensor_module().DTensor.from_local(_at_offset_zero(local), self.mesh, [placement], run_check=False,
                                                    shape=torch.Size(whole), stride=tuple(stride))

    def from_state(self, i: int, value, shape: tuple[int, ...], field: str) -> torch.Tensor:
        """This rank's rows of a per-weight statistic of parameter ``i``: a DTensor's local part (as
        torch.distributed.checkpoint resharded it), or the held rows of a plain tensor of the whole shape."""
        start, stop = self.held[i]
        if _is_dtensor(value):
            local = value.to_local()
            if tuple(value.shape) != tuple(shape) or local.shape[:1] != (stop - start,) and local.dim():
                raise ValueError(f"state[{field!r}] holds rows of shape {tuple(local.shape)} of a {tuple(value.shape)} "
                                 f"statistic, but this rank holds rows [{start}, {stop}) of {tuple(shape)}: a shard "
                                 f"saved by another rank, or of another sharding (reshard with "
                                 f"torch.distributed.checkpoint)")
            return local
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            raise ValueError(f"state[{field!r}] must be a tensor of shape {tuple(shape)} or a DTensor; got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return value[start:stop] if value.dim() else value

    def local_offset(self, tensor: int, offset: int) -> int | None:
        start, stop = self.held[tensor]
        row = offset // max(self.row_sizes[tensor], 1)
        return offset - start * self.row_sizes[tensor] if start <= row < stop else None

    def _gather_flat(self, pieces: Sequence[torch.Tensor], which: Sequence[int]) -> list[torch.Tensor]:
        """Full flat tensors of parameters ``which`` from their local parts (one dtype): one all_gather."""
        sizes = [[(self.owned[r][t][1] - self.owned[r][t][0]) * self.row_sizes[t] for t in which]
                 for r in range(self.world_size)]
        mine = []
        for piece, t, size in zip(pieces, which, sizes[self.rank]):
            first = (self.owned[self.rank][t][0] - self.held[t][0]) * self.row_sizes[t]
            mine.append(piece.reshape(-1)[first:first + size])
        width = max(sum(s) for s in sizes)
        send = torch.cat(mine) if mine else pieces[0].new_zeros(0)
        send = torch.cat([send, send.new_zeros(width - send.numel())])
        received = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(received, send, group=self.group)
        parts = [torch.split(buf[:sum(s)], s) for buf, s in zip(received, sizes)]
        # Shard(0) row blocks in rank order are the row-major flat tensor
        return [torch.cat([parts[r][j] for r in range(self.world_size)]) for j in range(len(which))]

    def full_tensors(self, local: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(params)
        for dtype in sorted({t.dtype for t in local}, key=str):  # same order on every rank
            which = [i for i, t in enumerate(local) if t.dtype == dtype]
            for i, flat in zip(which, self._gather_flat([local[i] for i in which], which)):
                out[i] = flat.view(params[i].shape)
        return out

    def owned_part(self, i: int) -> slice:
        (start, stop), (held, _) = self.owned[self.rank][i], self.held[i]
        return slice((start - held) * self.row_sizes[i], (stop - held) * self.row_sizes[i])

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def agree(self, error: BaseException | None) -> list[tuple[int, str]]:
        """One all-reduce of a failure flag; only when a rank failed, an all-gather of the messages."""
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if not int(failed.item()):
            return []
        texts: list = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(texts, mine, group=self.group)
        return [(rank, text) for rank, text in enumerate(texts) if text is not None and rank != self.rank]

    def gather_flat(self, flat: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return self.full_flat(list(torch.split(flat, list(sizes))))

    def full_flat(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        dtypes = {t.dtype for t in local}
        if len(dtypes) != 1:
            raise TypeError(f"local parts must share one dtype; got {sorted(map(str, dtypes))}")
        return torch.cat(self._gather_flat(local, range(len(local))))

    def describe(self) -> dict:
        return {"kind": "row_shards", "world_size": self.world_size, "rank": self.rank,
                "rows": [list(h) for h in self.held]}
