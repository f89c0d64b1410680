"""Atomic writes, safe reads and checksums of the library's files and states.

Every file is written to a temporary file in the target's folder, flushed to disk and renamed over
the target, so a crash mid-write leaves the previous file intact. Reading uses
``torch.load(weights_only=True)``, which refuses pickles that would construct arbitrary objects.
Trajectory files and recorder states carry a :func:`checksum` of their contents, checked on load,
because ``torch.load`` checks none: a flipped bit would load as a different number.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import io
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch


class _KeepWriteError:
    """Writes through to ``file`` and keeps the first OSError a write raised.

    torch's zip writer swallows that error and fails later with a RuntimeError ("unexpected pos")
    that no longer says the disk is full; :func:`atomic_write` raises the kept error instead.
    """

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_target(path: Path) -> Path:
    """The file a write to ``path`` lands in: symbolic links are followed, as ``open`` (and torch.save) does."""
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops at a loop
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    if target.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory, not a file")
    return target


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new hidden file beside ``target``, created with mode 0o666 so that the umask applies as for open().

    Its name, ``.NAME.XXXXXXXX.tmp``, is cut to the folder's name limit: a name torch.save accepts works.
    """
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    name = target.name
    while name and len(os.fsencode(f".{name}.01234567.tmp")) > limit:
        name = name[:-1]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(target.parent))


