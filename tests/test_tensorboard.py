"""TensorBoard logging: real SummaryWriter event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import cmd_online as cmdo
import cmd_online.tensorboard as tb

from _digits import flat, small_cnn, train_epoch

WARMUP, EPOCHS, LOG_EVERY, MODES = 4, 10, 3, 4


def read(logdir) -> EventAccumulator:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def train(logdir, freeze=None, epochs=EPOCHS):
    """Short real training on digits with a writer; returns recorder, the flat history, and the logdir."""
    model = small_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writer = SummaryWriter(str(logdir))
    rec = cmdo.CMDRecorder(opt, model, modes=MODES, samples=200, warmup=WARMUP, writer=writer,
                           log_every=LOG_EVERY, freeze_modes_after=freeze)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(epochs):
        train_epoch(model, opt, gen)
        rec.record()
        history.append(flat(model))
    rec.close()
    writer.close()
    return rec, torch.stack(history, 1), model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb")
    rec, history, model = train(logdir)
    return rec, history, read(logdir)


def steps(ea, tag):
    return [e.step for e in ea.Scalars(tag)]


def last(ea, tag):
    return ea.Scalars(tag)[-1].value


def test_scalar_tags_form_one_tree(run):
    rec, _, ea = run
    expected = {f"cmd/{kind}/mode_{m:02d}" for kind in ("reference", "mode_size", "mode_share", "mode_r2")
                for m in range(rec.num_modes)}
    expected |= {"cmd/memory/bytes", "cmd/fit/mean_r2", "cmd/fit/relative_residual", "cmd/fit/references_set_aside"}
    assert set(ea.Tags()["scalars"]) == expected


def test_per_record_scalars_at_every_tracking_record(run):
    rec, _, ea = run
    traj = rec.trajectory()
    assert steps(ea, "cmd/reference/mode_00") == list(range(WARMUP - 1, EPOCHS))
    for m in range(rec.num_modes):
        logged = [e.value for e in ea.Scalars(f"cmd/reference/mode_{m:02d}")]
        assert np.allclose(logged, traj.references[m, WARMUP - 1:].numpy(), rtol=1e-6)
    assert steps(ea, "cmd/memory/bytes") == list(range(WARMUP - 1, EPOCHS))  # from the end of the warm-up
    assert last(ea, "cmd/memory/bytes") == rec.nbytes()["total"]


def test_mode_statistics_on_the_interval_and_at_close(run):
    _, _, ea = run
    # the third record of the window (two points fit any line), then every LOG_EVERY, then close
    first = WARMUP - 1 + 2
    assert steps(ea, "cmd/mode_size/mode_00") == [first, first + LOG_EVERY, EPOCHS - 1]
    assert steps(ea, "cmd/fit/relative_residual") == [first, first + LOG_EVERY, EPOCHS - 1]


def test_logged_mode_sizes_sum_to_n_and_match_the_trajectory(run):
    rec, _, ea = run
    sizes = [last(ea, f"cmd/mode_size/mode_{m:02d}") for m in range(rec.num_modes)]
    assert sum(sizes) == rec.layout.numel
    assert sizes == rec.trajectory().mode_sizes().tolist()
    shares = [last(ea, f"cmd/mode_share/mode_{m:02d}") for m in range(rec.num_modes)]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)


def test_logged_r2_match_the_fit(run):
    rec, _, ea = run
    traj = rec.trajectory()
    r2 = torch.cat(rec.r2())
    assert math.isclose(last(ea, "cmd/fit/mean_r2"), r2.mean().item(), rel_tol=1e-5)
    logged = [last(ea, f"cmd/mode_r2/mode_{m:02d}") for m in range(rec.num_modes)]
    assert np.allclose(logged, traj.mode_r2.numpy(), rtol=1e-5)


def test_relative_residual_is_the_reconstruction_error_in_the_window(run):
    rec, history, ea = run
    traj = rec.trajectory()
    window = history[:, WARMUP - 1:]
    cmd = torch.stack([traj.reconstruct(at).double() for at in range(WARMUP - 1, EPOCHS)], 1)
    centred = window - window.mean(1, keepdim=True)
    expected = ((window - cmd).norm() / centred.norm()).item()
    assert 0.01 < expected < 1  # a real, non-trivial fit error
    assert math.isclose(last(ea, "cmd/fit/relative_residual"), expected, rel_tol=1e-3)


def test_histograms_of_a_and_r2(run):
    rec, _, ea = run
    for tag in ("cmd/hist/a", "cmd/hist/r2"):
        events = ea.Histograms(tag)
        assert [e.step for e in events] == [WARMUP + 1, WARMUP + 1 + LOG_EVERY, EPOCHS - 1]
        h = events[-1].histogram_value
        assert h.num == rec.layout.numel and sum(h.bucket) == rec.layout.numel
    r2 = ea.Histograms("cmd/hist/r2")[-1].histogram_value
    assert 0 <= r2.min <= r2.max <= 1 + 1e-6


def test_config_text(run):
    rec, _, ea = run
    text = ea.Tensors("cmd/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| parameters N | {rec.layout.numel} |" in text
    assert f"| modes M | {rec.num_modes} |" in text and "| warm-up F | 4 |" in text
    assert "| form | full |" in text


def decoded(ea, tag):
    return [(e.step, Image.open(io.BytesIO(e.encoded_image_string)).size, (e.width, e.height))
            for e in ea.Images(tag)]


def test_figures_decode_with_their_size(run):
    rec, _, ea = run
    start = WARMUP - 1
    corr = decoded(ea, "cmd/figures/correlation")
    assert corr == [(start, (520, 440), (520, 440))]  # matplotlib: figsize × dpi
    refs = decoded(ea, "cmd/figures/references")
    assert refs[0][0] == start and refs[0][1] == refs[0][2] and refs[0][1][0] == 600
    layers = decoded(ea, "cmd/figures/mode_by_layer")
    assert [s for s, _, _ in layers] == [start, WARMUP + 1, WARMUP + 1 + LOG_EVERY, EPOCHS - 1]
    # interval maps are native: 6 tensors × 4 modes, cells of 256 // 6 = 42 pixels
    assert layers[1][1] == layers[1][2] == (MODES * 42, 6 * 42)
    assert all(size == wh for _, size, wh in layers)


def test_the_reference_figure_grows_with_the_run(run):
    _, _, ea = run
    start = WARMUP - 1
    refs = decoded(ea, "cmd/figures/references")
    # the warm-up's figure, then all records so far at every interval log and at close
    assert [step for step, _, _ in refs] == [start, WARMUP + 1, WARMUP + 1 + LOG_EVERY, EPOCHS - 1]
    assert refs[1][1] == (320, 32 * MODES)  # interval: a native image (a matplotlib figure costs far more)
    assert refs[-1][1][0] == 600  # close: matplotlib


def test_native_renderers_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")
    rec, _, _ = train(tmp_path, epochs=WARMUP + 1)
    ea = read(tmp_path)
    k = len(rec.clustering.varying)
    scale = max(1, 256 // k)
    assert decoded(ea, "cmd/figures/correlation")[0][1] == (k * scale, k * scale)
    assert decoded(ea, "cmd/figures/references")[0][1] == (320, 32 * rec.num_modes)
    assert decoded(ea, "cmd/figures/mode_by_layer")[0][1] == (MODES * 42, 6 * 42)


def test_heatmap_image_marks_mode_boundaries():
    values = torch.zeros(6, 6)
    img = tb.heatmap_image(values, rows=[2], cols=[4], size=60)
    assert img.dtype == torch.uint8 and img.shape == (3, 60, 60)
    assert (img[:, 20, :] == 255).all() and (img[:, :, 40] == 255).all()
    assert (img[:, 0, 0] == torch.tensor([68, 1, 84], dtype=torch.uint8)).all()  # viridis at 0
    big = tb.heatmap_image(torch.rand(1000, 1000), size=256)
    assert big.shape == (3, 256, 256)


def test_lines_image_draws_each_series_in_its_strip():
    series = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    img = tb.lines_image(series, width=50, strip=20)
    assert img.shape == (3, 40, 50)
    coloured = (img != 255).any(0) & (img != 220).any(0)
    assert coloured[:20].any() and coloured[20:].any()
    assert coloured[20:23, :].sum() == 50  # a constant 1.0 sits at the top of strip 1


def test_compact_form_logs_sizes_every_record(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")  # figures are not what this test is about
    rec, _, _ = train(tmp_path, freeze=2, epochs=8)
    ea = read(tmp_path)
    logged = steps(ea, "cmd/mode_size/mode_00")
    assert logged == list(range(WARMUP - 1 + 1, 8))  # frozen from the second window record on
    sizes = [last(ea, f"cmd/mode_size/mode_{m:02d}") for m in range(rec.num_modes)]
    assert sizes == rec.trajectory().mode_sizes().tolist()


def test_log_on_the_users_schedule(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "FIGURES", "native")
    model = small_cnn(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(opt, model, modes=3, samples=100, warmup=3)
    writer = SummaryWriter(str(tmp_path))
    gen = torch.Generator().manual_seed(1)
    for epoch in range(7):
        train_epoch(model, opt, gen)
        rec.record()
        rec.log(writer, step=100 * epoch)
    writer.close()
    ea = read(tmp_path)
    assert steps(ea, "cmd/memory/bytes") == [100 * e for e in range(7)]  # warm-up too
    assert steps(ea, "cmd/reference/mode_00") == [200, 300, 400, 500, 600]
    # third window record on: the default compact form knows its mode sizes without a pass over the weights
    assert steps(ea, "cmd/mode_size/mode_00") == [400, 500, 600]
    assert "cmd/figures/references" in ea.Tags()["images"]


def test_a_figure_that_fails_warns_once_and_the_scalars_go_on(tmp_path):
    class BrokenFigures(SummaryWriter):  # a real writer whose image back end fails (e.g. a broken PIL)
        def add_figure(self, *args, **kwargs):
            raise RuntimeError("figure back end broken")

        def add_image(self, *args, **kwargs):
            raise RuntimeError("image back end broken")

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    writer = BrokenFigures(str(tmp_path))
    rec = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.05), model, modes=2, samples=20, warmup=3,
                           writer=writer, log_every=2)
    with pytest.warns(RuntimeWarning, match="figure back end broken|image back end broken") as caught:
        for _ in range(10):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            rec.record()
        rec.close()
    writer.close()
    ea = read(tmp_path)
    assert steps(ea, "cmd/reference/mode_00") == list(range(2, 10))  # every tracking record
    assert steps(ea, "cmd/fit/mean_r2")[:2] == [4, 6]  # the interval logs too (from the window's third record)
    failures = [w for w in caught if "back end broken" in str(w.message)]
    assert len(failures) <= 1 + 10 // 2  # the warm-up figures once, then at most once per interval log
