"""The reference weights of a recording: their values at every record, and where they sit.

:class:`ReferenceTable` is the M × T table of reference values, one column per record, that grows
with the records. :class:`ReferenceSlots` says which of the M reference weights this process holds
and where in its flat index: a reference reproduces itself exactly (a = 1, b = 0, its own mode), so
every fit pins those positions (:func:`cmd_online.stats.pin_references`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ReferenceTable:
    """M × capacity values; columns [0, length) are records, the capacity doubles when full.

    Args:
        values (tensor): the first columns, M × T0 (copied; the table keeps their dtype).
        min_capacity (int): columns allocated at least (default 64).
    """

    def __init__(self, values: torch.Tensor, min_capacity: int = 64):
        M, T = values.shape
        self._values = torch.zeros(M, max(2 * T, min_capacity), dtype=values.dtype, device=values.device)
        self._values[:, :T] = values

    @property
    def capacity(self) -> int:
        return self._values.shape[1]

    @property
    def device(self) -> torch.device:
        return self._values.device

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns (doubling the capacity as often as needed)."""
        capacity = self.capacity
        if columns <= capacity:
            return
        while capacity < columns:
            capacity *= 2
        grown = torch.zeros(self._values.shape[0], capacity, dtype=self._values.dtype, device=self._values.device)
        grown[:, :self.capacity] = self._values
        self._values = grown

    def write(self, column: int | torch.Tensor, values: torch.Tensor) -> None:
        """Set column ``column`` (an int, or a 0-dim device tensor: no host sync) to ``values`` (M,)."""
        if isinstance(column, torch.Tensor):
            self._values.index_copy_(1, column.reshape(1).long(), values.reshape(-1, 1))
        else:
            self.reserve(column + 1)
            self._values[:, column] = values

    def columns(self, length: int) -> torch.Tensor:
        """The first ``length`` columns, M × length (a view: it changes with the next records)."""
        return self._values[:, :length]

    def nbytes(self) -> int:
        return self._values.numel() * self._values.element_size()


@dataclass(frozen=True)
class ReferenceSlots:
    """The reference weights this process holds: their positions in its flat index and their modes.

    Attributes:
        positions (tuple of int): flat positions (in this process's local flat index), ascending.
        modes (tuple of int): the mode each is the reference of.
    """

    positions: tuple[int, ...]
    modes: tuple[int, ...]

    def within(self, start: int, stop: int) -> tuple[list[int], list[int]]:
        """The slots in positions [start, stop), as (positions relative to ``start``, modes)."""
        inside = [(p - start, m) for p, m in zip(self.positions, self.modes) if start <= p < stop]
        return [p for p, _ in inside], [m for _, m in inside]
