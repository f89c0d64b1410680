"""cmd_online.integrations without a framework: the core imports none, and the shared pieces hold."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cmd_online as cmdo
from cmd_online.integrations import _common

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_importing_cmd_online_and_its_integrations_package_imports_no_framework():
    code = ("import sys, cmd_online, cmd_online.integrations; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_clean_names_drop_orig_mod_components_only():
    assert _common.clean_name("net._orig_mod.0.weight") == "net.0.weight"
    assert _common.clean_name("_orig_mod.module.fc.bias") == "module.fc.bias"  # a user's 'module' stays
    with pytest.raises(ValueError, match="both named 'fc.weight'"):
        _common.clean_state_dict({"fc.weight": torch.zeros(1), "_orig_mod.fc.weight": torch.zeros(1)})


def test_plain_module_unwraps_data_parallel_wrappers():  # and torch.compile's: tests of each framework
    inner = torch.nn.Linear(2, 2)
    assert _common.plain_module(torch.nn.DataParallel(torch.nn.DataParallel(inner))) is inner
    assert _common.plain_module(inner) is inner


def test_an_epoch_is_recorded_once_and_a_swap_gives_the_trained_weights_back_on_error():
    model = torch.nn.Linear(4, 3)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=1, samples=5, warmup=3)
    epochs = _common.EpochRecords()
    for epoch in (0, 0, 1, 2, 2, 3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        epochs.record(rec, epoch)
    assert rec.num_records == 4
    trained = model.weight.detach().clone()
    with pytest.raises(KeyError):
        with rec.swapped(at=0):
            assert not torch.equal(model.weight, trained) and rec.is_swapped
            assert torch.equal(rec.stored_parameters[0], trained)
            raise KeyError("inside")
    assert torch.equal(model.weight, trained) and not rec.is_swapped and rec.stored_parameters is None
    rec.close()


def test_the_weights_fingerprint_tells_the_same_weights_also_with_nan_and_inf():
    w = torch.randn(40, 3)
    bad = w.clone()
    bad[0, 0], bad[1, 1] = float("nan"), float("inf")  # a run whose weights diverged: sums NaN and inf
    for weights in (w, bad):
        assert _common.same_weights(_common.weights_fingerprint([weights]), _common.weights_fingerprint([weights]))
    other = w.clone()
    other[5, 2] += 1e-3
    assert not _common.same_weights(_common.weights_fingerprint([w]), _common.weights_fingerprint([other]))
    assert not _common.same_weights(_common.weights_fingerprint([w]), _common.weights_fingerprint([bad]))


@pytest.mark.parametrize("offload", [False, True])
def test_the_callbacks_recorder_logs_each_record_at_its_own_step_also_late_and_after_a_skipped_one(offload):
    from cmd_online.tensorboard import MetricsLogger

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    step, logged = [0], []
    rec = _common.StampedRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=20, warmup=3,
                                  offload=offload, clock=lambda: step[0])
    _common.add_observers(rec, [MetricsLogger(lambda metrics, at: logged.append((at, "cmd/memory/bytes" in metrics)),
                                              every=100, step=_common.step_function(rec))])
    with pytest.warns(RuntimeWarning, match="record 4 skipped"):
        for t in range(1, 9):
            step[0] = 10 * t  # the trainer's step when the record is taken; with offload it is told later
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
                if t == 5:  # a record of non-finite weights: skipped
                    kept = model.weight[0, 0].item()
                    model.weight[0, 0] = float("nan")
                    rec.record()
                    model.weight[0, 0] = kept
                    continue
            rec.record()
        rec.close()
    assert [at for at, per_record in logged if per_record] == [30, 40, 60, 70, 80]  # not 50: skipped
    assert rec.num_records == 7 and rec.attempts == 8
