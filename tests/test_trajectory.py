"""CMDTrajectory files: round trip, atomic writes, refusal of foreign files."""

import pytest
import torch

import cmd_online as cmdo
from cmd_online.layout import Layout


def _trajectory():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 1, generator=g) * torch.linspace(0, 1, 12) + torch.randn(300, 12, generator=g) * 0.01
    layout = Layout(("w", "b"), ((20, 10), (100,)), (torch.float32, torch.bfloat16))
    return cmdo.decompose(W, modes=3, samples=60, layout=layout)


def test_save_and_load_round_trip(tmp_path):
    traj = _trajectory()
    traj.save(tmp_path / "t.cmd")
    back = cmdo.CMDTrajectory.load(tmp_path / "t.cmd")
    for name in ("references", "reference_index", "a", "b", "modes", "mode_r2"):
        assert torch.equal(getattr(traj, name), getattr(back, name)), name
    assert back.window_start == traj.window_start and back.layout == traj.layout
    sd = back.state_dict(-1)
    assert sd["w"].shape == (20, 10) and sd["b"].dtype == torch.bfloat16


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path):
    traj = _trajectory()
    path = tmp_path / "t.cmd"
    path.write_text("old")
    traj.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.cmd"]
    assert cmdo.CMDTrajectory.load(path).num_weights == 300


def test_a_file_that_is_not_a_trajectory_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not a cmd_online.CMDTrajectory file"):
        cmdo.CMDTrajectory.load(tmp_path / "model.pt")
    (tmp_path / "text.cmd").write_text("hello")
    with pytest.raises(ValueError, match="not a readable CMD trajectory file"):
        cmdo.CMDTrajectory.load(tmp_path / "text.cmd")
    with pytest.raises(FileNotFoundError, match="not found"):
        cmdo.CMDTrajectory.load(tmp_path / "missing.cmd")


def test_an_unknown_version_is_refused(tmp_path):
    traj = _trajectory()
    traj.save(tmp_path / "t.cmd")
    payload = torch.load(tmp_path / "t.cmd", weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.cmd")
    with pytest.raises(ValueError, match="version 99"):
        cmdo.CMDTrajectory.load(tmp_path / "future.cmd")


def test_an_inconsistent_file_is_refused(tmp_path):
    traj = _trajectory()
    traj.save(tmp_path / "t.cmd")
    payload = torch.load(tmp_path / "t.cmd", weights_only=True)
    payload["modes"][0] = 7  # only 3 modes exist
    torch.save(payload, tmp_path / "bad.cmd")
    with pytest.raises(ValueError, match="modes must lie in"):
        cmdo.CMDTrajectory.load(tmp_path / "bad.cmd")
    del payload["a"]
    torch.save(payload, tmp_path / "bad2.cmd")
    with pytest.raises(ValueError, match="missing 'a'"):
        cmdo.CMDTrajectory.load(tmp_path / "bad2.cmd")


def test_reconstruct_is_the_affine_model():
    traj = _trajectory()
    at = 5
    expected = traj.a.double() * traj.references[traj.modes.long(), at].double() + traj.b.double()
    torch.testing.assert_close(traj.reconstruct(at), expected.float(), rtol=0, atol=0)
    assert traj.mode_sizes().sum() == 300


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        _trajectory().save(tmp_path / "t.cmd")
    finally:
        os.umask(mask)
    assert (tmp_path / "t.cmd").stat().st_mode & 0o777 == 0o644
