"""Atomic writes and safe reads of the library's files.

Every file is written to a temporary file in the target's folder, flushed to disk and renamed over
the target, so a crash mid-write leaves the previous file intact. Reading uses
``torch.load(weights_only=True)``, which refuses pickles that would construct arbitrary objects.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, and rename it over ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def safe_load(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a ValueError that says why."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a {what} file")
    try:
        _verify_checksums(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r} is not a {what} file, or holds objects that are refused "
                         f"for safety (weights_only load): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, KeyError, ValueError,
            IndexError, TypeError, UnicodeDecodeError, AssertionError) as e:  # torch asserts on a bad pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r} is not a readable {what} file (truncated or corrupted?): {first}") from None


def read_checkpoint(item: Any, what: str = "checkpoint") -> Mapping:
    """A model's state_dict from a checkpoint: a mapping itself, or a file holding one.

    A file may hold the state_dict itself or nest it under ``"state_dict"`` or ``"model"`` (as
    training checkpoints often do); a dict given directly is taken as the state_dict. Files written
    by this library (trajectories, recorder states) are refused: they are not checkpoints.

    Args:
        item (mapping, str or path): the state_dict, or the path of a file holding one.
        what (str): how to name the item in an error, e.g. ``"checkpoints[3]"`` (default "checkpoint").
    """
    if isinstance(item, (str, os.PathLike)):
        path, item = item, safe_load(item, "checkpoint")
        if isinstance(item, Mapping) and isinstance(item.get("format"), str) and item["format"].startswith("cmd_online."):
            raise ValueError(f"{str(path)!r} is a {item['format']} file, not a checkpoint (a model's state_dict)")
        for key in ("state_dict", "model"):
            if isinstance(item, Mapping) and isinstance(item.get(key), Mapping):
                item = item[key]
                break
        if not isinstance(item, Mapping) or not any(isinstance(v, torch.Tensor) for v in item.values()):
            raise ValueError(f"{str(path)!r} is not a checkpoint: expected a state_dict (names → tensors), "
                             f"or a dict holding one under 'state_dict' or 'model'")
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"{what} must be a state_dict (a mapping of names to tensors) or a path; "
                        f"got {type(item).__name__}")
    return item


def _verify_checksums(path: Path) -> None:
    """Read every member of a zip file through its CRC-32: torch.load does not, so a flipped byte loads silently."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0:  # written with torch.serialization.set_crc32_options(False): nothing to check
                continue
            with archive.open(info) as member:  # raises BadZipFile at the end on a CRC mismatch
                while member.read(1 << 24):
                    pass


def check_format(obj: Any, path: str | os.PathLike, kind: str, versions: tuple[int, ...]) -> dict:
    """Check that a loaded object is a dict written by this library as ``kind`` in a known version."""
    if not isinstance(obj, dict) or obj.get("format") != kind:
        raise ValueError(f"{str(path)!r} is not a {kind} file")
    version = obj.get("version")
    if version not in versions:
        raise ValueError(f"{str(path)!r} is a {kind} file of version {version!r}, which this cmd_online "
                         f"does not read (known: {', '.join(map(str, versions))}); upgrade cmd_online")
    return obj
