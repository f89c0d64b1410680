"""The report (``cmd-online report``, ``cmd_online.report``), its figures, ``inspect --json``, and what the
trajectory file keeps for them: the clustered samples and per-record metrics."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cmd_online as cmdo
from cmd_online.cli import main
from cmd_online.layout import Layout

from _devices import DEVICES
from _digits import accuracy, small_cnn, train_epoch

ROOT = Path(__file__).resolve().parents[1]
WARMUP, EPOCHS, MODES = 4, 9, 4
ALL_FIGURES = ("references", "modes", "fit", "correlation", "metrics")
TRAINED, CMD = "test accuracy/trained", "test accuracy/CMD"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short real run on digits that adds the trained and the CMD model's accuracy at every record."""
    folder = tmp_path_factory.mktemp("report")
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = cmdo.CMDRecorder(opt, model, modes=MODES, samples=200, warmup=WARMUP)
    gen = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        train_epoch(model, opt, gen)
        rec.record()
        rec.add_metrics({TRAINED: accuracy(model)})
        if rec.ready:
            with rec.swapped():
                rec.add_metrics({CMD: accuracy(model)})
    traj = rec.trajectory()
    path = folder / "trajectory.pt"
    traj.save(path)
    return rec, traj, path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_image(path: Path) -> None:
    """A valid PNG of non-trivial size that is not one flat colour."""
    from PIL import Image

    width, height = _png_size(path)
    assert width >= 500 and height >= 300, (path.name, width, height)
    assert path.stat().st_size > 10_000, path.name
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated or corrupted file fails here
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape == (height, width)
    assert pixels.std() > 5, f"{path.name} is (nearly) blank"


# ------------------------------------------------------------------------------------------- the file
def test_the_trajectory_keeps_the_clustered_samples_and_the_metrics(run):
    rec, traj, path = run
    c = rec.clustering
    assert torch.equal(traj.sample_index, rec.sample_index)
    assert traj.sample_history.shape == (200, WARMUP)
    assert torch.equal(traj.sample_modes, torch.from_numpy(c.labels))
    assert set(traj.metrics) == {TRAINED, CMD}
    assert all(v.shape == (EPOCHS,) for v in traj.metrics.values())
    assert torch.isnan(traj.metrics[CMD][:WARMUP - 1]).all() and torch.isfinite(traj.metrics[CMD][WARMUP - 1:]).all()
    assert torch.isfinite(traj.metrics[TRAINED]).all()
    back = cmdo.CMDTrajectory.load(path)
    for name in ("sample_index", "sample_history", "sample_modes"):
        assert torch.equal(getattr(back, name), getattr(traj, name)), name
    assert back.metrics.keys() == traj.metrics.keys()
    assert all(torch.allclose(back.metrics[k], v, equal_nan=True) for k, v in traj.metrics.items())
    moved = back.to("cpu")
    assert torch.equal(moved.sample_modes, back.sample_modes) and moved.metrics.keys() == back.metrics.keys()


def test_the_sample_correlation_redrawn_from_the_file_is_the_clustering(run):
    rec, traj, _ = run
    c = rec.clustering
    h = traj.sample_history[torch.from_numpy(c.varying)].double().numpy()
    assert np.allclose(np.abs(np.corrcoef(h)), c.abs_corr, atol=1e-9)


def test_a_resumed_recorder_gives_the_same_samples_and_keeps_the_metrics(run):
    rec, traj, _ = run
    state = rec.state_dict()
    model = small_cnn(seed=0)
    fresh = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=MODES, samples=200,
                             warmup=WARMUP)
    fresh.load_state_dict(state)
    assert fresh.clustering is None  # not part of a state: the trajectory clusters the kept history again
    again = fresh.trajectory()
    assert torch.equal(again.sample_modes, traj.sample_modes)
    assert all(torch.allclose(again.metrics[k], v, equal_nan=True) for k, v in traj.metrics.items())


