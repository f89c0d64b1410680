"""The recorder's façade (issue 21): run options, the callbacks' pass-through of the recorder's arguments,
the swap primitives, and the read-only summary observers see."""

from __future__ import annotations

import warnings

import pytest
import torch

import cmd_online as cmdo
from cmd_online.config import RunOptions
from _digits import flat, small_cnn, train_epoch


def small_recorder(**options):
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, cmdo.CMDRecorder(opt, model, **(dict(modes=3, samples=100, warmup=3) | options))


def train_records(model, opt, rec, records: int, seed: int = 0) -> list[torch.Tensor]:
    """``records`` epochs of real training on digits, a record after each; the flat weights recorded."""
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(records):
        train_epoch(model, opt, gen)
        rec.record()
        out.append(flat(model))
    return out


# ------------------------------------------------------------------------------------------ run options
def test_run_options_are_validated_once_naming_the_argument():
    assert RunOptions() == RunOptions(check_finite=True, kernel=None, offload=False)
    with pytest.raises(TypeError, match="check_finite"):
        RunOptions(check_finite=1)
    with pytest.raises(ValueError, match="kernel must be one of 'blocks', 'flat', 'compiled'; got 'fast'"):
        RunOptions(kernel="fast")
    with pytest.raises(TypeError, match="offload"):
        RunOptions(offload="yes")
    with pytest.raises(ValueError, match="kernel='flat'.*offload=True"):
        RunOptions(kernel="flat", offload=True)
    with pytest.raises(ValueError, match="compile_update=True asks for kernel='compiled'; got kernel='blocks'"):
        RunOptions.of(compile_update=True, kernel="blocks")
    options = RunOptions(kernel="blocks")
    with pytest.raises(AttributeError):
        options.kernel = "flat"  # frozen
    assert options.replace(check_finite=False) == RunOptions(check_finite=False, kernel="blocks")


def test_compile_update_still_works_with_a_future_warning():
    with pytest.warns(FutureWarning, match="compile_update=True is deprecated.*kernel='compiled'"):
        _, _, rec = small_recorder(compile_update=True)
    assert rec.run_options.kernel == "compiled" and rec.compile_update
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns of nothing
        _, _, rec = small_recorder(kernel="compiled")
    assert rec.run_options == RunOptions(kernel="compiled") and rec.compile_update


def test_check_finite_may_change_between_records_and_the_others_are_read_only():
    model, opt, rec = small_recorder()
    rec.check_finite = False
    assert rec.run_options.check_finite is False
    with pytest.raises(TypeError, match="check_finite"):
        rec.check_finite = "no"
    with pytest.raises(AttributeError):
        rec.offload = True
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    train_records(model, opt, rec, 1)  # taken although its weights hold NaN: the check is off
    assert rec.num_records == 1 and rec.skipped_records == 0


def test_the_callbacks_check_their_recorder_options_with_the_recorders_rules():
    pytest.importorskip("lightning")
    from cmd_online.integrations._common import Options, recorder_keywords

    options = Options.of(record_every_n_steps=None, log_every=10)
    defaults = recorder_keywords()
    assert options.config.samples == defaults["samples"] and options.config.warmup == defaults["warmup"]
    assert options.recorder == dict(check_finite=True, kernel=None, offload=False, callbacks=[])
    with pytest.warns(FutureWarning, match="compile_update"):
        options = Options.of(record_every_n_steps=None, log_every=10, compile_update=True)
    assert options.recorder["kernel"] == "compiled" and "compile_update" not in options.recorder
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_mode'"):
        Options.of(record_every_n_steps=None, log_every=10, max_mode=3)


def test_the_lightning_callback_logs_to_a_writer_at_the_trainers_global_steps(tmp_path):
    pytest.importorskip("lightning")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from _lightning_setup import Digits, train_loader, trainer
    from cmd_online.integrations.lightning import CMDCallback

    writer = SummaryWriter(str(tmp_path / "tb"))
    cmd = CMDCallback(modes=3, samples=300, warmup=3, record_every_n_steps=8, log_every=1, writer=writer)
    trainer(max_epochs=2, callbacks=[cmd]).fit(Digits(), train_loader())
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("cmd/reference/mode_00")] == [24, 32, 40, 48]
    with pytest.raises(TypeError, match="writer must be a SummaryWriter"):
        CMDCallback(writer="runs/cmd")


# ------------------------------------------------------------------------------------------ swap primitives
def test_store_copy_to_restore_swap_the_cmd_weights_in_and_the_trained_ones_back():
    model, opt, rec = small_recorder()
    train_records(model, opt, rec, 5)
    trained = [p.detach().clone() for p in model.parameters()]
    assert rec.stored_parameters is None and not rec.is_swapped
    rec.store()
    assert rec.is_swapped and all(torch.equal(s, t) for s, t in zip(rec.stored_parameters, trained))
    rec.copy_to(at=2)
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), rec.cmd_parameters(2)))
    rec.copy_to()  # another record, still over the same stored weights
    cmd = rec.cmd_parameters()
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), cmd))
    kept = rec.restore(keep=True)
    assert all(torch.equal(k, c) for k, c in zip(kept, cmd))  # what the parameters held, in params order
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    assert rec.stored_parameters is None and not rec.is_swapped
    rec.store()
    assert rec.restore() is None  # store then restore without copy_to: the trained weights, unchanged
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    train_records(model, opt, rec, 1, seed=1)  # recording goes on after the swap
    assert rec.num_records == 6


