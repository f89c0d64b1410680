"""CMDTrajectory files: round trip, atomic writes, refusal of foreign files."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import cmd_online as cmdo
from cmd_online.cli import main
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


# ---------------------------------------------------------------------------------- crafted files
# Well-formed files (valid zip, known format and version) whose fields are wrong, one field at a time.
# _trajectory() has M = 3 modes, N = 300 weights in layout w (20, 10) + b (100,), T = 12 records.
def _set(**fields):
    return lambda p: p.update(fields)


def _set_at(name, index, value):
    def damage(p):
        p[name][index] = value
    return damage


def _set_layout(**fields):
    return lambda p: p["layout"].update(fields)


NAN, INF = float("nan"), float("inf")
CRAFTED = {
    # field: [(case, damage, what the message must start with after "damaged CMD trajectory file: ")]
    "missing": [
        ("no modes", lambda p: p.pop("modes"), "missing 'modes'"),
        ("no layout", lambda p: p.pop("layout"), "missing 'layout'"),
    ],
    "references": [
        ("a list", lambda p: p.update(references=p["references"].tolist()), "references must be a tensor"),
        ("integers", lambda p: p.update(references=p["references"].long()), "references must be a floating"),
        ("a vector", lambda p: p.update(references=p["references"][0]), "references must be M × T"),
        ("M - 1 rows", lambda p: p.update(references=p["references"][:2]), "references must be M × T with M = 3"),
        ("no records", lambda p: p.update(references=p["references"][:, :0]), "references must hold at least one record"),
        ("NaN", _set_at("references", (1, 3), NAN), "references must be finite"),
        ("Inf", _set_at("references", (0, 0), -INF), "references must be finite"),
    ],
    "reference_index": [
        ("a list", lambda p: p.update(reference_index=[69, 33, 176]), "reference_index must be a tensor"),
        ("floats", lambda p: p.update(reference_index=p["reference_index"].double()), "reference_index must be an integer"),
        ("bools", lambda p: p.update(reference_index=torch.ones(3, dtype=torch.bool)), "reference_index must be an integer"),
        ("a matrix", lambda p: p.update(reference_index=p["reference_index"].reshape(3, 1)), "reference_index must be a"),
        ("M - 1 entries", lambda p: p.update(reference_index=p["reference_index"][:2]), "references must be M × T with M = 2"),
        ("empty", lambda p: p.update(reference_index=p["reference_index"][:0]), "reference_index must be a non-empty"),
        ("negative", _set_at("reference_index", 0, -1), "reference_index must lie in \\[0, N = 300\\)"),
        ("N", _set_at("reference_index", 2, 300), "reference_index must lie in \\[0, N = 300\\)"),
        ("repeated", lambda p: p["reference_index"].__setitem__(1, int(p["reference_index"][0])),
         "reference_index must hold distinct"),
    ],
    "a": [
        ("integers", lambda p: p.update(a=p["a"].long()), "a must be a floating"),
        ("sparse", lambda p: p.update(a=p["a"].to_sparse()), "a must be a dense tensor"),
        ("float8", lambda p: p.update(a=p["a"].to(torch.float8_e4m3fn)), "a must be a floating"),
        ("one short", lambda p: p.update(a=p["a"][:-1]), "a has 299 entries but layout covers 300 weights"),
        ("a matrix", lambda p: p.update(a=p["a"].reshape(30, 10)), "a must be a vector"),
        ("NaN", _set_at("a", 7, NAN), "a must be finite"),
        ("N = 0", lambda p: p.update(a=p["a"][:0], b=p["b"][:0], modes=p["modes"][:0],
                                     layout=dict(p["layout"], shapes=[[0, 10], [0]])), "a must hold at least one"),
    ],
    "b": [
        ("another dtype", lambda p: p.update(b=p["b"].double()), "b must have a's dtype"),
        ("one short", lambda p: p.update(b=p["b"][:-1]), "b must be a vector of N = 300"),
        ("Inf", _set_at("b", 0, INF), "b must be finite"),
        ("a tensor of objects", lambda p: p.update(b="0.5"), "b must be a tensor"),
    ],
    "modes": [
        ("floats", lambda p: p.update(modes=p["modes"].float()), "modes must be an integer"),
        ("M", _set_at("modes", 5, 3), "modes must lie in \\[0, M = 3\\)"),
        ("negative", _set_at("modes", 5, -1), "modes must lie in"),
        ("2**32, 0 once cast to int32", lambda p: p.update(modes=p["modes"].long().index_fill(0, torch.tensor([5]), 2**32)),
         "modes must lie in"),
        ("one short", lambda p: p.update(modes=p["modes"][:-1]), "modes must be a vector of N = 300"),
    ],
    "window_start": [
        ("negative", _set(window_start=-1), "window_start must lie in \\[0, T = 12\\)"),
        ("T", _set(window_start=12), "window_start must lie in \\[0, T = 12\\)"),
        ("a float", _set(window_start=2.0), "window_start must be an int"),
        ("a bool", _set(window_start=True), "window_start must be an int"),
        ("None", _set(window_start=None), "window_start must be an int"),
        ("a tensor", _set(window_start=torch.tensor(1)), "window_start must be an int"),
    ],
    "layout": [
        ("a list", _set(layout=[["w", "b"]]), "layout must be a dict"),
        ("no shapes", lambda p: p["layout"].pop("shapes"), "layout must be a dict"),
        ("negative sizes, right total", _set_layout(shapes=[[-20, -10], [100]]), "layout: tensor 'w' has a negative size"),
        ("a size as text", _set_layout(shapes=[["20", 10], [100]]), "layout: shapes must be lists of ints"),
        ("a size as float", _set_layout(shapes=[[20.0, 10], [100]]), "layout: shapes must be lists of ints"),
        ("a size as bool", _set_layout(shapes=[[20, 10], [100, True]]), "layout: shapes must be lists of ints"),
        ("a shape as int", _set_layout(shapes=[200, 100]), "layout: shapes must be lists of ints"),
        ("a name as int", _set_layout(names=["w", 7]), "layout: names must be a list of str"),
        ("a dtype missing", _set_layout(dtypes=["float32"]), "layout: names, shapes and dtypes must have the same length"),
        ("repeated names", _set_layout(names=["w", "w"]), "layout: tensor names must be unique"),
        ("an unknown dtype", _set_layout(dtypes=["float32", "int8"]), "layout: unknown dtype name 'int8'"),
        ("one weight short", _set_layout(shapes=[[20, 10], [99]]), "a has 300 entries but layout covers 299 weights"),
    ],
    "mode_r2": [
        ("one short", lambda p: p.update(mode_r2=p["mode_r2"][:2]), "mode_r2 must be a vector of M = 3"),
        ("integers", lambda p: p.update(mode_r2=torch.ones(3, dtype=torch.long)), "mode_r2 must be a floating"),
        ("NaN", _set_at("mode_r2", 1, NAN), "mode_r2 must be finite"),
        ("None", _set(mode_r2=None), "mode_r2 must be a tensor"),
    ],
}
CASES = [pytest.param(damage, start, id=f"{field}-{case}")
         for field, cases in CRAFTED.items() for case, damage, start in cases]


@pytest.fixture(scope="module")
def good_payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "t.cmd"
    _trajectory().save(path)
    return path


def _craft(good: Path, damage, folder: Path) -> Path:
    payload = torch.load(good, weights_only=True)
    damage(payload)
    path = folder / "crafted.cmd"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("damage, start", CASES)
def test_a_crafted_file_is_refused_with_a_value_error_naming_the_field(tmp_path, good_payload, damage, start):
    path = _craft(good_payload, damage, tmp_path)
    with pytest.raises(ValueError) as caught:
        cmdo.CMDTrajectory.load(path)
    prefix = f"{str(path)!r} is a damaged CMD trajectory file: "
    assert str(caught.value).startswith(prefix), str(caught.value)
    assert re.match(start, str(caught.value)[len(prefix):]), str(caught.value)


@pytest.mark.parametrize("command", ["inspect", "export"])
@pytest.mark.parametrize("damage, start", CASES)
def test_the_cli_refuses_a_crafted_file_in_one_line(tmp_path, good_payload, capsys, damage, start, command):
    path = _craft(good_payload, damage, tmp_path)
    argv = [command, str(path)] + (["-o", str(tmp_path / "x.pt")] if command == "export" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-online: error: ") and "damaged" in lines[0], captured.err
    assert not (tmp_path / "x.pt").exists()


def test_a_crafted_file_without_mode_r2_loads(tmp_path, good_payload):
    # as an earlier cmd_online wrote it: no mode_r2, and no checksum
    path = _craft(good_payload, lambda p: (p.pop("mode_r2"), p.pop("checksum")), tmp_path)
    traj = cmdo.CMDTrajectory.load(path)
    assert traj.mode_r2 is None and traj.num_modes == 3
    traj.save(tmp_path / "again.cmd")
    assert "mode_r2" not in torch.load(tmp_path / "again.cmd", weights_only=True)


@pytest.mark.parametrize("change, error, match", [
    (dict(modes=torch.zeros(300)), TypeError, "modes must be an integer"),
    (dict(reference_index=[1.0, 2.0, 3.0]), TypeError, "reference_index must be an integer"),
    (dict(a=torch.zeros(300, dtype=torch.long)), TypeError, "a must be a floating"),
    (dict(window_start=1.5), TypeError, "window_start must be an int"),
    (dict(layout=("w", "b")), TypeError, "layout must be a Layout"),
    (dict(layout=Layout(("w",), ((-300, -1),), (torch.float32,))), ValueError, "layout: tensor 'w' has a negative size"),
    (dict(reference_index=[5, 5, 6]), ValueError, "reference_index must hold distinct"),
    (dict(mode_r2=[0.5, 0.5]), ValueError, "mode_r2 must be a vector of M = 3"),
])
def test_the_constructor_checks_every_argument(change, error, match):
    traj = _trajectory()
    args = dict(references=traj.references, reference_index=traj.reference_index, a=traj.a, b=traj.b,
                modes=traj.modes, window_start=traj.window_start, layout=traj.layout, mode_r2=traj.mode_r2)
    with pytest.raises(error, match=match):
        cmdo.CMDTrajectory(**{**args, **change})


def test_the_constructor_takes_numpy_arrays_and_lists():
    import numpy as np

    traj = cmdo.CMDTrajectory(np.ones((2, 3)), np.array([0, 2]), [1.0, 2.0, 3.0], np.zeros(3, dtype=np.float32),
                              np.array([0, 1, 1]), window_start=np.int64(1), mode_r2=[1.0, 0.5])
    assert traj.reference_index.dtype == torch.int64 and traj.modes.dtype == torch.int32
    assert traj.window_start == 1 and isinstance(traj.window_start, int)
    assert torch.equal(traj.reconstruct(0), torch.tensor([1.0, 2.0, 3.0]))


def test_finite_coefficients_whose_sum_overflows_are_accepted_and_each_bad_one_counted():
    traj = _trajectory()
    big = traj.a.clone()
    big[:4] = 3e38  # finite, but their sum overflows float32: the check must look element by element
    kept = cmdo.CMDTrajectory(traj.references, traj.reference_index, big, traj.b, traj.modes, layout=traj.layout)
    assert torch.equal(kept.a, big)
    for bad in (float("nan"), float("inf")):
        damaged = big.clone()
        damaged[[7, 299]] = bad
        with pytest.raises(ValueError, match=r"^a must be finite; it holds 2 NaN or Inf value\(s\)$"):
            cmdo.CMDTrajectory(traj.references, traj.reference_index, damaged, traj.b, traj.modes, layout=traj.layout)


def test_the_constructor_takes_a_numpy_uint64_index_and_refuses_one_beyond_int64():
    import numpy as np

    args = (np.ones((2, 4)), np.array([0, 3], dtype=np.uint64), np.ones(5), np.zeros(5), np.array([0, 1, 0, 1, 0]))
    traj = cmdo.CMDTrajectory(*args)  # raised NotImplementedError ("min_all" for UInt64)
    assert traj.reference_index.tolist() == [0, 3] and traj.reference_index.dtype == torch.int64
    modes = cmdo.CMDTrajectory(*args[:4], np.array([0, 1, 0, 1, 0], dtype=np.uint32)).modes
    assert modes.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"^reference_index holds 18446744073709551615, too large for an index"):
        cmdo.CMDTrajectory(args[0], np.array([0, 2**64 - 1], dtype=np.uint64), *args[2:])
    with pytest.raises(ValueError, match=r"^reference_index must lie in \[0, N = 5\); got values from 0 to 9"):
        cmdo.CMDTrajectory(args[0], np.array([0, 9], dtype=np.uint64), *args[2:])


@pytest.mark.parametrize("missing", ["references", "reference_index", "window_start"])
def test_from_state_dict_names_a_field_missing_from_meta(missing):
    from cmd_online.files import pack

    meta = {"layout": {"names": ["w"], "shapes": [[5]], "dtypes": ["float32"]}, "references": torch.zeros(1, 3),
            "reference_index": torch.tensor([0]), "window_start": 0}
    state = {"a": {"w": torch.zeros(5)}, "b": {"w": torch.zeros(5)}, "modes": {"w": torch.zeros(5, dtype=torch.int32)}}
    assert cmdo.CMDTrajectory.from_state_dict({**state, "meta": pack(meta)}).num_weights == 5
    del meta[missing]
    with pytest.raises(ValueError, match=rf"^state\['meta'\] is missing '{missing}'$"):  # was a bare KeyError
        cmdo.CMDTrajectory.from_state_dict({**state, "meta": pack(meta)})


def test_float32_coefficients_cancel_when_a_reference_is_large_against_its_motion():
    """docs/caveats.md: a reference near 1 moving by 1e-3 gives |a|, |b| ≈ 10 for weights of 1e-2; a·r + b
    in float32 coefficients is then about ulp(10) off, far more than the float32 step of the weight itself."""
    g = torch.Generator().manual_seed(0)
    walk = torch.randn(12, generator=g, dtype=torch.float64).cumsum(0)
    W = torch.stack([1 + 1e-3 * walk, 1e-2 * walk + 1e-4 * torch.randn(12, generator=g, dtype=torch.float64)])
    want = cmdo.decompose(W, modes=1, samples=2, warmup=3)
    assert int(want.reference_index[0]) == 0 and 9 < float(want.a[1]) < 11 and -11 < float(want.b[1]) < -9
    rounded = cmdo.CMDTrajectory(want.references, want.reference_index, want.a.float(), want.b.float(), want.modes,
                                 want.window_start)
    error = (rounded.reconstruct(-1).double()[1] - want.reconstruct(-1)[1]).abs().item()
    step = float(np.spacing(np.float32(want.reconstruct(-1)[1].item())))
    assert error > 10 * step and error < 4 * float(np.spacing(np.float32(10.0)))
