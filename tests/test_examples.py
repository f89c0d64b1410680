"""Every numbered script in examples/ runs (with small settings) and prints what it promises."""

from __future__ import annotations

import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cmd_online import CMDTrajectory
from cmd_online.checkpoint import read_meta

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def run_example(monkeypatch, capsys):
    """Run examples/NAME as ``python examples/NAME ARGS...`` would, in this process (saves the imports)."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        monkeypatch.chdir(EXAMPLES.parent)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        ours = [w for w in caught if "examples" in w.filename or "cmd_online" in w.filename]
        assert not ours, [str(w.message) for w in ours]
        return capsys.readouterr().out

    yield run
    torch.set_num_threads(threads)  # the examples pick one thread for themselves


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def test_every_numbered_example_is_tested():
    tested = {"01_minimal.py", "02_per_step_amp.py", "03_checkpoint_resume.py", "04_batchnorm_update_bn.py",
              "05_posthoc_checkpoints.py", "06_lightning.py", "07_hf_trainer.py"}
    assert {p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py")} == tested


def test_minimal_loop_cmd_model_is_close_to_the_trained_one(run_example):
    out = run_example("01_minimal.py", "--epochs", "6", "--warmup", "3")
    assert "recorded 6 epochs into 5 modes" in out
    trained = number(r"trained test accuracy: ([\d.]+)", out)
    cmd = number(r"CMD test accuracy:\s+([\d.]+)", out)
    assert trained > 0.85
    assert abs(cmd - trained) < 0.05
    assert "trained weights restored: True" in out


def test_per_step_recording_counts_only_steps_the_grad_scaler_took(run_example):
    out = run_example("02_per_step_amp.py", "--epochs", "3", "--record-every", "5", "--warmup", "4")
    iterations = number(r"iterations: (\d+)", out)
    taken = number(r"optimizer steps taken: (\d+)", out)
    skipped = number(r"GradScaler skipped (\d+)", out)
    records = number(r"records: (\d+)", out)
    assert iterations == 3 * 23  # 1,437 training digits in batches of 64
    assert skipped > 0 and taken == iterations - skipped
    assert records == taken // 5
    assert number(r"CMD test accuracy:\s+([\d.]+)", out) > 0.8


def test_resume_in_warmup_and_in_tracking_reproduces_the_uninterrupted_run(run_example, tmp_path):
    out = run_example("03_checkpoint_resume.py", "--epochs", "6", "--warmup", "3", "--stop-at", "2", "4",
                      "--out", str(tmp_path))
    assert "resumed at epoch 2 (recorder phase 'warmup', 2 records)" in out
    assert "resumed at epoch 4 (recorder phase 'tracking', 4 records)" in out
    assert "same references as the uninterrupted run: True" in out
    assert number(r"resumed vs uninterrupted: ([\d.e+-]+)", out) == 0.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 6 and read_meta(state["cmd_recorder"])["num_records"] == 6


def test_batchnorm_update_bn_recalibrates_and_leaves_the_trained_network_intact(run_example):
    out = run_example("04_batchnorm_update_bn.py", "--epochs", "5", "--warmup", "3")
    assert number(r"moved by up to ([\d.]+) under update_bn", out) > 0
    assert number(r"after update_bn:\s+([\d.]+)", out) > 0.8
    assert "trained network unchanged afterwards: True" in out


def test_posthoc_from_a_folder_reproduces_each_checkpoint(run_example, tmp_path):
    out = run_example("05_posthoc_checkpoints.py", "--epochs", "5", "--out", str(tmp_path))
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 4]
    for _, checkpoint_acc, cmd_acc, _ in rows[1:]:
        assert abs(float(cmd_acc) - float(checkpoint_acc)) < 0.05
    trajectory = CMDTrajectory.load(tmp_path / "trajectory.pt")
    assert trajectory.num_records == 5 and trajectory.num_modes == 5
    assert len(list((tmp_path / "checkpoints").glob("epoch_*.pt"))) == 5
    last = torch.load(tmp_path / "checkpoints" / "epoch_004.pt", weights_only=True)
    error = max((trajectory.state_dict(4)[k] - v).abs().max().item() for k, v in last.items())
    assert error == pytest.approx(float(rows[-1][3]), abs=1e-4)


def test_lightning_example_prints_trained_and_cmd_accuracy_and_writes_the_cmd_model(run_example, tmp_path):
    pytest.importorskip("lightning")
    out = run_example("06_lightning.py", "--epochs", "6", "--warmup", "3", "--out", str(tmp_path))
    assert "recorded 6 epochs into" in out
    trained = number(r"trained test accuracy: ([\d.]+)", out)
    cmd = number(r"CMD test accuracy:\s+([\d.]+)", out)
    assert trained > 0.85 and abs(cmd - trained) < 0.05
    assert number(r"exported CMD model:\s+([\d.]+)", out) == cmd
    assert "holds the recorder with 6 records" in out
    assert (tmp_path / "cmd_model.ckpt").exists()


def test_hf_trainer_example_prints_trained_and_cmd_accuracy_and_saves_a_pretrained_cmd_model(run_example, tmp_path):
    pytest.importorskip("transformers")
    out = run_example("07_hf_trainer.py", "--epochs", "1", "--every", "2", "--warmup", "3", "--pieces", "384",
                      "--out", str(tmp_path))
    assert "12 optimizer steps, 6 records" in out  # 384 pieces / (16 × 2 accumulated) = 12 steps
    trained = number(r"trained model: .* accuracy ([\d.]+)", out)
    cmd = number(r"CMD model: .* accuracy ([\d.]+)", out)
    assert trained > 0.2 and abs(cmd - trained) < 0.05
    assert number(r"from_pretrained from .*: accuracy ([\d.]+)", out) == cmd
    assert "checkpoint-12 holds the recorder with 6 records" in out