def test_an_old_trajectory_file_without_the_new_fields_still_loads(tmp_path, run):
    _, traj, _ = run
    payload = torch.load(run[2], weights_only=True)
    for name in ("sample_index", "sample_history", "sample_modes", "metrics", "set_aside", "checksum"):
        del payload[name]  # a file of an earlier version: none of these fields, and no checksum
    torch.save(payload, tmp_path / "old.pt")
    old = cmdo.CMDTrajectory.load(tmp_path / "old.pt")
    assert old.sample_history is None and old.metrics is None and old.num_modes == traj.num_modes


@pytest.mark.parametrize("change, words", [
    (dict(sample_modes=None), "sample_modes must be given with"),
    (dict(sample_modes=torch.full((10,), 7)), "sample_modes must lie in [−1, M = 3)"),
    (dict(sample_history=torch.zeros(10, 1)), "sample_history must be K × C"),
    (dict(sample_index=torch.arange(10) + 295), "sample_index must lie in [0, N = 300)"),
    (dict(metrics={"acc": torch.zeros(5)}), "metrics['acc'] must be a vector of T = 12"),
    (dict(metrics={"": torch.zeros(12)}), "names must be non-empty str"),
    (dict(metrics=[1, 2]), "metrics must be a dict"),
])
def test_bad_sample_and_metric_fields_are_refused_by_name(change, words):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 12, generator=g).cumsum(1)
    traj = cmdo.decompose(W, modes=3, samples=10)
    fields = dict(sample_index=traj.sample_index, sample_history=traj.sample_history,
                  sample_modes=traj.sample_modes, metrics=None) | change
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        cmdo.CMDTrajectory(traj.references, traj.reference_index, traj.a, traj.b, traj.modes, **fields)


def test_decompose_keeps_its_clustered_samples():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 12, generator=g).cumsum(1)
    traj = cmdo.decompose(W, modes=3, samples=50, warmup=5)
    assert traj.sample_history.shape == (50, 5)
    assert torch.equal(traj.sample_history, W[traj.sample_index, :5])
    assert set(traj.sample_modes.tolist()) <= {-1, 0, 1, 2}


# ------------------------------------------------------------------------------------------- the page
def test_report_writes_index_html_with_the_named_figures(run, tmp_path):
    from cmd_online.report import write_report

    _, traj, path = run
    index = write_report(path, tmp_path / "report", progress=False)
    assert index == tmp_path / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        _check_image(tmp_path / "report" / f"{name}.png")
        assert f'<img src="{name}.png"' in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)=\"(https?:|//)", page), "the page must not load anything from the network"
    assert f"{traj.num_weights:,}" in page and "mean R²" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["modes"] == traj.num_modes and summary["metrics"][CMD]["records"] == EPOCHS - WARMUP + 1


def test_report_of_an_old_file_says_what_it_cannot_draw_and_drops_stale_figures(run, tmp_path):
    from cmd_online.report import write_report

    _, traj, path = run
    out = tmp_path / "report"
    write_report(path, out, progress=False)
    old = cmdo.CMDTrajectory(traj.references, traj.reference_index, traj.a, traj.b, traj.modes, traj.window_start,
                             traj.layout)  # no R², no samples, no metrics
    page = write_report(old, out, title="old <file>").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.glob("*.png")) == ["fit.png", "modes.png", "references.png"]
    assert "keeps no clustered samples" in page and "No metrics were recorded" in page
    assert "<title>old &lt;file&gt;</title>" in page


def test_the_figures_from_python(run):
    from matplotlib.figure import Figure

    from cmd_online import figures

    _, traj, _ = run
    drawn = figures.trajectory_figures(traj)
    assert list(drawn) == list(ALL_FIGURES) and all(isinstance(f, Figure) for f in drawn.values())
    assert list(figures.trajectory_figures(traj, ["fit"])) == ["fit"]
    with pytest.raises(ValueError, match="unknown figure"):
        figures.trajectory_figures(traj, ["nope"])
    assert figures.metric_groups([TRAINED, CMD, "loss"]) == {"test accuracy": [TRAINED, CMD], "loss": ["loss"]}


