"""A person at the screen: progress bars only on a terminal, the ``cmd_online`` logger, evaluation through the
warm-up without guards (``ready``, ``swapped()``'s fallback), and kind messages for the usual mistakes."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cmd_online as cmdo
from cmd_online import progress
from cmd_online.integrations import _common

ROOT = Path(__file__).resolve().parents[1]
NO_RECORD = "call record() after your optimizer steps, or pass record_every"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _model_and_optimizer(seed: int = 0, n_in: int = 10, n_out: int = 5):
    torch.manual_seed(seed)
    model = torch.nn.Linear(n_in, n_out)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, model.in_features)).pow(2).sum().backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------- progress
def test_a_bar_only_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    items = list(range(5))
    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    assert progress.bar(items, desc="files") is items  # unchanged: no tqdm object at all
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress.bar(items, desc="files")) == items
    assert "files:" in terminal.getvalue() and "/5 [" in terminal.getvalue()  # tqdm drew on the terminal
    assert not_a_terminal.getvalue() == ""
    assert progress.bar(items, enabled=False) is items  # never, even on a terminal


def test_a_bar_when_asked_for_and_none_without_tqdm(monkeypatch):
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress.bar(range(3), desc="asked", enabled=True)) == [0, 1, 2]
    assert "asked" in stream.getvalue()  # enabled=True: a bar even where stderr is not a terminal
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setattr(sys, "stderr", _Terminal())
    items = [1, 2]
    assert progress.bar(items, enabled=True) is items and progress.bar(items) is items


def test_decompose_checkpoints_over_files_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    g = torch.Generator().manual_seed(0)
    paths = []
    for t in range(4):
        paths.append(tmp_path / f"epoch_{t}.pt")
        torch.save({"w": torch.randn(30, generator=g) + t}, paths[-1])
    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        cmdo.decompose_checkpoints(paths, modes=2, samples=20)
        assert ("reading checkpoints" in stream.getvalue()) is shown, stream.getvalue()
    with pytest.raises(TypeError, match="progress"):
        cmdo.decompose_checkpoints(paths, modes=2, samples=20, progress="yes")


# ------------------------------------------------------------------------------------------- logging
def test_the_end_of_the_warm_up_is_logged(caplog):
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=40, warmup=4)
    with caplog.at_level(logging.INFO, logger="cmd_online"):
        for _ in range(5):
            _step(model, opt)
            rec.record()
    messages = [r.getMessage() for r in caplog.records if r.name == "cmd_online"]
    assert any("warm-up of 4 records done; clustering 40 sampled weights" in m for m in messages), messages
    done = next(m for m in messages if "sampled weights per mode" in m)
    sizes = [int(s) for s in done.split("[")[1].split("]")[0].split(",")]
    assert done.startswith(f"CMDRecorder: {rec.num_modes} modes") and len(sizes) == rec.num_modes
    assert sum(sizes) <= 40 and "took" in done and "CMD weights exist from record 3" in done


def test_the_callbacks_log_where_they_wrote_the_cmd_model(caplog, tmp_path):
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=20, warmup=3)
    for _ in range(4):
        _step(model, opt)
        rec.record()
    target = tmp_path / "cmd_model.pt"
    with caplog.at_level(logging.INFO, logger="cmd_online"):
        _common.export_at_end(rec, str(target), True, lambda: rec.export(target))
    assert target.exists()
    assert f"CMDCallback: wrote the CMD model of record 3 to {target}" in caplog.text


def test_the_library_prints_nothing_by_default(tmp_path):
    code = """
import torch, cmd_online as cmdo
torch.manual_seed(0)
model = torch.nn.Linear(40, 30)  # N = 1230 weights: no warning about the default samples
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = cmdo.CMDRecorder(opt, model, modes=3, warmup=4)
for _ in range(8):
    opt.zero_grad(); model(torch.randn(8, 40)).pow(2).sum().backward(); opt.step()
    rec.record()
    rec.add_metrics({"loss": 1.0})
    with rec.swapped():
        pass
rec.trajectory().save("t.pt")
cmdo.decompose_checkpoints([{"w": torch.randn(50) + t} for t in range(5)], modes=2, samples=20)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's cmd_online, run in an empty folder
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "swapped() during the warm-up" not in line
             and line.strip() != "pass"]  # the one notice of the warm-up fallback (a warning, tested below)
    assert done.stdout == "" and lines == [], done.stderr


