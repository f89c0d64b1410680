"""The observer protocol: what observers are told, when, and that a failing observer never stops training."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import cmd_online as cmdo
import cmd_online.tensorboard as tb
from _digits import small_cnn, train_epoch

WARMUP = 3


class Journal:
    """An observer that writes down every event with what the recorder said at that moment."""

    def __init__(self):
        self.events = []

    def on_tracking_start(self, rec):
        self.events.append(("tracking_start", rec.num_records, rec.num_modes))

    def on_record(self, rec, index):
        self.events.append(("record", index, rec.phase))

    def on_close(self, rec):
        self.events.append(("close", rec.num_records, None))


def train(records, **kwargs):
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=100, warmup=WARMUP, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(records):
        train_epoch(model, opt, gen)
        assert rec.record() is True
    rec.close()
    return rec


def test_observers_are_told_each_record_the_end_of_the_warmup_and_the_close():
    journal = Journal()
    rec = train(6, callbacks=[journal])
    expected = [("record", 0, "warmup"), ("record", 1, "warmup"),
                ("tracking_start", WARMUP, rec.num_modes), ("record", 2, "tracking"),
                ("record", 3, "tracking"), ("record", 4, "tracking"), ("record", 5, "tracking"), ("close", 6, None)]
    assert journal.events == expected


def test_an_observer_that_raises_is_warned_about_and_training_goes_on():
    class Broken:
        def on_record(self, rec, index):
            raise KeyError("observer bug")

    journal = Journal()
    with pytest.warns(RuntimeWarning, match="Broken.on_record failed.*observer bug"):
        rec = train(5, callbacks=[Broken(), journal])
    assert rec.num_records == 5 and rec.phase == "tracking"
    assert [e for e in journal.events if e[0] == "record"] == [("record", i, "warmup" if i < WARMUP - 1 else
                                                                "tracking") for i in range(5)]
    assert torch.isfinite(rec.trajectory().a).all()


def test_callbacks_must_be_observers():
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"callbacks\[0\] \(int\) has none of the observer methods"):
        cmdo.CMDRecorder(opt, model, callbacks=[3])
    with pytest.raises(TypeError, match="callbacks must be a list"):
        cmdo.CMDRecorder(opt, model, callbacks=Journal())


def test_callbacks_replaced_between_records_are_checked_when_set():
    journal = Journal()
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=100, warmup=WARMUP, record_every=1)
    with pytest.raises(TypeError, match=r"callbacks\[0\] \(int\) has none of the observer methods"):
        rec.callbacks = [3]
    rec.callbacks = None  # no observers, as callbacks=None gives
    assert rec.callbacks == []
    gen = torch.Generator().manual_seed(0)
    train_epoch(model, opt, gen)  # record_every=1: every optimizer step records, and none raises
    rec.callbacks = [journal]
    train_epoch(model, opt, gen)
    assert journal.events and all(event[0] == "record" for event in journal.events)


def test_close_tells_the_observers_once_until_the_next_record():
    journal = Journal()
    model = small_cnn(seed=0)
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=3, samples=100,
                           warmup=WARMUP, callbacks=[journal])
    rec.record()
    for _ in range(3):
        rec.close()
    assert [e[0] for e in journal.events].count("close") == 1
    rec.record()  # a record after close: the next close is told again
    rec.close()
    assert [e[0] for e in journal.events].count("close") == 2


def scalars(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_a_tensorboard_logger_as_callback_logs_what_the_writer_shortcut_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")
    shortcut, observer = SummaryWriter(str(tmp_path / "shortcut")), SummaryWriter(str(tmp_path / "observer"))
    train(8, writer=shortcut, log_every=2)
    train(8, callbacks=[tb.TensorBoardLogger(observer, every=2)])
    shortcut.close()
    observer.close()
    a, b = scalars(tmp_path / "shortcut"), scalars(tmp_path / "observer")
    assert a.keys() == b.keys() and "cmd/fit/mean_r2" in a
    assert all(a[tag] == b[tag] for tag in a)


def test_the_writer_and_its_interval_can_be_changed_between_records(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=100, warmup=WARMUP)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(8):
        if epoch == 4:
            rec.writer, rec.log_every = SummaryWriter(str(tmp_path)), 1
        train_epoch(model, opt, gen)
        rec.record()
    rec.writer.close()
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["cmd/reference/mode_00"]] == [4, 5, 6, 7]
    assert [step for step, _ in logged["cmd/fit/mean_r2"]] == [4, 5, 6, 7]  # every record from the third on


def test_metrics_logger_hands_the_tensorboard_scalars_to_any_log_callable(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")
    calls, images = [], []
    writer = SummaryWriter(str(tmp_path))
    step = lambda index: 100 * (index + 1)  # noqa: E731 - e.g. the loop's global step at record `index`
    train(8, callbacks=[tb.TensorBoardLogger(writer, every=2, step=step),
                        tb.MetricsLogger(lambda metrics, at: calls.append((at, metrics)), every=2, step=step,
                                         image=lambda tag, array, at: images.append((tag, array.shape, array.dtype, at)))])
    writer.close()
    logged = scalars(tmp_path)
    by_tag = {}
    for at, metrics in calls:
        assert all(isinstance(v, float) for v in metrics.values())
        for tag, value in metrics.items():
            by_tag.setdefault(tag, []).append((at, value))
    assert by_tag.keys() == logged.keys() and "cmd/fit/mean_r2" in by_tag  # the same scalars …
    for tag in logged:  # … at the same steps (TensorBoard keeps float32)
        assert [s for s, _ in by_tag[tag]] == [s for s, _ in logged[tag]]
        assert [v for _, v in by_tag[tag]] == pytest.approx([v for _, v in logged[tag]], rel=1e-6)
    assert [s for s, _ in logged["cmd/reference/mode_00"]] == [100 * (i + 1) for i in range(WARMUP - 1, 8)]
    assert {tag for tag, *_ in images} == {"cmd/figures/correlation", "cmd/figures/references",
                                          "cmd/figures/mode_by_layer"}
    assert all(len(shape) == 3 and shape[2] == 3 and dtype == "uint8" for _, shape, dtype, _ in images)  # H × W × RGB
    assert images[0][3] == 100 * WARMUP  # the warm-up figures at the step of the record that ended it


def test_metrics_logger_checks_its_arguments():
    with pytest.raises(TypeError, match="log must be a callable"):
        tb.MetricsLogger("wandb")
    with pytest.raises(TypeError, match="image must be a callable"):
        tb.MetricsLogger(print, image=3)
    with pytest.raises(TypeError, match="step must be a callable"):
        tb.TensorBoardLogger(type("Writer", (), {"add_scalar": lambda *args: None})(), step=5)
