"""Files: writes are atomic, and damaged or harmful files are refused with a clear message, never run."""

import os
import pickle
import re
import signal
import time
from pathlib import Path

import pytest
import torch

import cmd_online as cmdo
from cmd_online import trajectory as trajectory_module
from cmd_online.files import atomic_save, safe_load


def small_trajectory(seed: int = 0) -> cmdo.CMDTrajectory:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 12)
    W = torch.outer(torch.randn(40, generator=g), torch.exp(-3 * t)) + torch.randn(40, 1, generator=g)
    W[20:] += torch.outer(torch.randn(20, generator=g), torch.sin(6 * t))
    return cmdo.decompose(W, modes=2, samples=20)


def assert_same_trajectory(a: cmdo.CMDTrajectory, b: cmdo.CMDTrajectory):
    for name in ("references", "reference_index", "a", "b", "modes", "mode_r2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.window_start == b.window_start and a.layout == b.layout


def test_save_load_round_trip_is_exact(tmp_path):
    traj = small_trajectory()
    traj.save(tmp_path / "t.cmd")
    assert_same_trajectory(traj, cmdo.CMDTrajectory.load(tmp_path / "t.cmd"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.cmd"]  # no temporary left behind


# ---------------------------------------------------------------------------------- atomic writes
@pytest.fixture(scope="module")
def big_recorder():
    """A recorder of 400 tensors (1.6 M weights): its checkpoint is written in many pieces."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child then never enters an OpenMP region
    torch.manual_seed(1)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4096)) for _ in range(400)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=1, samples=2, warmup=3)
    for t in range(4):
        with torch.no_grad():
            for p in model:
                p.add_(0.01 * t)
        rec.record()
    yield rec, model
    torch.set_num_threads(threads)


def fork_writer(write) -> int:
    """Run ``write()`` in a forked process (no interpreter start-up); it exits 0 only if the write returned."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            write()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_mid_write(folder: Path, write) -> tuple[bool, int]:
    """Fork a process that runs ``write()``; SIGKILL it once its temporary file holds data.

    Returns (killed before the rename?, size of the temporary file it left).
    """
    temps = lambda: [e for e in os.scandir(folder) if e.name.endswith(".tmp")]  # noqa: E731
    pid = fork_writer(write)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = temps()
        if found and found[0].stat().st_size > 0:
            os.kill(pid, signal.SIGKILL)
            break
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False, 0  # finished before it was seen
    _, status = os.waitpid(pid, 0)
    left = temps()
    return os.WIFSIGNALED(status) and bool(left), left[0].stat().st_size if left else 0


@pytest.mark.parametrize("what", ["export", "trajectory"])
def test_writer_killed_mid_write_leaves_the_previous_file_intact(tmp_path, big_recorder, what):
    rec, _ = big_recorder
    target = tmp_path / ("model.pt" if what == "export" else "run.cmd")
    if what == "export":
        previous = {"0": torch.arange(5.0)}
        torch.save(previous, target)
        write = lambda: rec.export(target)  # noqa: E731
    else:
        small_trajectory().save(target)
        traj = rec.trajectory()
        write = lambda: traj.save(target)  # noqa: E731
    before = target.read_bytes()
    for _ in range(5):  # the kill may come after the rename on a very fast disk: try again
        killed, partial = kill_mid_write(tmp_path, write)
        if killed:
            break
        target.write_bytes(before)
    assert killed, "the writer was never caught mid-write"
    assert partial > 0
    print(f"killed mid-write: {partial} bytes in the temporary file")
    assert target.read_bytes() == before
    if what == "export":
        assert torch.equal(torch.load(target, weights_only=True)["0"], previous["0"])
    else:
        assert_same_trajectory(cmdo.CMDTrajectory.load(target), small_trajectory())
    # the control: left alone, the same write completes and replaces the file
    pid = fork_writer(write)
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0
    assert target.read_bytes() != before
    if what == "export":
        assert len(torch.load(target, weights_only=True)) == 400
    else:
        assert cmdo.CMDTrajectory.load(target).num_weights == 400 * 4096


def test_failed_write_removes_its_temporary_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "run.cmd"
    small_trajectory().save(target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"not a tensor": lambda: 0}, target)  # a lambda cannot be pickled
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.cmd"]


def test_save_into_a_directory_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        small_trajectory().save(tmp_path)


# ---------------------------------------------------------------------------------- damaged files
@pytest.fixture
def saved(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "good.cmd"
    small_trajectory().save(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("keep", [0, 1, 22, 0.5, -1])
def test_truncated_file_is_refused(tmp_path, saved, keep):
    _, data = saved
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "cut.cmd"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="is not a (readable )?CMD trajectory file"):
        cmdo.CMDTrajectory.load(path)


def test_corrupted_tensor_data_is_refused(tmp_path, saved):
    _, data = saved
    original = small_trajectory()
    # a byte inside the stored values of `a`: the zip still parses, only its CRC-32 can tell
    needle = original.a[17].numpy().tobytes()
    pos = data.find(needle)
    assert pos > 0
    flipped = bytearray(data)
    flipped[pos + 2] ^= 0x40
    path = tmp_path / "bad.cmd"
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        cmdo.CMDTrajectory.load(path)


def test_any_single_byte_change_is_refused_or_harmless(tmp_path, saved):
    """Flip bytes all over the file: each load either refuses with a ValueError or gives the original back."""
    _, data = saved
    original = small_trajectory()
    path = tmp_path / "fuzz.cmd"
    refused = harmless = 0
    for pos in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0xA5
        path.write_bytes(bytes(flipped))
        try:
            loaded = cmdo.CMDTrajectory.load(path)
        except ValueError:
            refused += 1
            continue
        assert_same_trajectory(loaded, original)  # e.g. a byte of zip alignment padding
        harmless += 1
    assert refused > 0.5 * (refused + harmless)


def test_wrong_version_is_refused_with_a_message_naming_it(tmp_path, saved):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["version"] = trajectory_module.VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"version {trajectory_module.VERSION + 1}.*upgrade cmd_online"):
        cmdo.CMDTrajectory.load(path)


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_version_that_only_equals_1_is_refused(tmp_path, saved, version):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["version"] = version  # True == 1 == 1.0: loaded as version 1 before
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"damaged cmd_online.CMDTrajectory file: its version must be an int; "
                                         f"got {re.escape(repr(version))}"):
        cmdo.CMDTrajectory.load(path)


@pytest.mark.parametrize("payload", [torch.zeros(3), {"a": torch.zeros(3)}, [1, 2],
                                     {"format": "cmd_online.CMDRecorder", "version": 1}])
def test_file_of_another_kind_is_refused(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="is not a cmd_online.CMDTrajectory file"):
        cmdo.CMDTrajectory.load(path)


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.pop("a"), "missing 'a'"),
    (lambda p: p.update(modes=p["modes"] + 5), "modes must lie in"),
    (lambda p: p.update(b=p["b"][:-1]), "b must be a vector"),
    (lambda p: p.update(window_start=None), "damaged"),
    (lambda p: p.update(references=p["references"][0]), "references must be M × T"),
    (lambda p: p["layout"].update(dtypes=["complex64"]), "unknown dtype name"),
    (lambda p: p["layout"].update(shapes=[[3]]), "layout covers 3 weights"),
])
def test_file_with_inconsistent_contents_is_refused(tmp_path, saved, damage, match):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=match):
        cmdo.CMDTrajectory.load(path)