def test_report_command(run, tmp_path, capsys):
    _, _, path = run
    assert main(["report", str(path), "-o", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r' / 'index.html'}: open it in a browser"
    assert all((tmp_path / "r" / f"{name}.png").exists() for name in ALL_FIGURES)
    assert main(["report", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "r2")]) == 2
    assert "not found" in capsys.readouterr().err


def test_report_without_matplotlib_says_how_to_install_it(run, tmp_path):
    _, _, path = run
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib now raises ImportError
            "from cmd_online.cli import main\n"
            f"sys.exit(main(['report', {str(path)!r}, '-o', {str(tmp_path / 'r')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-online: error: ") and "Traceback" not in done.stderr
    assert "pip install 'cmd-online[plots]'" in lines[0]
    assert not (tmp_path / "r" / "index.html").exists()


# ------------------------------------------------------------------------------------------- inspect --json
def test_inspect_json_holds_everything_the_text_prints(run, capsys):
    _, traj, path = run
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights"] == traj.num_weights and data["records"] == traj.num_records
    assert data["modes"] == traj.num_modes and data["window_start"] == traj.window_start
    assert data["file_bytes"] == path.stat().st_size and data["history_bytes"] == traj.num_weights * EPOCHS * 4
    assert data["samples"] == 200 and data["clustered_records"] == WARMUP
    assert f"{data['weights']:,} in {data['tensors']} tensors" in text
    assert f"mean R²      {data['mean_r2']:.4f}" in text
    rows = re.findall(r"^\s+(\d+)\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+)\s+(\S+)$", text, re.M)
    assert len(rows) == len(data["mode_table"]) == traj.num_modes
    for (mode, weights, share, r2, reference), row in zip(rows, data["mode_table"]):
        assert int(mode) == row["mode"] and int(weights.replace(",", "")) == row["weights"]
        assert math.isclose(float(share), 100 * row["share"], abs_tol=0.05)
        assert math.isclose(float(r2), row["mean_r2"], abs_tol=5e-5) and reference == row["reference"]
    assert [r["weights"] for r in data["mode_table"]] == traj.mode_sizes().tolist()
    for row, name, size in zip(data["tensor_table"], traj.layout.names, traj.layout.sizes):
        assert row["name"] == name and row["size"] == size and sum(row["weights_by_mode"]) == size
        assert re.search(rf"^{re.escape(name)}\s+{size:,}\s", text, re.M)
    assert data["metrics"][TRAINED]["records"] == EPOCHS
    assert f"metric       {CMD}: {EPOCHS - WARMUP + 1} record(s)" in text


def test_inspect_json_of_a_file_without_optional_fields_is_strict_json(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6, generator=g).cumsum(1)
    traj = cmdo.decompose(W, modes=2, samples=20, layout=Layout(("w",), ((40,),), (torch.float32,)))
    plain = cmdo.CMDTrajectory(traj.references, traj.reference_index, traj.a, traj.b, traj.modes,
                               metrics={"loss": torch.tensor([math.nan] * 6)})
    plain.save(tmp_path / "t.pt")
    assert main(["inspect", str(tmp_path / "t.pt"), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["mean_r2"] is None and data["set_aside"] is None and data["samples"] is None
    assert data["metrics"] == {"loss": {"records": 0, "last": None}}


@pytest.mark.parametrize("device", DEVICES)
def test_samples_metrics_and_the_report_on_every_device(device, tmp_path):
    """On an accelerator (the flat kernel) the trajectory keeps its samples and metrics and draws like on a CPU."""
    from cmd_online.report import write_report

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=100, warmup=4)
    x, y = torch.randn(64, 20, device=device), torch.randint(0, 4, (64,), device=device)
    with pytest.warns(UserWarning, match="during the warm-up"):  # swapped() keeps the trained weights then
        for _ in range(8):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.record()
            loss = torch.nn.functional.cross_entropy(model(x), y).detach()
            rec.add_metrics({"loss/trained": loss})  # a one-element tensor on the device
            with rec.swapped():
                cmd = torch.nn.functional.cross_entropy(model(x), y).detach()
            if rec.ready:
                rec.add_metrics({"loss/CMD": cmd})
    traj = rec.trajectory()
    assert traj.sample_history.shape == (100, 4) and traj.metrics["loss/CMD"].isnan().sum() == 3
    traj.save(tmp_path / "t.pt")
    write_report(tmp_path / "t.pt", tmp_path / "r", progress=False)
    assert all((tmp_path / "r" / f"{name}.png").exists() for name in ALL_FIGURES)