# ------------------------------------------------------------------------------------------- the warm-up
def test_ready_and_swapped_fall_back_to_the_trained_weights_during_the_warm_up():
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=4)
    with pytest.warns(UserWarning, match=r"swapped\(\) during the warm-up \(4 more record\(s\).*rec.ready") as caught:
        with rec.swapped():  # before the first step: the initial weights, nothing to swap
            pass
        for _ in range(3):
            _step(model, opt)
            rec.record()
            assert not rec.ready
            before = [p.detach().clone() for p in model.parameters()]
            with rec.swapped():
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len([w for w in caught if "during the warm-up" in str(w.message)]) == 1  # once
    with pytest.raises(RuntimeError, match="not available during the warm-up: 1 more record"):
        with rec.swapped(at=0):  # an explicit record: there is no CMD model of it
            pass
    _step(model, opt)
    rec.record()
    assert rec.ready and rec.phase == "tracking"
    trained = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _step(model, opt)
            rec.record()
        with rec.swapped():
            assert any(not torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_copy_to_falls_back_during_the_warm_up():
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=3)
    _step(model, opt)
    rec.record()
    before = [p.detach().clone() for p in model.parameters()]
    rec.store()
    with pytest.warns(UserWarning, match=r"CMDRecorder: copy_to\(\) during the warm-up \(2 more record\(s\) until "
                                         r"CMD weights exist\) keeps the trained weights"):
        rec.copy_to()
    assert rec.is_swapped and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    rec.restore()
    assert not rec.is_swapped


# ------------------------------------------------------------------------------------------- mistakes
def test_forgetting_record_says_what_to_do():
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=3)
    for _ in range(30):
        _step(model, opt)
    for query in (rec.cmd_parameters, rec.trajectory, lambda: rec.swapped().__enter__(),
                  lambda: rec.add_metrics({"loss": 1.0})):
        with pytest.raises(RuntimeError, match=NO_RECORD.replace("(", r"\(").replace(")", r"\)")):
            query()
    with pytest.raises(RuntimeError, match=r"no record was taken yet \(30 optimizer step\(s\) so far\)"):
        rec.cmd_parameters()


def test_the_default_samples_on_a_small_model_become_n_with_a_warning():
    model, opt = _model_and_optimizer()  # N = 55
    with pytest.warns(UserWarning, match=r"samples=1000 \(the default\) is more than the N = 55 weights"):
        rec = cmdo.CMDRecorder(opt, model, modes=3, warmup=3)
    assert rec.config.samples == 55 and rec.sample_index.numel() == 55
    for _ in range(4):
        _step(model, opt)
        rec.record()
    assert rec.ready and rec.trajectory().sample_history.shape == (55, 3)
    with pytest.raises(ValueError, match=r"samples \(2000\) must be ≤ the number of weights N = 55"):
        cmdo.CMDRecorder(opt, model, modes=3, samples=2000, warmup=3)  # any other value: an error
    with pytest.raises(ValueError, match=r"modes \(60\) must be ≤ the number of weights N = 55"):
        cmdo.CMDRecorder(opt, model, modes=60, warmup=3)
    with pytest.warns(UserWarning, match="decompose: samples=1000"):
        traj = cmdo.decompose(torch.randn(55, 6).cumsum(1), modes=2)
    assert traj.sample_index.numel() == 55


def test_a_manual_record_right_after_an_automatic_one_is_ignored_with_one_warning():
    model, opt = _model_and_optimizer()
    rec = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=3, record_every=1)
    taken = []
    with pytest.warns(UserWarning, match=r"record\(\) right after the automatic record of record_every=1") as caught:
        for _ in range(8):
            _step(model, opt)
            taken.append(rec.record())
    assert rec.num_records == 8 and taken == [False] * 8
    assert len([w for w in caught if "automatic record" in str(w.message)]) == 1
    every3 = cmdo.CMDRecorder(opt, model, modes=2, samples=30, warmup=3, record_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, opt)
        assert every3.record()  # no automatic record since the last step: taken
    assert every3.num_records == 1