def _keep_owner_and_mode(tmp: Path, target: Path) -> None:
    """Give the new file the owner, group and permission bits of the file it replaces, if there is one."""
    try:
        old = os.stat(target)
    except FileNotFoundError:
        return
    try:
        if hasattr(os, "chown"):
            os.chown(tmp, old.st_uid, old.st_gid)
    except OSError:  # only root may give a file away: the new file then belongs to the writer
        pass
    os.chmod(tmp, stat.S_IMODE(old.st_mode))


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` (not the hidden temporary file) with the errno spelled out, e.g.
    ``No space left on device (ENOSPC)``."""
    if error.errno is None:
        return error
    code = errno.errorcode.get(error.errno, str(error.errno))
    return type(error)(error.errno, f"{error.strerror or os.strerror(error.errno)} ({code}) while writing; "
                       f"the file was left as it was", str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, and rename it over ``path``.

    Like ``torch.save``, it writes through a symbolic link (the link stays), keeps an existing file's
    permission bits (and owner, when run as root) and gives a new file 0o666 & ~umask. A failed write
    (a full disk, a file-size limit) raises the ``OSError`` naming ``path``; the temporary file is
    removed and the previous file is untouched.
    """
    path = Path(path)
    target = _write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = _create_temporary(target)
    except OSError as e:  # e.g. a folder that is not writable: its error names the temporary file
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            kept = _KeepWriteError(f)
            try:
                write(kept)
            except Exception:
                if kept.error is None:
                    raise
                raise kept.error from None
            f.flush()
            os.fsync(f.fileno())
        _keep_owner_and_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, path) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


_TRAINING_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "cmd_recorder.pt")  # not a model folder's


def replace_folder(path: str | os.PathLike, fill: Callable[[str], None]) -> Path:
    """Fill a new folder beside ``path`` and rename it into place: ``path`` never holds a partly written model."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):  # a model folder is replaced whole: never a run's output or a checkpoint folder
        held = sorted(name for name in os.listdir(path) if name in _TRAINING_STATE or re.fullmatch(r"checkpoint-\d+", name))
        if held:
            raise ValueError(f"{path!r} holds {', '.join(held[:3])}{' …' if len(held) > 3 else ''}: a training run's "
                             f"output or checkpoint folder, which writing a model folder there would replace whole; "
                             f"write the model to a folder of its own")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the usual permissions
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def safe_load(path: str | os.PathLike, what: str, map_location: Any = "cpu",
              own_checksum: Callable[[Any], bool] | None = None) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a ValueError that says why.

    The zip members' CRC-32s are checked first, unless ``own_checksum`` is given: it is then called on
    the loaded object and returns True where the object carries its own :func:`checksum` (which the
    caller checks, with the object's other checks), False for one without (a file of an earlier
    version), whose CRC-32s are then checked.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a {what} file")
    try:
        if own_checksum is None:
            _verify_zip_members(path)
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: not news to the user
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
        if own_checksum is not None and not own_checksum(obj):
            _verify_zip_members(path)
        return obj
    except pickle.UnpicklingError as e:
        raise ValueError(f"{str(path)!r} is not a {what} file, or holds objects that are refused "
                         f"for safety (weights_only load): {_refusal_reason(e)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, KeyError, ValueError,
            IndexError, TypeError, UnicodeDecodeError, AssertionError) as e:  # torch asserts on a bad pickle
        raise ValueError(f"{str(path)!r} is not a readable {what} file (truncated or corrupted?): "
                         f"{_first_line(str(e)) or type(e).__name__}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(text: str) -> str:
    text = _ANSI.sub("", text).strip()
    return text.splitlines()[0].strip() if text else ""


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """What the weights_only unpickler refused, without torch's advice to load with weights_only=False."""
    text = _ANSI.sub("", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if found:
        return found.group(1).strip()
    first = _first_line(text)
    return first if first and "weights_only" not in first else "it holds more than tensors and plain values"


# ------------------------------------------------------------------------------------------ framework files
# What the framework callbacks (cmd_online.integrations) and the Hugging Face Trainer write; cmd_online.saved reads
# the rest of it.
CALLBACK_FORMAT = "cmd_online.integrations.CMDCallback"  # integrations._common.STATE_FORMAT
TRAINED = "trained_weights"  # the trained weights in a Lightning callback state
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a model's weights as the Trainer and ``save_pretrained`` write them."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in WEIGHT_FILES)


def read_model_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a model folder: ``model.safetensors`` (or its shards), else ``pytorch_model.bin``
    (or its shards, read with ``weights_only=True``)."""
    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(file.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{str(file)!r} is not a readable weight index: {e}") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weights(path / shard))
            return state
        return _read_weights(file)
    raise ValueError(f"{str(path)!r} is a folder without model weights (none of {', '.join(WEIGHT_FILES)})")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    state = safe_load(file, "checkpoint")
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(file)!r} does not hold a state_dict")
    return dict(state)


def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (the ``safetensors`` package, which the Trainer installs)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(file)!r}")
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - installed with transformers
        raise ValueError(f"reading {str(file)!r} needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged file
        raise ValueError(f"{str(file)!r} is not a readable safetensors file: {e}") from None


def trained_weights(checkpoint: Mapping) -> dict[str, torch.Tensor] | None:
    """The trained weights a Lightning checkpoint carries in its CMD callbacks' state (when its
    ``state_dict`` holds the CMD weights that were validated), else None."""
    states = checkpoint.get("callbacks")
    if not isinstance(states, Mapping):
        return None
    out: dict[str, torch.Tensor] = {}
    for state in states.values():
        if isinstance(state, Mapping) and state.get("format") == CALLBACK_FORMAT and isinstance(state.get(TRAINED), Mapping):
            out.update(state[TRAINED])
    return out or None


def read_checkpoint(item: Any, what: str = "checkpoint") -> Mapping:
    """A model's state_dict from a checkpoint: a mapping itself, or a file holding one.

    A file may hold the state_dict itself or nest it under ``"state_dict"`` or ``"model"`` (as
    training checkpoints often do); a dict given directly is taken as the state_dict. A folder of model
    weights as the Hugging Face Trainer writes them (``checkpoint-N``: ``model.safetensors``, its shards,
    or ``pytorch_model.bin``) and a ``.safetensors`` file are read too. A Lightning checkpoint whose
    ``state_dict`` holds the CMD weights that were validated gives the trained weights its CMD callback
    state carries. Files written by this library (trajectories, recorder states) are refused: they are
    not checkpoints.

    Args:
        item (mapping, str or path): the state_dict, or the path of a file holding one.
        what (str): how to name the item in an error, e.g. ``"checkpoints[3]"`` (default "checkpoint").
    """
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir() and is_model_folder(path):  # a Trainer checkpoint-N folder, a save_pretrained folder
            return read_model_folder(path)
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        item = safe_load(path, "checkpoint")
        if isinstance(item, Mapping) and isinstance(item.get("format"), str) and item["format"].startswith("cmd_online."):
            raise ValueError(f"{str(path)!r} is a {item['format']} file, not a checkpoint (a model's state_dict)")
        trained = trained_weights(item) if isinstance(item, Mapping) else None
        for key in ("state_dict", "model"):
            if isinstance(item, Mapping) and isinstance(item.get(key), Mapping):
                item = item[key]
                break
        if trained:  # a Lightning checkpoint holding the validated CMD weights: the trained ones are the record
            item = {**item, **trained}
        if not isinstance(item, Mapping) or not any(isinstance(v, torch.Tensor) for v in item.values()):
            raise ValueError(f"{str(path)!r} is not a checkpoint: expected a state_dict (names → tensors), "
                             f"or a dict holding one under 'state_dict' or 'model'")
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"{what} must be a state_dict (a mapping of names to tensors) or a path; "
                        f"got {type(item).__name__}")
    return item


def _verify_zip_members(file) -> None:
    """Read every member of a zip file (a path or a binary file object) through its CRC-32: torch.load does
    not, so a flipped byte loads silently."""
    if not zipfile.is_zipfile(file):
        return
    with zipfile.ZipFile(file) as archive:
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
    if type(version) is not int:  # True and 1.0 equal 1, but no writer stores them
        raise ValueError(f"{str(path)!r} is a damaged {kind} file: its version must be an int; got {version!r}")
    if version not in versions:
        raise ValueError(f"{str(path)!r} is a {kind} file of version {version!r}, which this cmd_online "
                         f"does not read (known: {', '.join(map(str, versions))}); upgrade cmd_online")
    return obj


def pack(obj: dict) -> bytes:
    """A dict of plain tensors and numbers as bytes (``torch.save``): the replicated part of a state.

    Written with the zip members' CRC-32s (even where ``torch.serialization.set_crc32_options(False)``
    turned them off), which :func:`unpack` checks."""
    buffer = io.BytesIO()
    with _crc32_on():
        torch.save(obj, buffer)
    return buffer.getvalue()


_CRC32_LOCK = threading.Lock()


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """torch.save with CRC-32s inside the block, whatever the global setting (torch builds without the
    setting always write them)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():
        yield
        return
    with _CRC32_LOCK:
        torch.serialization.set_crc32_options(True)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(False)


def unpack(blob: Any, field: str = "meta") -> dict:
    """:func:`pack`'s bytes back, with ``torch.load(weights_only=True)``; a ValueError for anything else."""
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"state[{field!r}] must be bytes (a version-3 state); got {type(blob).__name__}")
    try:
        _verify_zip_members(io.BytesIO(blob))
        obj = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged state
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"state[{field!r}] is not readable (damaged, or objects refused for safety): {first}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"state[{field!r}] must hold a dict; got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------ checksums
# The algorithm: each 1 MiB piece of a tensor's bytes is folded by XOR into 16 KiB (its 64-bit words, in
# rows of 2048, XORed together), whose CRC-32 (with the piece's tail) is the piece's; the checksum is the
# CRC-32 of the pieces' CRC-32s. A flipped bit flips one bit of its piece's fold, which CRC-32 always
# detects; the fold reads each byte once at memory speed, and CRC-32 runs over 1/64 of the bytes.
CHECKSUM = "xor16KiB-crc32-1MiB"
_PIECE = 1 << 20
_FOLD = 1 << 14  # bytes of a piece's fold: 2048 words
_PARALLEL = 4 << 20  # bytes from which the pieces are checked on several threads
_POOL: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (the process that made it, the pool)
_POOL_LOCK = threading.Lock()


class ChecksumError(ValueError):
    """Contents that do not match the checksum stored with them."""


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the pieces of large tensors (numpy and zlib release the GIL while they compute)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():  # a forked child has none of its parent's threads
            _POOL = os.getpid(), concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                                       thread_name_prefix="cmd_online-checksum")
        return _POOL[1]


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a flat uint8 array (a view where the tensor is a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def _piece_crc(piece) -> int:
    """CRC-32 of one piece (bytes, or a uint8 array of at most 1 MiB): its fold, then its tail."""
    if isinstance(piece, bytes) or len(piece) < 2 * _FOLD:
        return zlib.crc32(piece)
    full = len(piece) // _FOLD * _FOLD
    fold = np.bitwise_xor.reduce(piece[:full].view(np.uint64).reshape(-1, _FOLD // 8), axis=0)
    return zlib.crc32(piece[full:], zlib.crc32(fold))  # the XOR of the words' bytes, whatever their byte order


def checksum(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A checksum of labelled values: tensors (dtype, shape and bytes) and plain values (their ``repr``).

    Returns ``{"algorithm": CHECKSUM, "value": int}``, stored with the values and checked on load by
    :func:`verify_checksum`. It detects every single flipped bit (:data:`CHECKSUM`). The pieces are
    checked on several threads (numpy and zlib release the GIL): CPU tensors in place, others copied
    to the host one at a time. Tensors must be plain (not DTensors).
    """
    pieces: list = []  # bytes, or views of CPU tensors; a list of CRCs for a tensor done on its own
    size = 0

    def flush() -> None:
        nonlocal size
        if size >= _PARALLEL and (os.cpu_count() or 1) > 1:
            crcs.extend(_pool().map(_piece_crc, pieces))
        else:
            crcs.extend(map(_piece_crc, pieces))
        pieces.clear()
        size = 0

    crcs: list[int] = []
    for label, value in items:
        if isinstance(value, torch.Tensor):
            pieces.append(f"{label}|{value.dtype}|{tuple(value.shape)}".encode())
            data = _bytes_of(value)
            pieces.extend(data[i:i + _PIECE] for i in range(0, data.size, _PIECE))
            size += data.size
            if value.device.type != "cpu":  # a host copy: checked now, then freed
                flush()
        else:
            pieces.append(f"{label}|{value!r}".encode())
    flush()
    return {"algorithm": CHECKSUM, "value": zlib.crc32(np.asarray(crcs, dtype="<u4").tobytes())}


def verify_checksum(stored: Any, items: Iterable[tuple[str, Any]], what: str) -> None:
    """Raise :class:`ChecksumError` unless ``items`` match the ``stored`` :func:`checksum` (``what`` names the
    contents in the message). A checksum of an unknown algorithm is refused too."""
    if not isinstance(stored, dict) or stored.get("algorithm") != CHECKSUM or type(stored.get("value")) is not int:
        raise ChecksumError(f"{what}: its checksum entry is not one this cmd_online reads ({stored!r})")
    found = checksum(items)["value"]
    if found != stored["value"]:
        raise ChecksumError(f"{what} do not match their checksum (stored {stored['value']:#010x}, "
                            f"computed {found:#010x}): corrupted or edited")
