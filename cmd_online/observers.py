"""The observer protocol: objects a CMDRecorder tells about its records.

An observer is any object with some of these methods; the recorder calls those it has, on every
process of a distributed run, in the order the observers were given:

- ``on_tracking_start(rec)``: the warm-up has ended — the modes and references exist now. Called
  once, at the record that ends the warm-up, before that record's ``on_record``.
- ``on_record(rec, index)``: record ``index`` has been taken (skipped records are not reported).
- ``on_close(rec)``: ``rec.close()`` was called (once, however often, until the next record).

An observer reads the recorder through its public, read-only API: ``phase``, ``num_records``,
``num_modes``, ``layout``, ``config``, ``clustering``, ``reference_index``, ``references``,
``reference_slots``, ``summary`` (a frozen :class:`cmd_online.summary.RecordingSummary` of the
statistics), ``fit_blocks()``, ``nbytes()`` and the queries. It must not change what it reads
(``rec.moments``, the live statistics, is internal). An exception raised by an observer is turned
into a ``RuntimeWarning``: observing never stops training. This module is the protocol only: ``cmd_online.tensorboard``'s
``TensorBoardLogger`` and ``MetricsLogger`` are observers (the recorder's ``writer=`` shortcut builds
one, ``cmd_online.shortcut``); the framework callbacks in ``cmd_online.integrations`` log through them.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Protocol, runtime_checkable

EVENTS = ("on_tracking_start", "on_record", "on_close")


@runtime_checkable
class RecorderObserver(Protocol):
    """The methods an observer may define (each is optional; see the module docstring)."""

    def on_tracking_start(self, rec) -> None: ...

    def on_record(self, rec, index: int) -> None: ...

    def on_close(self, rec) -> None: ...


def check_observers(observers: Iterable[Any], name: str = "callbacks") -> list[Any]:
    """The observers as a list; a TypeError naming ``name`` for an object with none of the methods."""
    if observers is None:
        return []
    if isinstance(observers, (str, bytes)) or not isinstance(observers, Iterable):
        raise TypeError(f"{name} must be a list of observers; got {type(observers).__name__}")
    out = list(observers)
    for i, observer in enumerate(out):
        if not any(callable(getattr(observer, event, None)) for event in EVENTS):
            raise TypeError(f"{name}[{i}] ({type(observer).__name__}) has none of the observer methods "
                            f"{', '.join(EVENTS)}")
    return out


def notify(observers: Iterable[Any], event: str, rec, *args: Any) -> None:
    """Call ``observer.<event>(rec, *args)`` on each observer that has it; an exception becomes a warning."""
    for observer in observers:
        method = getattr(observer, event, None)
        if method is None:
            continue
        try:
            method(rec, *args)
        except Exception as e:  # an observer must never stop training
            warnings.warn(f"CMDRecorder: observer {type(observer).__name__}.{event} failed and was skipped: {e!r}",
                          RuntimeWarning, stacklevel=4)