def test_the_swap_primitives_refuse_what_would_lose_the_trained_weights():
    model, opt, rec = small_recorder()
    train_records(model, opt, rec, 4)
    trained = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"copy_to\(\) overwrites the trained weights: call store\(\) first"):
        rec.copy_to()
    with pytest.raises(RuntimeError, match=r"restore\(\): nothing is stored"):
        rec.restore()
    rec.store()
    with pytest.raises(RuntimeError, match=r"stored already; restore\(\) them first"):
        rec.store()
    with pytest.raises(RuntimeError, match=r"stored already"):
        with rec.swapped():  # a swapped() block inside a store: refused, the stored weights kept
            pass
    with pytest.raises(ValueError, match="at=9 is out of range"):
        rec.copy_to(at=9)
    assert rec.is_swapped and all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\)"):
        rec.record()
    rec.restore()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_swapped_is_the_primitives_and_puts_the_trained_weights_back_on_error():
    model, opt, rec = small_recorder()
    train_records(model, opt, rec, 4)
    trained = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError):
        with rec.swapped(at=1):
            assert rec.is_swapped and all(torch.equal(s, t) for s, t in zip(rec.stored_parameters, trained))
            assert all(torch.equal(p, c) for p, c in zip(model.parameters(), rec.cmd_parameters(1)))
            raise KeyError("inside")
    assert not rec.is_swapped and rec.stored_parameters is None
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


# ------------------------------------------------------------------------------------------ observers' summary
def test_observers_read_a_frozen_summary_of_the_statistics():
    import dataclasses

    from cmd_online.summary import RecordingSummary

    model, opt, rec = small_recorder(freeze_modes_after=4)
    train_records(model, opt, rec, 2)
    assert rec.summary is None  # the warm-up: no statistics yet
    train_records(model, opt, rec, 3, seed=1)
    summary = rec.summary
    assert isinstance(summary, RecordingSummary) and not summary.compact and summary.modes is None
    assert summary.window_count == rec.num_records - rec.window_start == 3
    assert summary.numel == rec.layout.numel and list(summary.sizes) == rec.layout.sizes
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.window_count = 0
    assert not hasattr(summary, "update") and not hasattr(summary, "freeze")  # nothing that changes a statistic
    fit = summary.fit(slice(0, 50))
    whole = next(rec.fit_blocks(block=rec.layout.numel))  # the recorder's own fit (references pinned)
    unpinned = ~torch.isin(torch.arange(50), rec.reference_index)
    assert torch.equal(fit.a[unpinned], whole.fit.a[:50][unpinned])
    assert torch.equal(summary.resolved_references, torch.ones(rec.num_modes, dtype=torch.bool))
    train_records(model, opt, rec, 1, seed=2)  # the freeze (4 records into the window)
    assert rec.summary.compact and rec.summary.modes.shape == (rec.layout.numel,)
    assert summary.window_count == 3 and rec.summary.window_count == 4  # the earlier summary keeps its values


@pytest.mark.parametrize("offload", [False, True])
def test_an_observer_sees_the_summary_of_the_record_it_is_told_of(offload):
    class Counts:
        def __init__(self):
            self.seen = []

        def on_record(self, rec, index):
            summary = rec.summary
            self.seen.append((index, None if summary is None else summary.window_count))

    observer = Counts()
    model, opt, rec = small_recorder(callbacks=[observer], offload=offload)
    train_records(model, opt, rec, 5)
    rec.close()
    assert observer.seen == [(0, None), (1, None), (2, 1), (3, 2), (4, 3)]


# ------------------------------------------------------------------------------------------ one tensor validator
def test_the_one_tensor_validator_names_the_argument():
    from cmd_online.layout import check_tensor

    assert check_tensor("x", [1.0, 2.0]).dtype == torch.float32  # an array is taken where convert=True
    with pytest.raises(TypeError, match=r"^x must be a tensor of a floating-point .* dtype; got list$"):
        check_tensor("x", [1.0], convert=False)
    with pytest.raises(TypeError, match=r"^x must be an integer tensor; got dtype torch.float32$"):
        check_tensor("x", torch.zeros(2), "int")
    with pytest.raises(ValueError, match=r"^x must have shape \(3,\); got \(2,\)$"):
        check_tensor("x", torch.zeros(2), shape=(3,))
    with pytest.raises(ValueError, match=r"^x holds NaN or Inf values$"):
        check_tensor("x", torch.tensor([0.0, float("inf")]), finite=True)
    assert check_tensor("x", torch.tensor([3], dtype=torch.uint32), "int").dtype == torch.int64
