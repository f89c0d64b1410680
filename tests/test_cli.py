"""The `cmd-online` command: the demo end to end, and inspect / export / decompose on its output."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmd_online import CMDTrajectory
from cmd_online.cli import main
from cmd_online.demo import DemoConfig, Progress, accuracy, build_model, load_data, random_shift, run

EPOCHS, WARMUP, MODES, SAMPLES = 5, 3, 4, 300


def _console_script() -> list[str]:
    script = shutil.which("cmd-online") or str(Path(sys.executable).parent / "cmd-online")
    assert Path(script).exists(), "the cmd-online console script is not installed: pip install -e ."
    return [script]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One real `cmd-online demo` run, shared by the tests of its output."""
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = _console_script() + ["demo", "--epochs", str(EPOCHS), "--warmup", str(WARMUP), "--modes", str(MODES),
                               "--samples", str(SAMPLES), "--out", str(out), "--save-checkpoints", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def _claimed_files(stdout: str) -> dict[str, Path]:
    block = stdout.split("\nfiles:\n", 1)[1]
    files = {}
    for line in block.splitlines():
        match = re.match(r"  (\w+)\s+(\S+)$", line)
        if match:
            files[match.group(1)] = Path(match.group(2))
    return files


def test_demo_writes_every_file_it_claims(demo):
    out, stdout = demo
    files = _claimed_files(stdout)
    assert set(files) == {"cmd_model", "trained_model", "trajectory", "tensorboard", "checkpoints", "metrics"}
    for path in files.values():
        assert path.exists(), path
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file in the output folder"
    assert len(list((out / "checkpoints").glob("epoch_*.pt"))) == EPOCHS


def test_demo_prints_a_row_per_epoch_block_and_the_final_table(demo):
    out, stdout = demo
    rows = [line for line in stdout.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d%", line)]
    assert len(rows) >= 2
    match = re.search(r"test accuracy\s+([\d.]+)%\s+([\d.]+)%", stdout)
    assert match, stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert float(match.group(1)) == pytest.approx(100 * metrics["trained_accuracy"], abs=0.051)
    assert float(match.group(2)) == pytest.approx(100 * metrics["cmd_accuracy"], abs=0.051)
    assert re.search(rf"modes\s+{metrics['modes']}\n", stdout)
    for label in ("recorder memory", "one model copy", "record overhead", "of epoch time"):
        assert label in stdout
    assert len(metrics["rows"]) == EPOCHS
    assert metrics["recorder_bytes"] > 0 and 0 <= metrics["record_share"]


def test_demo_cmd_accuracy_is_that_of_the_exported_cmd_model(demo):
    out, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    _, _, x_test, y_test = load_data("digits", seed=0)
    model = build_model("digits")
    model.load_state_dict(torch.load(out / "cmd_model.pt", weights_only=True), strict=True)
    assert accuracy(model, x_test, y_test) == metrics["cmd_accuracy"]
    model.load_state_dict(torch.load(out / "trained_model.pt", weights_only=True), strict=True)
    assert accuracy(model, x_test, y_test) == metrics["trained_accuracy"]
    assert metrics["trained_accuracy"] > 0.5  # five epochs of digits learn something


def test_demo_logs_accuracies_to_tensorboard(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo
    events = EventAccumulator(str(out))
    events.Reload()
    trained = events.Scalars("demo/test_accuracy/trained")
    cmd = events.Scalars("demo/test_accuracy/cmd")
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e.step for e in trained] == list(range(1, EPOCHS + 1))
    assert [e.step for e in cmd] == list(range(WARMUP, EPOCHS + 1))  # CMD exists from the last warm-up record
    assert cmd[-1].value == pytest.approx(metrics["cmd_accuracy"])


def test_inspect_reports_modes_sizes_and_layers(demo, capsys):
    out, _ = demo
    traj = CMDTrajectory.load(out / "trajectory.pt")
    assert main(["inspect", str(out / "trajectory.pt")]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"modes\s+{traj.num_modes}\n", text)
    assert re.search(rf"records\s+{EPOCHS} \(a, b fitted over records {WARMUP - 1}\.\.{EPOCHS - 1}\)", text)
    mode_rows = re.findall(r"^\s+(\d+)\s+([\d,]+)\s+[\d.]+%\s+([\d.]+)\s", text, re.M)
    assert [int(m) for m, _, _ in mode_rows] == list(range(traj.num_modes))
    assert [int(n.replace(",", "")) for _, n, _ in mode_rows] == traj.mode_sizes().tolist()
    assert [float(r) for _, _, r in mode_rows] == pytest.approx(traj.mode_r2.tolist(), abs=1e-4)
    sizes, r2 = traj.mode_sizes().double(), traj.mode_r2.double()
    overall = number(r"mean R²\s+([\d.]+) over all weights", text)
    assert overall == pytest.approx(float((sizes * r2).sum() / sizes.sum()), abs=1e-4)
    for name in traj.layout.names:
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    history = traj.num_weights * EPOCHS * 4
    ratio = float(re.search(r"\(([\d.]+)× larger\)", text).group(1))
    assert ratio == pytest.approx(history / (out / "trajectory.pt").stat().st_size, abs=0.06)


def test_export_writes_a_checkpoint_that_loads_strictly(demo, tmp_path, capsys):
    out, _ = demo
    target = tmp_path / "at2.pt"
    assert main(["export", str(out / "trajectory.pt"), "--at", "2", "-o", str(target)]) == 0
    assert "record 2 of 5" in capsys.readouterr().out
    model = build_model("digits")
    model.load_state_dict(torch.load(target, weights_only=True), strict=True)
    expected = CMDTrajectory.load(out / "trajectory.pt").state_dict(2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name])


def test_export_of_the_last_record_equals_the_demo_cmd_model(demo, tmp_path):
    out, _ = demo
    target = tmp_path / "last.pt"
    assert main(["export", str(out / "trajectory.pt"), "-o", str(target)]) == 0
    exported = torch.load(target, weights_only=True)
    online = torch.load(out / "cmd_model.pt", weights_only=True)
    assert exported.keys() == online.keys()
    for name in online:
        torch.testing.assert_close(exported[name], online[name], rtol=0, atol=0)


def test_decompose_of_the_demo_checkpoints_matches_the_online_trajectory(demo, tmp_path, capsys):
    out, _ = demo
    target = tmp_path / "posthoc.pt"
    args = ["decompose", str(out / "checkpoints"), "-o", str(target), "--modes", str(MODES),
            "--samples", str(SAMPLES), "--warmup", str(WARMUP)]
    assert main(args) == 0
    assert f"from {EPOCHS} checkpoints" in capsys.readouterr().out
    posthoc = CMDTrajectory.load(target)
    online = CMDTrajectory.load(out / "trajectory.pt")
    assert torch.equal(posthoc.reference_index, online.reference_index)
    assert posthoc.window_start == online.window_start == WARMUP - 1
    for at in range(EPOCHS):
        torch.testing.assert_close(posthoc.reconstruct(at), online.reconstruct(at), rtol=0, atol=2e-5)


def test_decompose_takes_files_in_the_order_given(demo, tmp_path):
    out, _ = demo
    files = sorted((out / "checkpoints").glob("epoch_*.pt"))
    target = tmp_path / "three.pt"
    assert main(["decompose", *map(str, files[:3]), "-o", str(target), "--threshold", "0.5",
                 "--samples", "50"]) == 0
    traj = CMDTrajectory.load(target)
    last = torch.load(files[2], weights_only=True)
    assert traj.num_records == 3
    # the references are the weights themselves: record 2 of the reference rows is the third file's values
    flat = torch.cat([v.reshape(-1) for v in last.values()])
    torch.testing.assert_close(traj.references[:, 2], flat[traj.reference_index])


def test_decompose_max_modes_bounds_the_threshold_cut(demo, tmp_path):
    out, _ = demo
    files = sorted((out / "checkpoints").glob("epoch_*.pt"))
    free, bounded = tmp_path / "free.pt", tmp_path / "bounded.pt"
    for target, extra in ((free, []), (bounded, ["--max-modes", "2"])):
        assert main(["decompose", *map(str, files), "-o", str(target), "--threshold", "0.05", "--samples", "200",
                     *extra]) == 0
    assert CMDTrajectory.load(free).num_modes > 2 and CMDTrajectory.load(bounded).num_modes == 2


def test_random_shift_translates_each_sample_with_zero_fill():
    x = torch.arange(1.0, 1 + 3 * 2 * 5 * 6).view(3, 2, 5, 6)
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    for i in range(3):
        padded = torch.nn.functional.pad(x[i], [1, 1, 1, 1])
        windows = [padded[:, dy:dy + 5, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert sum(torch.equal(shifted[i], w) for w in windows) == 1
    signal = torch.arange(1.0, 1 + 4 * 40).view(4, 1, 40)
    moved = random_shift(signal, 3, torch.Generator().manual_seed(1))
    for i in range(4):
        padded = torch.nn.functional.pad(signal[i], [3, 3])
        assert any(torch.equal(moved[i], padded[:, s:s + 40]) for s in range(7))


def test_mnist1d_demo_in_compact_memory_exports_a_loadable_model(tmp_path):
    config = DemoConfig(data="mnist1d", epochs=3, warmup=2, modes=3, samples=200, out=str(tmp_path),
                        freeze_modes_after=1, batch_size=500, progress=False)
    lines = []
    result = run(config, write=lines.append)
    assert lines[0].startswith("cmd-online demo: mnist1d, 4000 train / 1000 test samples")
    model = build_model("mnist1d")
    model.load_state_dict(torch.load(tmp_path / "cmd_model.pt", weights_only=True), strict=True)
    _, _, x_test, y_test = load_data("mnist1d", seed=0)
    assert accuracy(model, x_test, y_test) == result.cmd_accuracy
    # compact form: 4 float32 + 1 int32 per weight, 2 float32 of scratch, plus the small history/reference tables
    assert result.recorder_bytes < 7.5 * result.model_bytes
    assert CMDTrajectory.load(tmp_path / "trajectory.pt").num_records == 3


def test_demo_rerun_in_the_same_folder_replaces_the_earlier_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_0099.pt").write_bytes(b"old")
    (tmp_path / "events.out.tfevents.1.old").write_bytes(b"old")
    lines = []
    run(DemoConfig(epochs=3, warmup=2, modes=2, samples=50, batch_size=500, out=str(tmp_path),
                   save_checkpoints=True, progress=False), write=lines.append)
    assert "note: removed 2 file(s) of an earlier demo run" in "\n".join(lines)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"epoch_000{i}.pt" for i in (1, 2, 3)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_decompose_reads_state_dicts_nested_in_training_checkpoints(demo, tmp_path):
    out, _ = demo
    plain = sorted((out / "checkpoints").glob("epoch_*.pt"))
    nested = []
    for i, path in enumerate(plain):
        nested.append(tmp_path / f"ckpt_{i + 1}.pt")  # natural order: ckpt_2 before ckpt_10
        torch.save({"model": torch.load(path, weights_only=True), "epoch": i + 1}, nested[-1])
    assert main(["decompose", str(tmp_path), "-o", str(tmp_path / "nested.traj"), "--modes", "2",
                 "--samples", "100"]) == 0
    assert main(["decompose", *map(str, plain), "-o", str(tmp_path / "plain.traj"), "--modes", "2",
                 "--samples", "100"]) == 0
    a, b = CMDTrajectory.load(tmp_path / "nested.traj"), CMDTrajectory.load(tmp_path / "plain.traj")
    assert torch.equal(a.references, b.references) and torch.equal(a.a, b.a) and torch.equal(a.b, b.b)


def test_decompose_of_a_folder_leaves_out_links_and_aliases_and_lists_what_it_used(demo, tmp_path, capsys):
    out, _ = demo
    plain = sorted((out / "checkpoints").glob("epoch_*.pt"))
    folder = tmp_path / "run"
    folder.mkdir()
    for path in plain:
        shutil.copy(path, folder / path.name)
    (folder / "latest.pt").symlink_to(folder / plain[-1].name)  # a link to a record already in the set
    shutil.copy(plain[2], folder / "best.pt")  # an alias beside numbered files: a copy, not a record
    (folder / "last.pt").symlink_to(plain[-1].resolve())  # a link outside the set, unnumbered
    capsys.readouterr()
    assert main(["decompose", str(folder), "-o", str(tmp_path / "folder.traj"), "--modes", "2", "--samples", "100"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"records: {len(plain)} checkpoints, in this order: {', '.join(p.name for p in plain)}" in said
    assert f"left out: latest.pt (a link to {plain[-1].name}, already taken)" in said
    assert "left out: best.pt (an alias beside numbered checkpoints (no record of its own))" in said
    assert "left out: last.pt (an alias" in said
    assert main(["decompose", *map(str, plain), "-o", str(tmp_path / "files.traj"), "--modes", "2", "--samples", "100"]) == 0
    a, b = CMDTrajectory.load(tmp_path / "folder.traj"), CMDTrajectory.load(tmp_path / "files.traj")
    assert a.num_records == len(plain) and torch.equal(a.references, b.references) and torch.equal(a.a, b.a)


def test_model_folders_of_every_kind_the_trainer_writes_are_read_as_checkpoints(tmp_path):
    from safetensors.torch import save_file

    import cmd_online as cmdo

    torch.manual_seed(0)
    states = [{"b.weight": torch.randn(4, 3), "a.bias": torch.randn(4)} for _ in range(4)]
    for t, state in enumerate(states):
        folder = tmp_path / "run" / f"checkpoint-{(t + 1) * 5}"  # checkpoint-5 … checkpoint-20: by number
        folder.mkdir(parents=True)
        if t % 3 == 0:
            save_file(state, str(folder / "model.safetensors"))
        elif t % 3 == 1:
            torch.save(state, folder / "pytorch_model.bin")
        else:  # sharded, as save_pretrained writes big models
            save_file({"a.bias": state["a.bias"]}, str(folder / "model-00001-of-00002.safetensors"))
            save_file({"b.weight": state["b.weight"]}, str(folder / "model-00002-of-00002.safetensors"))
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                "a.bias": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "run" / "checkpoint-7").mkdir()  # no weights in it: left out, and said
    folders = [tmp_path / "run" / f"checkpoint-{n}" for n in (5, 10, 15, 20)]
    got = cmdo.decompose_checkpoints(folders, modes=2, samples=10)
    want = cmdo.decompose_checkpoints([dict(sorted(s.items())) for s in states], modes=2, samples=10)  # as stored
    assert torch.equal(got.a, want.a) and torch.equal(got.references, want.references)
    assert main(["decompose", str(tmp_path / "run"), "-o", str(tmp_path / "t.pt"), "--modes", "2", "--samples", "10"]) == 0
    assert torch.equal(CMDTrajectory.load(tmp_path / "t.pt").a, want.a)


def test_progress_falls_back_to_plain_rows_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    lines = []
    progress = Progress(3, True, lines.append)
    progress.write("row 1")
    progress.update(loss="0.1")
    progress.close()
    assert progress._bar is None and lines == ["row 1"]


# ------------------------------------------------------------------------------------------- user mistakes
def _one_line_error(capsys, code: int, *words: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cmd-online: error: "), lines[0]
    assert "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{tmp}/missing.pt"], ["not found", "missing.pt"]),
    (["inspect", "{out}/cmd_model.pt"], ["not a cmd_online.CMDTrajectory file"]),
    (["inspect", "{tmp}/notes.txt"], ["is not a CMD trajectory file", "notes.txt"]),
    (["inspect", "{tmp}"], ["directory"]),
    (["export", "{out}/trajectory.pt", "--at", "5", "-o", "{tmp}/x.pt"], ["at=5 is out of range", "5 records"]),
    (["export", "{out}/trajectory.pt", "--at", "-6", "-o", "{tmp}/x.pt"], ["out of range"]),
    (["export", "{out}/trajectory.pt", "--at", "last", "-o", "{tmp}/x.pt"], ["--at", "invalid int value"]),
    (["export", "{out}/trajectory.pt"], ["-o/--output", "required"]),
    (["export", "{out}/cmd_model.pt", "-o", "{tmp}/x.pt"], ["not a cmd_online.CMDTrajectory file"]),
    (["export", "{out}/trajectory.pt", "-o", "{tmp}"], ["is a directory"]),
    (["decompose", "{out}/checkpoints/epoch_0001.pt", "-o", "{tmp}/t.pt"], ["at least 2 checkpoints"]),
    (["decompose", "{out}/checkpoints/epoch_0001.pt", "{tmp}/missing.pt", "-o", "{tmp}/t.pt"],
     ["not found", "missing.pt"]),
    (["decompose", "{out}/trajectory.pt", "{out}/trajectory.pt", "-o", "{tmp}/t.pt"],
     ["cmd_online.CMDTrajectory file, not a checkpoint"]),
    (["decompose", "{tmp}/notes.txt", "{tmp}/notes.txt", "-o", "{tmp}/t.pt"], ["is not a checkpoint file", "notes.txt"]),
    (["decompose", "{out}/checkpoints", "-o", "{tmp}/t.pt", "--samples", "10000000"], ["samples", "N = "]),
    (["decompose", "{out}/checkpoints", "-o", "{tmp}/t.pt", "--threshold", "2"], ["--threshold", "(0, 1]"]),
    (["decompose", "{out}/checkpoints", "-o", "{tmp}/t.pt", "--modes", "3", "--threshold", "0.5"],
     ["not allowed with"]),
    (["decompose", "{out}/checkpoints", "-o", "{tmp}/t.pt", "--warmup", "9"], ["warmup"]),
    (["decompose", "{tmp}", "-o", "{tmp}/t.pt"], ["holds 0 checkpoint(s)", "checkpoint-N folders"]),
    (["decompose", "{out}/checkpoints", "-o", "{tmp}/t.pt", "--seed", "-3"], ["--seed", "≥ 0", "-3"]),
    (["decompose", "{tmp}/notes.txt", "{tmp}/notes.txt", "-o", "{tmp}/t.pt", "--seed", "-3"], ["--seed"]),  # before reading
    (["demo", "--seed", "-3"], ["--seed", "≥ 0", "-3"]),
    (["demo", "--epochs", "3", "--warmup", "5"], ["warmup (5) must be < epochs (3)"]),
    (["demo", "--epochs", "0"], ["--epochs", "≥ 1"]),
    (["demo", "--data", "mnist"], ["--data", "invalid choice"]),
    (["demo", "--samples", "100000000"], ["samples", "number of weights"]),
    (["demo", "--modes", "20", "--samples", "10"], ["modes (20) must be ≤ samples (10)"]),
    (["demo", "--freeze-modes-after", "0"], ["--freeze-modes-after", "≥ 1"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_user_mistake_gives_one_line_and_nonzero_exit(demo, tmp_path, capsys, argv, words):
    out, _ = demo
    (tmp_path / "notes.txt").write_text("not a torch file\n")
    argv = [a.format(out=out, tmp=tmp_path) for a in argv]
    code = main(argv)
    _one_line_error(capsys, code, *words)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "t.pt").exists()


def test_console_script_reports_a_missing_file_in_one_line(tmp_path):
    proc = subprocess.run(_console_script() + ["export", str(tmp_path / "none.pt"), "-o", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cmd-online: error: CMD trajectory file not found: "
                                                f"{str(tmp_path / 'none.pt')!r}"]


@pytest.mark.parametrize("files", ["missing", "unreadable"])
def test_decompose_checks_its_options_before_reading_any_file(tmp_path, capsys, files):
    (tmp_path / "empty.pt").write_bytes(b"")
    paths = [str(tmp_path / "nonexistent1.pt"), str(tmp_path / "nonexistent2.pt")] if files == "missing" else \
        [str(tmp_path / "empty.pt")] * 2
    code = main(["decompose", *paths, "-o", str(tmp_path / "t.pt"), "--modes", "5", "--samples", "3"])
    _one_line_error(capsys, code, "modes (5) must be ≤ samples (3)")
    code = main(["decompose", *paths, "-o", str(tmp_path / "t.pt"), "--samples", "5"])  # the default --modes 10
    _one_line_error(capsys, code, "modes (10) must be ≤ samples (5)")
    assert not (tmp_path / "t.pt").exists()


def test_inspect_of_a_trajectory_where_nothing_moves_says_where_the_weights_are(tmp_path, capsys):
    from cmd_online import decompose

    W = torch.full((36, 8), 0.25) + torch.arange(36.0)[:, None]  # every reference is set aside
    decompose(W, modes=3, samples=20).save(tmp_path / "t.cmd")
    assert main(["inspect", str(tmp_path / "t.cmd")]) == 0
    text = capsys.readouterr().out
    assert "set aside    1 of 1 references (mode 0: no reference moves above rounding in the window, so its " \
           "weights stay there as constants (a = 0))" in text
    assert "no weight is assigned" not in text  # 36 weights are listed in mode 0
    assert re.search(r"^\s+0\s+36\s+100\.0%\s+0\.0000\s", text, re.M)
    assert number(r"mean R²\s+([\d.]+) over all weights", text) == 0.0  # was 1/36
