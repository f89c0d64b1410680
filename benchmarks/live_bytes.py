"""The bytes of the tensors torch creates and frees, counted as they happen: a peak that leaves out what
the process's resident size also holds (library code, the allocator's free lists).

Used by ``benchmarks/cost.py --summary`` and by ``tests/test_lean.py``.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors created inside the mode and still alive, and their peak (views of a storage
    created before, such as a statistic's block, count nothing)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._seen:
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if size and key not in self._known:
                    self._seen.add(key)
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.now -= size

    def known(self, tensors) -> "LiveBytes":
        self._known = {t.untyped_storage().data_ptr() for t in tensors}
        return self


def recorder_peaks(rec, record) -> tuple[float, float]:
    """``record()`` (which records into ``rec``) under a :class:`LiveBytes`: (bytes the recorder held before,
    the most the record added on top: tensors created inside it and alive at once). The parameters and
    the recorder's own statistics and scratch are known: their blocks and views count nothing."""
    known = list(rec.params)
    stats = rec.moments
    if stats is not None:
        known += [v for t in stats.tensors().values() for v in (t if isinstance(t, list) else [t])]
        known += [stats.scratch, stats.own_scratch, stats.index_scratch]
    before = rec.nbytes()["total"]
    with LiveBytes().known(known) as live:
        record()
    return before, live.peak
