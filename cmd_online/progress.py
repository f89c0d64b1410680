"""What the library tells a person at the screen: the ``cmd_online`` logger and progress bars.

The library prints nothing by default beyond warnings. It logs through ``logging.getLogger("cmd_online")``
(the end of the warm-up, where the framework callbacks wrote their exports, how long a post-hoc
decomposition read its files), at INFO, which Python shows only once you ask for it::

    import logging
    logging.basicConfig(level=logging.INFO)          # everything at INFO, or only this library's:
    logging.getLogger("cmd_online").setLevel(logging.INFO)

Long loops over files (``decompose_checkpoints``, the ``cmd-online`` commands) show a tqdm progress
bar on stderr when stderr is a terminal and tqdm is installed (the ``demo`` and ``test`` extras
have it); elsewhere (a log file, a pipe, CI, no tqdm) they show nothing.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

LOG = logging.getLogger("cmd_online")
LOG.addHandler(logging.NullHandler())  # a library's logger: the application decides what is shown

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is an interactive terminal (False for a file, a pipe, a closed stream)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        return False


def bar(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None, unit: str = "it",
        enabled: bool | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm progress bar on stderr, or unchanged.

    Args:
        iterable: what to iterate over.
        total (int): its length, if ``len`` does not know it (default None).
        desc (str): the bar's label (default None).
        unit (str): what one step is called (default "it").
        enabled (bool): None (default): a bar only when stderr is a terminal and tqdm is importable;
            True: a bar whenever tqdm is importable (e.g. in a notebook); False: never.
    """
    if enabled is False or (enabled is None and not stderr_is_terminal()):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