def test_empty_file_directory_and_missing_file(tmp_path):
    (tmp_path / "empty.cmd").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        cmdo.CMDTrajectory.load(tmp_path / "empty.cmd")
    with pytest.raises(ValueError, match="is a directory"):
        cmdo.CMDTrajectory.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        cmdo.CMDTrajectory.load(tmp_path / "nope.cmd")


# ---------------------------------------------------------------------------------- harmful pickles
class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_malicious(path: Path, marker: Path, legacy: bool) -> None:
    payload = {"format": trajectory_module.FORMAT, "version": trajectory_module.VERSION, "a": Payload(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f)  # a bare pickle, not torch's zip format
    else:
        torch.save(payload, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the bare pickle
@pytest.mark.parametrize("legacy", [False, True], ids=["torch_zip", "bare_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    path, marker = tmp_path / "evil.cmd", tmp_path / "pwned"
    write_malicious(path, marker, legacy)
    with pytest.raises(ValueError, match="refused for safety|not a readable"):
        cmdo.CMDTrajectory.load(path)
    with pytest.raises(ValueError, match="refused for safety|not a readable"):
        cmdo.decompose_checkpoints([path, path])
    with pytest.raises(ValueError):
        safe_load(path, "checkpoint")
    assert not marker.exists()
    # the control: an unsafe load of the same file does run the code
    if legacy:
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on damaged protocol bytes
def test_damaged_pickle_without_checksums_is_refused_or_loaded_never_another_error(tmp_path):
    """Files written with CRC-32 off (torch.serialization.set_crc32_options(False)) cannot be checked: a
    flipped byte in the pickle must still give a ValueError (or load), never an exception of another kind."""
    import zipfile

    path = tmp_path / "nocrc.cmd"
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        small_trajectory().save(path)
    finally:
        torch.serialization.set_crc32_options(before)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    refused = 0
    for pos in range(start, start + info.compress_size):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            cmdo.CMDTrajectory.load(path)
        except ValueError:
            refused += 1
    assert refused > 0


def test_a_file_written_into_missing_folders_creates_them(tmp_path):
    from cmd_online.files import atomic_save

    target = tmp_path / "a" / "b" / "model.pt"
    atomic_save({"w": torch.arange(3.0)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3.0))
