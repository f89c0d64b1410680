"""How the recorder sees parameters that torch.distributed may have sharded.

Plain tensors (single process, or DDP where every rank holds identical copies) need nothing: each
rank records the same values and reaches the same state without communication.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .layout import GatherPlan, Layout


def is_writer() -> bool:
    """True on the process that writes files and logs: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ShardInfo:
    """Parameters held whole by this process (single process or DDP)."""

    @staticmethod
    def of(params: Sequence[torch.Tensor]) -> "ShardInfo":
        return ShardInfo()

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

    def full_tensors(self, local: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from this process's parts."""
        return list(local)

    def full_flat(self, local: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat vector over all parameters from per-parameter local parts."""
        return torch.cat([t.reshape(-1) for t in local])

    def describe(self) -> dict:
        return {"kind": "whole"}
