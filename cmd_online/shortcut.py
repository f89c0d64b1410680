"""The recorder's TensorBoard shortcut: ``writer=``, ``log_every`` and ``rec.log(writer)``.

``CMDRecorder(..., writer=w, log_every=k)`` is ``callbacks=[TensorBoardLogger(w, every=k)]`` written
shorter; ``rec.log(writer)`` logs now through a logger kept per writer. The recorder's ``writer``,
``log_every`` and ``log`` delegate to a :class:`WriterShortcut`, which builds its
``cmd_online.tensorboard.TensorBoardLogger`` only when a writer is given (importing the logger costs
its plotting code). :func:`flush_writers` flushes the writers of such loggers at the interpreter's exit.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any, Iterable

from .config import check_int
from .distributed import is_writer


def tensorboard_logger(writer, every: int):
    """A ``TensorBoardLogger`` of ``writer`` (imported only when asked for)."""
    from .tensorboard import TensorBoardLogger

    return TensorBoardLogger(writer, every=every)


class WriterShortcut:
    """A recorder's ``writer=`` logger and interval, and the loggers of ``log(writer)`` (held weakly with their
    writers)."""

    def __init__(self, writer=None, every: int = 10):
        self._every = check_int("log_every", every, 1)
        self._logger = None if writer is None else tensorboard_logger(writer, self._every)
        self._loggers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def writer(self):
        """The SummaryWriter of the ``writer=`` logger (None if none); settable."""
        return None if self._logger is None else self._logger.writer

    @writer.setter
    def writer(self, writer) -> None:
        self._logger = None if writer is None else tensorboard_logger(writer, self._every)

    @property
    def every(self) -> int:
        """The ``writer=`` logger's interval of mode statistics, in records; settable."""
        return self._every

    @every.setter
    def every(self, every: int) -> None:
        self._every = check_int("log_every", every, 1)
        if self._logger is not None:
            self._logger.every = self._every

    def observers(self) -> list:
        """The ``writer=`` logger as an observer list (empty without a writer)."""
        return [] if self._logger is None else [self._logger]

    def log(self, rec, writer, step: int) -> None:
        """Log ``rec``'s mode statistics to ``writer`` now, at ``step``, on the writing process only; one logger per
        writer keeps the ``log_every`` schedule."""
        if not is_writer():
            return
        logger = self._loggers.get(writer)
        if logger is None:
            logger = self._loggers[writer] = tensorboard_logger(writer, self._every)
        logger.log(rec, step)


def flush_writers(observers: Iterable[Any]) -> None:
    """Flush the writers of the ``TensorBoardLogger`` observers (what they were told reaches the disk, e.g. at
    the interpreter's exit); a failure becomes a warning."""
    module = sys.modules.get("cmd_online.tensorboard")  # no logger exists unless it was imported
    if module is None:
        return
    for observer in observers:
        if isinstance(observer, module.TensorBoardLogger):
            try:
                observer.writer.flush()
            except Exception as e:  # a closed or broken writer must not stop anything
                warnings.warn(f"CMDRecorder: flushing {type(observer.writer).__name__} failed: {e!r}",
                              RuntimeWarning, stacklevel=2)
