"""Files, continued: a full disk, long names, symlinks, permissions and a harmful pickle given to the CLI.

Each test writes real files: a real full filesystem (a tmpfs, or a file-size limit), real symlinks,
real permission bits, and runs the real ``cmd-online`` command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cmd_online as cmdo
from cmd_online.cli import main
from cmd_online.files import atomic_save, atomic_write
from test_files import small_trajectory, write_malicious

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """``python -m cmd_online.cli ARGS`` on this checkout's code, optionally under RLIMIT_FSIZE."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def limit():
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-m", "cmd_online.cli", *args], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=120)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-online: error: "), stderr
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def big_trajectory(weights: int = 100_000) -> cmdo.CMDTrajectory:
    """A trajectory whose export (weights × 4 bytes) does not fit in a 256 KiB filesystem."""
    g = torch.Generator().manual_seed(0)
    return cmdo.CMDTrajectory(torch.randn(1, 3, generator=g), [0], torch.randn(weights, generator=g),
                              torch.randn(weights, generator=g), torch.zeros(weights, dtype=torch.int32))


# ---------------------------------------------------------------------------------- a full disk
@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB tmpfs (mounting needs root), holding one small file ``old.pt``."""
    folder = tmp_path / "small_fs"
    folder.mkdir()
    with tmpfs(folder, "size=256k", "a small tmpfs"):
        torch.save({"w": torch.arange(4.0)}, folder / "old.pt")
        yield folder


@contextlib.contextmanager
def tmpfs(folder, options: str, what: str):
    """Mount a tmpfs with ``options`` on ``folder`` for the block (a skip naming ``what`` where one cannot)."""
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip(f"cannot mount {what} here: no mount command")
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or [f"status {proc.returncode}"])[0]
        pytest.skip(f"cannot mount {what} here (needs root with CAP_SYS_ADMIN): {said}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("what", ["atomic_save", "trajectory"])
def test_full_disk_raises_os_error_naming_the_path_and_keeps_the_old_file(full_disk, what):
    target = full_disk / "old.pt"
    before = target.read_bytes()
    with pytest.raises(OSError) as caught:
        if what == "atomic_save":
            atomic_save({"w": torch.zeros(100_000)}, target)
        else:
            big_trajectory().save(target)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert "No space left on device (ENOSPC)" in str(caught.value) and str(target) in str(caught.value)
    assert target.read_bytes() == before
    assert names(full_disk) == ["old.pt"]  # the temporary file is gone
    # the control: torch.save into a file object swallows the OSError and says something else
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with open(full_disk / "control.pt", "wb") as f:
            torch.save({"w": torch.zeros(100_000)}, f)


def test_cli_export_to_a_full_disk_prints_one_line_and_keeps_the_old_file(full_disk, tmp_path, capsys):
    big_trajectory().save(tmp_path / "t.cmd")
    target = full_disk / "old.pt"
    before = target.read_bytes()
    assert main(["export", str(tmp_path / "t.cmd"), "-o", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device (ENOSPC)" in line and str(target) in line
    assert target.read_bytes() == before
    assert names(full_disk) == ["old.pt"]


def test_cli_export_over_the_file_size_limit_prints_one_line_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE needs no privileges: the write fails with EFBIG, as a full disk fails with ENOSPC."""
    big_trajectory().save(tmp_path / "t.cmd")
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    torch.save({"w": torch.arange(4.0)}, target)
    before = target.read_bytes()
    proc = run_cli("export", str(tmp_path / "t.cmd"), "-o", str(target), limit_file_size=200_000)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "File too large (EFBIG)" in line and str(target) in line
    assert target.read_bytes() == before
    assert names(target.parent) == ["model.pt"]


# ---------------------------------------------------------------------------------- names, links, permissions
@pytest.mark.parametrize("name", ["n" * 254, "n" * 251 + ".pt", "é" * 127], ids=["254", "255", "254_bytes_utf8"])
def test_a_name_that_torch_save_accepts_is_accepted(tmp_path, name):
    state = {"w": torch.arange(3.0)}
    torch.save(state, tmp_path / name)  # the control: the name is legal here
    os.unlink(tmp_path / name)
    atomic_save(state, tmp_path / name)
    assert torch.equal(torch.load(tmp_path / name, weights_only=True)["w"], state["w"])
    atomic_save(state, tmp_path / name)  # and again, over the existing file
    assert names(tmp_path) == [name]


def test_writing_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "store" / "model.pt"
    real.parent.mkdir()
    real.write_bytes(b"old")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "model.pt"
    link.symlink_to(Path("..") / "store" / "model.pt")  # relative, as `ln -s` makes them
    chain = tmp_path / "latest.pt"
    chain.symlink_to(link)
    seen = []

    def write(f):
        seen.extend(names(real.parent))  # where the temporary file is while it is written
        f.write(b"new")

    atomic_write(chain, write)
    assert chain.is_symlink() and link.is_symlink() and os.readlink(link) == str(Path("..") / "store" / "model.pt")
    assert real.read_bytes() == b"new"
    assert len(seen) == 2 and seen[0].startswith(".model.pt.") and seen[0].endswith(".tmp")  # beside the target
    assert names(real.parent) == ["model.pt"] and names(link.parent) == ["model.pt"]
    # the control: torch.save writes through the link too
    torch.save({"w": torch.ones(2)}, link)
    assert link.is_symlink()
    atomic_save({"w": torch.zeros(2)}, link)
    assert link.is_symlink() and torch.equal(torch.load(real, weights_only=True)["w"], torch.zeros(2))


