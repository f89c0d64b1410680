"""Putting CMD weights into the model: torch_ema's primitives, ``store``, ``copy_to``, ``restore``, and
``swapped()`` made of them; FSDP2-aware (the model's FSDP modules are resharded on entry and exit).

:class:`Swapping` is a part of :class:`~cmd_online.recorder.CMDRecorder` (its base class): the swap's
state (the stored weights, the swapped count) and rules live here, the CMD weights come from the
recorder. It relies on the recorder's ``_locked()`` (its lock, after pending records), ``_lock``,
``_shards``, ``_parameters``, ``params``, ``ready``, ``_recording``, ``config`` and ``_cmd_tensors(at, what)``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

from . import distributed as dist_utils


def _copy_back(params: list[torch.Tensor], saved: list[torch.Tensor], model: torch.nn.Module | None = None) -> None:
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    if model is not None:  # FSDP2: no unsharded copy of the CMD weights may outlive the block
        dist_utils.reshard(model)


class Swapping:
    """The swap primitives of a recorder (see the module)."""

    def __init__(self):
        self._swapped = 0  # swapped() blocks open: the parameters hold CMD weights
        self._stored: list[torch.Tensor] | None = None  # store(): the trained weights (local shards), until restore()
        self._warned_swapped_step = self._warned_fallback = False

    def store(self) -> None:
        """Keep a copy of the trained weights (this process's shards under FSDP2), to be put back by :meth:`restore`.

        From ``store()`` to ``restore()`` the parameters count as swapped, as inside :meth:`swapped`: ``record()``
        is refused and optimizer steps are not counted. One copy at a time: a second ``store()`` before
        ``restore()`` raises a RuntimeError."""
        with self._locked():
            if self._stored is not None:
                raise RuntimeError("store(): the trained weights are stored already; restore() them first")
            self._sharded_model()  # under FSDP2 the swap needs the model: refused before anything changes
            self._stored = [p.detach().clone() for p in self._shards.local(self.params)]
            self.mark_swapped(True)

    def copy_to(self, at: int = -1) -> None:
        """Write the CMD weights at record ``at`` into the parameters, after :meth:`store` (a RuntimeError
        otherwise: the trained weights would be lost). Under FSDP2 it needs ``model`` and reshards its FSDP
        modules. During the warm-up, ``at=-1`` leaves the trained weights in place (a UserWarning, once), as
        :meth:`swapped` does. On an error the stored weights are put back and the error is raised."""
        self._copy_in(at, "copy_to")

    def _copy_in(self, at: int, what: str) -> None:
        """:meth:`copy_to`, its errors and notices naming ``what`` (the method the user called)."""
        with self._locked():
            if self._stored is None:
                raise RuntimeError("copy_to() overwrites the trained weights: call store() first (or use swapped())")
            if at == -1 and self._fallback(what):
                return
            self._recording.require_tracking(what)
            self._parameters.refuse_if_replaced(what)
            model = self._sharded_model()
            local = self._shards.local(self.params)
            try:
                with torch.no_grad():
                    for i, value in self._cmd_tensors(at, what):
                        local[i].copy_(value)
            except BaseException:
                _copy_back(local, self._stored, model)
                raise
            if model is not None:
                dist_utils.reshard(model)  # FSDP2's unsharded copies of the trained weights must go

    def restore(self, keep: bool = False) -> list[torch.Tensor] | None:
        """Put the weights :meth:`store` kept back into the parameters, and end the swap.

        With ``keep``, returns a copy of what each parameter held before (the CMD weights of :meth:`copy_to`), in
        the order of ``params``, copied one parameter at a time (no more memory than the swap itself); else None.
        A RuntimeError if nothing is stored."""
        with self._locked():
            if self._stored is None:
                raise RuntimeError("restore(): nothing is stored; call store() (and copy_to()) first")
            saved, self._stored = self._stored, None
            local = self._shards.local(self.params)
            kept: list[torch.Tensor] = []
            try:
                with torch.no_grad():
                    for p in reversed(local):  # each stored copy is freed once it is back
                        value = saved.pop()
                        if keep:
                            kept.append(p.detach().clone())
                        p.copy_(value)
                        del value
                model = self._sharded_model()
                if model is not None:  # FSDP2: no unsharded copy of the CMD weights may outlive the swap
                    dist_utils.reshard(model)
            finally:
                self.mark_swapped(False)
            return kept[::-1] if keep else None

    @property
    def stored_parameters(self) -> list[torch.Tensor] | None:
        """The trained weights :meth:`store` kept, in the order of ``params`` (a view: do not modify), or None."""
        return self._stored

    @property
    def is_swapped(self) -> bool:
        """Whether the parameters count as swapped now: inside :meth:`swapped`, between :meth:`store` and
        :meth:`restore`, or between ``mark_swapped(True)`` and ``mark_swapped(False)``."""
        return self._swapped > 0

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """Context manager: CMD weights live in the parameters inside it; the trained ones come back on exit.
        It is :meth:`store`, :meth:`copy_to` and :meth:`restore`.

        During the warm-up (no CMD weights yet) ``swapped()`` with the default ``at=-1`` leaves the
        trained weights in place, so that an evaluation loop needs no guard, and says so once in a
        UserWarning; ``ready`` tells the two apart. An explicit ``at`` during the warm-up, or a query
        before any record, raises a RuntimeError.

        Inside it nothing is recorded: ``record()`` is refused, and an optimizer step (which would train the
        CMD weights, replaced on exit) warns once and is not counted for ``record_every``."""
        if at == -1 and self._fallback("swapped"):
            with self._marked_swapped():  # the trained weights stay; still nothing is recorded inside the block
                yield
            return
        self.store()
        try:
            self._copy_in(at, "swapped")
            yield
        finally:
            self.restore()

    def mark_swapped(self, on: bool = True) -> None:
        """Enter (``on``) or leave (``on=False``) a span in which the parameters hold other weights than the
        trained ones, as inside :meth:`swapped` (which marks itself): ``record()`` is refused and optimizer
        steps are not counted meanwhile. For code that writes other weights into the parameters itself (the
        swap primitives mark themselves); calls nest and must pair up."""
        with self._lock:
            self._swapped += 1 if on else -1
            if on:
                self._warned_swapped_step = False

    @contextlib.contextmanager
    def _marked_swapped(self) -> Iterator[None]:
        self.mark_swapped(True)
        try:
            yield
        finally:
            self.mark_swapped(False)

    def _fallback(self, what: str) -> bool:
        """During the warm-up: True, and a one-time notice that ``what`` runs on the trained weights. False once CMD
        weights exist, and when optimizer steps were taken but never a record without ``record_every`` (the
        query's error says what to do)."""
        recording = self._recording
        if self.ready or (recording.untouched() and recording.steps > 0
                          and self.config.record_every is None):  # record() forgotten (record_every records later)
            return False
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(f"CMDRecorder: {what}() during the warm-up ({self.config.warmup - recording.records()} more "
                          f"record(s) until CMD weights exist) keeps the trained weights in the model; check "
                          f"rec.ready to tell them apart (this notice comes once)", UserWarning, stacklevel=4)
        return True

    def _sharded_model(self) -> torch.nn.Module | None:
        """Under FSDP2, the model (whose FSDP modules ``swapped`` reshards); None otherwise."""
        if not self._shards.sharded:
            return None
        if not self._parameters.has_model:
            raise ValueError("swapped() under FSDP2 needs the model: pass model= to CMDRecorder, so that FSDP's "
                             "unsharded copies of the trained weights are dropped on entry and exit")
        return self._parameters.model()

    def _refuse_record_when_swapped(self) -> None:
        if self._swapped:
            raise RuntimeError("record() inside swapped(): the parameters hold the CMD weights, not the trained "
                               "ones, and would enter the statistics as a point of the trajectory (during the "
                               "warm-up swapped() keeps the trained weights, and still nothing is recorded "
                               "inside it); record after the block")

    def _warn_swapped_step(self) -> None:
        """An optimizer step inside the swap: it is lost; said once per swap."""
        if not self._warned_swapped_step:
            self._warned_swapped_step = True
            warnings.warn("CMDRecorder: optimizer.step() inside swapped(): it changes the CMD weights, which "
                          "the end of the block replaces by the trained ones, so the step is lost (during the "
                          "warm-up, where swapped() keeps the trained weights, it trains them); it is not "
                          "counted for record_every and no record is taken inside the block. Train outside "
                          "swapped()", RuntimeWarning, stacklevel=5)