def test_a_dangling_symlink_is_written_through_and_a_loop_is_refused(tmp_path):
    link = tmp_path / "model.pt"
    link.symlink_to(tmp_path / "target.pt")
    atomic_save({"w": torch.ones(2)}, link)
    assert link.is_symlink() and (tmp_path / "target.pt").is_file()
    loop = tmp_path / "loop.pt"
    loop.symlink_to(tmp_path / "loop.pt")
    with pytest.raises(OSError) as caught:
        atomic_save({"w": torch.ones(2)}, loop)
    assert caught.value.errno == errno.ELOOP and caught.value.filename == str(loop)
    assert loop.is_symlink() and names(tmp_path) == ["loop.pt", "model.pt", "target.pt"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755, 0o444])
def test_overwriting_a_file_keeps_its_permission_bits(tmp_path, mode):
    target = tmp_path / "t.cmd"
    target.write_bytes(b"old")
    target.chmod(mode)
    small_trajectory().save(target)
    assert target.stat().st_mode & 0o7777 == mode
    assert cmdo.CMDTrajectory.load(target).num_weights == 40


def test_a_hard_linked_file_is_replaced_so_its_other_names_keep_the_old_content(tmp_path):
    """Atomic replacement swaps one name's file: unlike torch.save, which writes in place."""
    target, other = tmp_path / "model.pt", tmp_path / "other_name.pt"
    target.write_bytes(b"old")
    os.link(target, other)
    atomic_save({"w": torch.ones(2)}, target)
    assert other.read_bytes() == b"old" and target.read_bytes() != b"old"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_permissions_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "new.pt")
        torch.save({"w": torch.ones(2)}, tmp_path / "control.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "new.pt").stat().st_mode & 0o777 == mode == (tmp_path / "control.pt").stat().st_mode & 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_overwriting_another_users_file_as_root_keeps_its_owner(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    os.chown(target, 12345, 23456)
    atomic_save({"w": torch.ones(2)}, target)
    assert (target.stat().st_uid, target.stat().st_gid) == (12345, 23456)


# ---------------------------------------------------------------------------------- harmful pickles on the CLI
ADVICE = ("weights_only` set to `False", "weights_only=False", "add_safe_globals", "trusted source", "\x1b[")


def test_cli_on_a_bare_malicious_pickle_prints_one_line_without_torchs_advice(tmp_path):
    path, marker = tmp_path / "evil.cmd", tmp_path / "pwned"
    write_malicious(path, marker, legacy=True)
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc.stderr)  # no warning lines before it
    assert "refused for safety" in line and str(path) in line
    assert not any(words in proc.stderr for words in ADVICE), proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("bare", [True, False], ids=["bare_pickle", "torch_zip"])
@pytest.mark.parametrize("command", ["inspect", "export", "decompose"])
def test_cli_refuses_a_malicious_pickle_in_one_line_with_no_warning(tmp_path, capsys, bare, command):
    path, marker = tmp_path / "evil.cmd", tmp_path / "pwned"
    write_malicious(path, marker, legacy=bare)
    argv = {"inspect": ["inspect", str(path)], "export": ["export", str(path), "-o", str(tmp_path / "x.pt")],
            "decompose": ["decompose", str(path), str(path), "-o", str(tmp_path / "x.pt")]}[command]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 2
    assert [str(w.message) for w in caught] == []
    line = one_error_line(capsys.readouterr().err)
    reason = "Unsupported operand 149" if bare else "Unsupported global: GLOBAL exec was not an allowed global"
    assert "refused for safety (weights_only load): " + reason in line, line
    assert not any(words in line for words in ADVICE), line
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in: a read-only tmpfs as root (a mode does not stop root), else mode 0o555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=64k", "a read-only tmpfs"):
        yield folder


@pytest.mark.parametrize("what", ["atomic_save", "trajectory"])
def test_a_write_into_a_read_only_folder_names_the_path_given_not_the_temporary_file(read_only_folder, what):
    target = read_only_folder / "model.pt"
    with pytest.raises(OSError) as caught:
        if what == "atomic_save":
            atomic_save({"w": torch.zeros(3)}, target)
        else:
            small_trajectory().save(target)
    assert caught.value.errno in (errno.EROFS, errno.EACCES)
    assert caught.value.filename == str(target)  # was '.../.model.pt.XXXXXXXX.tmp'
    assert ".tmp" not in str(caught.value) and names(read_only_folder) == []


def test_cli_export_into_a_read_only_folder_names_the_output_in_one_line(read_only_folder, tmp_path):
    small_trajectory().save(tmp_path / "t.cmd")
    target = read_only_folder / "m.pt"
    proc = run_cli("export", str(tmp_path / "t.cmd"), "-o", str(target))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and str(target) in line and ".tmp" not in line, line
