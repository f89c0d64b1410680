"""cmd_online.integrations.lightning.CMDCallback with real Lightning Trainers on CPU (digits).

One uninterrupted 8-epoch run (validation on the CMD weights, checkpoints every epoch and in the middle
of validation, TensorBoard logging, export) serves the tests of what it records and writes; the other
tests run their own short fits. The DDP run (Lightning's ``strategy="ddp"``, 2 gloo processes) is a
script started in the background at the module's first test: Lightning's DDP launcher starts the other
rank by running the script again, which it cannot do with pytest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _background import rank_results, run_in_background
from _states import assert_same, leaves
from cmd_online.checkpoint import read_meta
import torch

pl = pytest.importorskip("lightning.pytorch")

import cmd_online as cmdo  # noqa: E402
from _cmd_checks import assert_same_cmd, assert_same_cmd_model, assert_same_trajectory  # noqa: E402
from _lightning_setup import Digits, Snapshots, StepSnapshots, flat, train_loader, trainer, val_loader  # noqa: E402
from cmd_online.integrations.lightning import CMDCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
# the full form (freeze_modes_after=None): its free modes are what decompose() computes post hoc
CONFIG = dict(modes=3, samples=300, warmup=4, seed=0, freeze_modes_after=None)
EPOCHS = 8
F = CONFIG["warmup"]


# ------------------------------------------------------------------------------------------ DDP run
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Start tests/_lightning_ddp.py (2 processes) now; the DDP tests wait for it."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    yield from run_in_background([str(HERE / "_lightning_ddp.py"), str(out)], out)


@pytest.fixture(scope="module", autouse=True)
def _start_ddp_early(ddp_run):
    """The DDP script spends most of its time importing Lightning: let it overlap with the other tests."""


def ddp_results(ddp_run) -> tuple[Path, list[dict]]:
    return rank_results(ddp_run, "the Lightning DDP script")


# ------------------------------------------------------------------------------------------ the main run
class DuringValidation(pl.Callback):
    """At the first validation batch: the weights validated, and a checkpoint written right then."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.validated: dict[int, torch.Tensor] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            epoch = trainer.current_epoch
            self.validated[epoch] = flat(pl_module)
            trainer.save_checkpoint(self.folder / f"mid_validation_epoch{epoch}.ckpt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lightning_run")
    cmd = CMDCallback(**CONFIG, swap_for_validation=True, export_path=folder / "cmd.ckpt", log_every=2)
    snapshots, during = Snapshots(), DuringValidation(folder)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=folder / "ckpt", filename="{epoch}", save_top_k=-1)
    best = pl.callbacks.ModelCheckpoint(dirpath=folder / "best", filename="{epoch}-{val_loss:.4f}", monitor="val_loss")
    loggers = [pl.loggers.TensorBoardLogger(folder, name="tb", version=0), pl.loggers.CSVLogger(folder, name="csv", version=0)]
    fit = trainer(max_epochs=EPOCHS, callbacks=[cmd, snapshots, during, checkpoints, best], enable_checkpointing=True,
                  logger=loggers)
    model = Digits()
    fit.fit(model, train_loader(), val_loader())
    return dict(folder=folder, cmd=cmd, model=model, W=snapshots.matrix(), during=during, trainer=fit, best=best)


def test_per_epoch_records_equal_decompose_of_the_epoch_end_weights(run):
    rec = run["cmd"].recorder
    assert rec.num_records == EPOCHS
    W = run["W"]
    oracle = cmdo.decompose(W, modes=CONFIG["modes"], samples=CONFIG["samples"], seed=CONFIG["seed"], warmup=F,
                            layout=rec.layout)
    traj = rec.trajectory()
    assert_same_trajectory(traj, oracle)


def test_validation_runs_on_the_cmd_weights_of_the_epoch_just_recorded(run):
    W, validated = run["W"], run["during"].validated
    assert sorted(validated) == list(range(EPOCHS))
    for epoch in range(F - 1):  # no CMD weights during the warm-up: the trained ones are validated
        assert torch.equal(validated[epoch], W[:, epoch])
    # at record F-1 the fit window holds one record: the CMD weights are the trained ones (to round-off)
    torch.testing.assert_close(validated[F - 1], W[:, F - 1], rtol=0, atol=1e-6)
    for epoch in range(F, EPOCHS):  # the CMD model fitted on the records up to this epoch, at this epoch
        oracle = cmdo.decompose(W[:, :epoch + 1], modes=CONFIG["modes"], samples=CONFIG["samples"], warmup=F,
                                layout=run["cmd"].recorder.layout)
        assert_same_cmd(validated[epoch], oracle.reconstruct(epoch))
        if epoch > F:  # from 3 records of the window on, the fit is no longer exact: not the trained weights
            assert (validated[epoch] - W[:, epoch]).abs().max() > 1e-3


def flat_state(state_dict: dict) -> torch.Tensor:
    return torch.cat([state_dict[k].reshape(-1).double() for k in Digits().state_dict()])


def test_checkpoints_hold_the_validated_weights_and_the_trained_ones_in_the_callback_state(run):
    # Lightning's WeightAveraging convention: the state_dict holds the weights the validation ran on (whose
    # score the checkpoint carries), the trained ones travel in the callback's state for a resume
    W, validated = run["W"], run["during"].validated
    for epoch in range(EPOCHS):
        for name in (f"mid_validation_epoch{epoch}.ckpt", f"ckpt/epoch={epoch}.ckpt"):
            checkpoint = torch.load(run["folder"] / name, weights_only=True)
            state = checkpoint["callbacks"]["CMDCallback"]
            assert torch.equal(flat_state(checkpoint["state_dict"]), validated[epoch]), name
            if epoch < F - 1:  # the warm-up: the trained weights were validated
                assert "trained_weights" not in state, name
            else:
                assert torch.equal(flat_state(state["trained_weights"]), W[:, epoch]), name
        state = torch.load(run["folder"] / f"mid_validation_epoch{epoch}.ckpt", weights_only=True)["callbacks"]
        assert read_meta(state["CMDCallback"]["recorder"])["num_records"] == epoch + 1  # the epoch was recorded before
        if epoch > F:
            assert not torch.equal(validated[epoch], W[:, epoch])


def test_the_best_checkpoint_holds_the_weights_that_earned_its_score(run):
    best = run["best"]
    model = Digits.load_from_checkpoint(best.best_model_path)  # as a user loads the best model
    score = trainer().validate(model, val_loader(), verbose=False)[0]
    assert score["val_loss"] == pytest.approx(float(best.best_model_score), rel=1e-6)
    epoch = torch.load(best.best_model_path, weights_only=True)["epoch"]
    assert epoch >= F and torch.equal(flat(model), run["during"].validated[epoch])  # the CMD weights of that epoch


def test_the_trained_weights_are_back_in_the_model_after_fit(run):
    assert torch.equal(flat(run["model"]), run["W"][:, -1])


def test_export_path_is_a_lightning_checkpoint_of_the_cmd_model(run):
    model = Digits.load_from_checkpoint(run["folder"] / "cmd.ckpt")  # KeyError 'pytorch-lightning_version' before
    assert_same_cmd(flat(model), run["cmd"].recorder.trajectory().reconstruct(-1))
    for key, value in run["cmd"].cmd_state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    checkpoint = torch.load(run["folder"] / "cmd.ckpt", weights_only=True)
    assert checkpoint["global_step"] == EPOCHS * 24 and "callbacks" not in checkpoint and "optimizer_states" not in checkpoint


def test_checkpoints_hold_the_recorder_state_as_plain_tensors(run):
    for epoch in (1, EPOCHS - 1):
        state = torch.load(run["folder"] / f"ckpt/epoch={epoch}.ckpt", weights_only=True)["callbacks"]["CMDCallback"]
        assert read_meta(state["recorder"])["num_records"] == epoch + 1 and state["recorded_epoch"] == epoch


RECORD_STEPS = [24 * (epoch + 1) for epoch in range(F - 1, EPOCHS)]  # global steps of the records from the warm-up's end


def csv_metrics(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mode_statistics_go_to_every_logger_at_the_global_step(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["folder"] / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "cmd/reference/mode_00" in scalars and "val_loss" in scalars
    assert [e.step for e in events.Scalars("cmd/reference/mode_00")] == RECORD_STEPS  # not the record index
    assert [e.step for e in events.Scalars("cmd/fit/mean_r2")] == RECORD_STEPS[2::2]  # every 2 from the 3rd
    assert "cmd/figures/correlation" in events.Tags()["images"]
    references = run["cmd"].recorder.trajectory().references
    # every logger Lightning supports gets the scalars through log_metrics: here a CSVLogger
    rows = csv_metrics(run["folder"] / "csv" / "version_0" / "metrics.csv")
    logged = [(int(r["step"]), float(r["cmd/reference/mode_00"])) for r in rows if r.get("cmd/reference/mode_00")]
    assert logged == [(s, pytest.approx(float(references[0, F - 1 + i]))) for i, s in enumerate(RECORD_STEPS)]
    assert [int(r["step"]) for r in rows if r.get("cmd/fit/mean_r2")] == RECORD_STEPS[2::2]
    assert [e.value for e in events.Scalars("cmd/fit/mean_r2")] == pytest.approx(
        [float(r["cmd/fit/mean_r2"]) for r in rows if r.get("cmd/fit/mean_r2")])


def test_the_command_line_reads_lightning_checkpoints_and_the_cmd_state_in_them(run, tmp_path, capsys):
    from cmd_online.cli import main

    folder, rec = run["folder"] / "ckpt", run["cmd"].recorder
    # a folder of .ckpt files, in epoch order; their state_dicts hold the validated CMD weights, the records are
    # the trained ones from the callback state
    assert main(["decompose", str(folder), "-o", str(tmp_path / "t.pt"), "--modes", "3", "--samples", "300",
                 "--warmup", str(F)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"records: {EPOCHS} checkpoints, in this order: {', '.join(f'epoch={e}.ckpt' for e in range(EPOCHS))}" in said
    traj = cmdo.CMDTrajectory.load(tmp_path / "t.pt")
    oracle = cmdo.decompose(run["W"], modes=3, samples=300, warmup=F, layout=rec.layout)
    assert_same_trajectory(traj, oracle)
    # inspect and export read the recorder state in the checkpoint's callbacks
    assert main(["inspect", str(folder / f"epoch={EPOCHS - 1}.ckpt")]) == 0
    said = capsys.readouterr().out
    assert f"records      {EPOCHS} (a, b fitted over records {F - 1}..{EPOCHS - 1})" in said and "net.0.weight" in said
    assert main(["inspect", str(folder / f"epoch={EPOCHS - 1}.ckpt"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == EPOCHS and summary["modes"] == rec.num_modes and summary["file_bytes"] is None
    assert main(["export", str(folder / f"epoch={EPOCHS - 1}.ckpt"), "-o", str(tmp_path / "cmd.ckpt")]) == 0
    assert "LitModel.load_from_checkpoint" in capsys.readouterr().out
    model = Digits.load_from_checkpoint(tmp_path / "cmd.ckpt")
    assert_same_cmd(flat(model), rec.trajectory().reconstruct(-1))
    assert main(["export", str(folder / f"epoch={EPOCHS - 1}.ckpt"), "--at", "5", "-o", str(tmp_path / "at5.pt")]) == 0
    at5 = torch.load(tmp_path / "at5.pt", weights_only=True)
    assert_same_cmd(torch.cat([at5[n].reshape(-1) for n in rec.layout.names]), rec.trajectory().reconstruct(5))


@pytest.mark.parametrize("name", ["ckpt/epoch=5.ckpt", "mid_validation_epoch5.ckpt"])
def test_fit_resumed_from_a_checkpoint_continues_the_same_recording(run, tmp_path, name):
    checkpoint = run["folder"] / name
    assert read_meta(torch.load(checkpoint, weights_only=True)["callbacks"]["CMDCallback"]["recorder"])["num_records"] == 6
    cmd = CMDCallback(**CONFIG, swap_for_validation=True)
    model = Digits()
    trainer(max_epochs=EPOCHS, callbacks=[cmd], default_root_dir=tmp_path).fit(
        model, train_loader(), val_loader(), ckpt_path=checkpoint)
    assert cmd.recorder.num_records == EPOCHS
    resumed, uninterrupted = cmd.recorder.trajectory(), run["cmd"].recorder.trajectory()
    for key in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(resumed, key), getattr(uninterrupted, key)), key
    assert torch.equal(flat(model), run["W"][:, -1])  # training went on from the trained weights


def test_resume_from_a_checkpoint_without_cmd_state_is_refused_unless_resume_false(run, tmp_path):
    checkpoint = torch.load(run["folder"] / "ckpt" / "epoch=5.ckpt", weights_only=True)
    del checkpoint["callbacks"]["CMDCallback"]
    torch.save(checkpoint, tmp_path / "without.ckpt")
    with pytest.raises(ValueError, match=r"holds no CMDCallback state.*resume=False"):
        trainer(max_epochs=EPOCHS, callbacks=[CMDCallback(**CONFIG)], default_root_dir=tmp_path).fit(
            Digits(), train_loader(), ckpt_path=tmp_path / "without.ckpt")
    cmd = CMDCallback(**CONFIG, resume=False)
    trainer(max_epochs=EPOCHS, callbacks=[cmd], default_root_dir=tmp_path).fit(
        Digits(), train_loader(), ckpt_path=tmp_path / "without.ckpt")
    assert cmd.recorder.num_records == 2  # a new recording of epochs 6 and 7


# ------------------------------------------------------------------------------------------ both metrics
class WithMetric(Digits):
    """Logs a torchmetrics metric too, and keeps outputs for on_validation_epoch_end, as many modules do."""

    def __init__(self):
        super().__init__()
        torchmetrics = pytest.importorskip("torchmetrics")
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")
        self.outputs, self.outputs_per_epoch = [], []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.accuracy(self(x), y)
        self.log("val_metric", self.accuracy)
        self.outputs.append(len(y))
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        self.outputs_per_epoch.append(sum(self.outputs))
        self.outputs.clear()


def test_evaluate_cmd_logs_the_cmd_weights_metrics_beside_the_trained_ones(tmp_path):
    cmd = CMDCallback(**CONFIG | dict(warmup=3), evaluate_cmd=True)
    by_cmd = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "best", filename="best", monitor="cmd/val_loss")
    model = WithMetric()
    fit = trainer(max_epochs=5, callbacks=[cmd, by_cmd], enable_checkpointing=True,
                  logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0))
    with pytest.warns(RuntimeWarning, match=r"appended to self.outputs during the validation of the CMD weights"):
        fit.fit(model, train_loader(), val_loader())  # monitoring cmd/val_loss from the first epoch on
    rows = [r for r in csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv") if r.get("val_loss")]
    got = [{k: float(r[k]) for k in ("val_loss", "val_metric", "cmd/val_loss", "cmd/val_acc", "cmd/val_metric")}
           for r in rows]
    assert [int(r["step"]) for r in rows] == [24 * e + 23 for e in range(5)]  # one row per validation
    assert got[0]["cmd/val_loss"] == got[0]["val_loss"]  # the warm-up: no CMD model, the trained weights'
    assert model.outputs_per_epoch == [len(val_loader().dataset)] * 5  # the trained pass's outputs only
    trained = trainer().validate(model, val_loader(), verbose=False)[0]
    with cmd.swapped():
        cmd_score = trainer().validate(model, val_loader(), verbose=False)[0]
    assert got[-1]["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    assert got[-1]["val_metric"] == pytest.approx(trained["val_metric"], rel=1e-6)
    for key in ("val_loss", "val_acc", "val_metric"):
        assert got[-1][f"cmd/{key}"] == pytest.approx(cmd_score[key], rel=1e-6), key
    assert abs(got[-1]["cmd/val_loss"] - got[-1]["val_loss"]) > 1e-4
    assert by_cmd.best_model_score == pytest.approx(min(g["cmd/val_loss"] for g in got), rel=1e-6)


def test_evaluate_cmd_leaves_the_iterator_of_a_loader_with_persistent_workers_alone():
    x, y = val_loader().dataset.tensors
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, num_workers=1,
                                         persistent_workers=True)
    model = WithMetric()
    with pytest.warns(RuntimeWarning, match="appended to self.outputs"):
        trainer(max_epochs=4, callbacks=[CMDCallback(**CONFIG | dict(warmup=3), evaluate_cmd=True)]).fit(
            model, train_loader(), loader)
    assert model.outputs_per_epoch == [len(y)] * 4  # Lightning's own pass saw every batch, after the CMD pass too


class ImageLogger(pl.loggers.Logger):
    """A logger with log_image, as W&B's: what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics, self.images = [], []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, images[0].shape))


def test_a_logger_that_takes_images_gets_the_figures_too():
    logger = ImageLogger()
    trainer(max_epochs=4, callbacks=[CMDCallback(**CONFIG | dict(warmup=3), log_every=1)], logger=logger).fit(
        Digits(), train_loader())
    assert {key for key, *_ in logger.images} == {"cmd/figures/correlation", "cmd/figures/references",
                                                 "cmd/figures/mode_by_layer"}
    assert {step for _, step, _ in logger.images if step != 96} == {72}  # the warm-up's end; interval maps later
    steps = [step for step, metrics in logger.metrics if "cmd/reference/mode_00" in metrics]
    assert steps == [72, 96]


def test_swap_for_validation_and_evaluate_cmd_are_refused_together():
    with pytest.raises(ValueError, match="swap_for_validation.*evaluate_cmd.*choose one"):
        CMDCallback(swap_for_validation=True, evaluate_cmd=True)


# ------------------------------------------------------------------------------------------ recorder options
OPTIONS = [dict(modes=None, threshold=0.5, max_modes=2), dict(distance="euclidean"), dict(kernel="flat"),
           dict(offload=True), dict(modes=None, threshold=0.5, max_modes=2, offload=True, distance="euclidean")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_every_recorder_option_works_through_the_callback(tmp_path, options):
    config = CONFIG | dict(warmup=3) | options
    cmd, snapshots = CMDCallback(**config, record_every_n_steps=8), StepSnapshots(every=8)
    fit = trainer(max_epochs=2, callbacks=[cmd, snapshots], logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0))
    fit.fit(Digits(), train_loader())
    rec = cmd.recorder
    assert rec.num_records == 6 and rec.offload == options.get("offload", False)
    oracle = cmdo.decompose(snapshots.matrix(), **{k: v for k, v in config.items() if k not in ("offload", "kernel", "freeze_modes_after")},
                            layout=rec.layout)
    traj = rec.trajectory()
    assert traj.num_modes <= options.get("max_modes", 3)
    assert_same_trajectory(traj, oracle)
    rows = csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")  # at the records' global steps, offload too
    assert [int(r["step"]) for r in rows if r.get("cmd/reference/mode_00")] == [24, 32, 40, 48]


def test_recorder_arguments_are_checked_when_the_callback_is_created():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'mode'.*modes, threshold"):
        CMDCallback(mode=3)
    with pytest.raises(TypeError, match="record_every_n_steps"):
        CMDCallback(record_every=3)
    with pytest.raises(ValueError, match="max_modes"):
        CMDCallback(modes=3, max_modes=2)
    with pytest.raises(ValueError, match="kernel"):
        CMDCallback(kernel="fast")
    with pytest.raises(ValueError, match="offload=True"):
        CMDCallback(kernel="flat", offload=True)
    with pytest.raises(TypeError, match="offload"):
        CMDCallback(offload=1)


# ------------------------------------------------------------------------------------------ when it records
def test_records_count_optimizer_steps_not_micro_batches_nor_amp_skipped_steps():
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Batches(pl.Callback):
        count = 0

        def on_train_batch_end(self, *args):
            self.count += 1

    # Lightning refuses precision="16-mixed" on a CPU; its plugin with a GradScaler is the GPU set-up.
    # A huge initial scale makes the first steps overflow: the scaler skips them and halves its scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    cmd, batches = CMDCallback(modes=3, samples=200, warmup=2, record_every_n_steps=3), Batches()
    fit = trainer(max_epochs=1, callbacks=[cmd, batches], accumulate_grad_batches=2,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    fit.fit(Digits(), train_loader())
    skipped = round(math.log2(2.0 ** 24 / scaler.get_scale()))  # no growth within 2000 steps
    assert batches.count == 24 and fit.global_step == 12  # Lightning's count includes the skipped steps
    assert skipped > 0
    assert cmd.recorder.num_records == (fit.global_step - skipped) // 3


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers, stepped through Lightning's LightningOptimizer wrappers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(64, 16), torch.nn.Linear(16, 10)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        body, head = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=1e-2)


def test_several_optimizers_need_optimizer_index_and_lightning_optimizer_steps_are_counted():
    with pytest.raises(ValueError, match=r"2 optimizers \(SGD, Adam\).*optimizer_index"):
        trainer(max_steps=1, callbacks=[CMDCallback(samples=50)]).fit(TwoOptimizers(), train_loader())
    cmd = CMDCallback(modes=2, samples=50, warmup=3, record_every_n_steps=2, optimizer_index=1)
    fit = trainer(max_epochs=1, callbacks=[cmd])
    fit.fit(TwoOptimizers(), train_loader())
    assert cmd.recorder.layout.names == ("head.weight", "head.bias")
    assert cmd.recorder.num_records == 24 // 2


def test_one_callback_per_optimizer_each_keeps_its_own_state_in_the_checkpoint(tmp_path):
    body, head = (CMDCallback(modes=2, samples=50, warmup=2, optimizer_index=i) for i in (0, 1))
    assert body.state_key != head.state_key and CMDCallback().state_key == "CMDCallback"  # old checkpoints load
    fit = trainer(max_epochs=2, callbacks=[body, head])
    fit.fit(TwoOptimizers(), train_loader())
    fit.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert {read_meta(states[cmd.state_key]["recorder"])["layout"]["names"][0] for cmd in (body, head)} == {
        "body.weight", "head.weight"}
    body, head = (CMDCallback(modes=2, samples=50, warmup=2, optimizer_index=i) for i in (0, 1))
    trainer(max_epochs=3, callbacks=[body, head]).fit(TwoOptimizers(), train_loader(), ckpt_path=tmp_path / "two.ckpt")
    assert body.recorder.layout.names == ("body.weight", "body.bias")
    assert head.recorder.layout.names == ("head.weight", "head.bias")
    assert body.recorder.num_records == head.recorder.num_records == 3
    # a checkpoint of an earlier version holds its one callback's state under "CMDCallback"
    older = torch.load(tmp_path / "two.ckpt", weights_only=True)
    older["callbacks"] = {"CMDCallback": states[head.state_key]}
    torch.save(older, tmp_path / "older.ckpt")
    head = CMDCallback(modes=2, samples=50, warmup=2, optimizer_index=1)
    trainer(max_epochs=3, callbacks=[head]).fit(TwoOptimizers(), train_loader(), ckpt_path=tmp_path / "older.ckpt")
    assert head.recorder.num_records == 3


def test_a_second_fit_continues_the_recording_of_the_first():
    config = CONFIG | dict(warmup=2)
    straight = CMDCallback(**config)
    trainer(max_epochs=4, callbacks=[straight]).fit(Digits(), train_loader())
    cmd, model = CMDCallback(**config), Digits()
    fit = trainer(max_epochs=2, callbacks=[cmd])
    fit.fit(model, train_loader())
    first = cmd.recorder.trajectory().references.clone()
    fit.fit_loop.max_epochs = 4
    fit.fit(model, train_loader())  # epochs 2 and 3; Lightning makes a new optimizer
    assert cmd.recorder.num_records == straight.recorder.num_records == 4
    assert read_meta(cmd.recorder.state_dict())["steps"] == 4 * 24
    references = cmd.recorder.trajectory().references
    assert torch.equal(references[:, :2], first)
    assert torch.equal(references[:, :2], straight.recorder.trajectory().references[:, :2])


def test_a_second_fit_of_other_parameters_warns_and_starts_a_new_recording():
    class Smaller(Digits):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

    cmd = CMDCallback(**CONFIG | dict(warmup=2))
    trainer(max_epochs=2, callbacks=[cmd]).fit(Digits(), train_loader())
    with pytest.warns(RuntimeWarning, match=r"other parameters than the earlier run .*\(2 records\) is not continued"):
        trainer(max_epochs=1, callbacks=[cmd]).fit(Smaller(), train_loader())
    assert cmd.recorder.num_records == 1 and cmd.recorder.layout.names == ("net.weight", "net.bias")


def test_a_second_fit_of_another_model_of_the_same_shapes_starts_a_new_recording():
    cmd = CMDCallback(**CONFIG | dict(warmup=2))
    trainer(max_epochs=2, callbacks=[cmd]).fit(Digits(), train_loader())
    with pytest.warns(RuntimeWarning, match=r"other parameters than the earlier run .*\(2 records\) is not continued"):
        trainer(max_epochs=1, callbacks=[cmd]).fit(Digits(), train_loader())  # same shapes, another model
    assert cmd.recorder.num_records == 1


def test_a_refused_resume_leaves_the_earlier_recording_as_it_was(run, tmp_path):
    cmd, model = CMDCallback(**CONFIG | dict(warmup=2)), Digits()
    fit = trainer(max_epochs=2, callbacks=[cmd])
    fit.fit(model, train_loader())
    recorder = cmd.recorder
    with pytest.raises(ValueError, match="warmup=4, but this recorder has warmup=2"):  # another run's checkpoint
        trainer(max_epochs=EPOCHS, callbacks=[cmd]).fit(Digits(), train_loader(),
                                                          ckpt_path=run["folder"] / "ckpt" / "epoch=5.ckpt")
    assert cmd.recorder is recorder and recorder.num_records == 2
    fit.fit_loop.max_epochs = 4
    fit.fit(model, train_loader())  # and the recording goes on
    assert cmd.recorder.num_records == 4


def test_a_one_optimizer_checkpoint_resumes_with_or_without_optimizer_index(tmp_path):
    for saved, resumed in ((0, None), (None, 0)):
        cmd = CMDCallback(**CONFIG | dict(warmup=2), optimizer_index=saved)
        fit = trainer(max_epochs=2, callbacks=[cmd])
        fit.fit(Digits(), train_loader())
        fit.save_checkpoint(tmp_path / "one.ckpt")
        again = CMDCallback(**CONFIG | dict(warmup=2), optimizer_index=resumed)
        trainer(max_epochs=3, callbacks=[again]).fit(Digits(), train_loader(), ckpt_path=tmp_path / "one.ckpt")
        assert again.recorder.num_records == 3


def test_torch_optimizer_is_found_inside_a_lightning_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from cmd_online.integrations._common import torch_optimizer

    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert torch_optimizer(LightningOptimizer(sgd)) is sgd
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        torch_optimizer(object())


def test_compiled_submodule_names_lose_orig_mod(tmp_path):
    cmd = CMDCallback(modes=2, samples=100, warmup=2, record_every_n_steps=2, export_path=tmp_path / "cmd.ckpt")
    fit = trainer(max_steps=6, callbacks=[cmd], enable_checkpointing=True, default_root_dir=tmp_path)
    fit.fit(Digits(compile_net=True), train_loader())
    assert cmd.recorder.layout.names[0] == "net._orig_mod.0.weight"  # the recorder sees the compiled names
    plain = Digits()
    assert list(cmd.cmd_state_dict()) == list(plain.state_dict())
    assert list(cmd.trajectory().state_dict()) == [n for n, _ in plain.named_parameters()]
    plain.load_state_dict(cmd.cmd_state_dict(), strict=True)
    # the export is a Lightning checkpoint: the module's own keys, as Lightning's checkpoints of it have
    exported = torch.load(tmp_path / "cmd.ckpt", weights_only=True)["state_dict"]
    saved = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)["state_dict"]
    assert list(exported) == list(saved) == list(Digits(compile_net=True).state_dict())


def test_fit_that_ends_in_the_warm_up_warns_and_writes_no_export(tmp_path):
    cmd = CMDCallback(**CONFIG, export_path=tmp_path / "cmd.ckpt")
    with pytest.warns(RuntimeWarning, match=r"ended during the warm-up \(2 of 4 records\)"):
        trainer(max_epochs=2, callbacks=[cmd]).fit(Digits(), train_loader())
    assert not (tmp_path / "cmd.ckpt").exists()


def test_an_epoch_cut_short_by_max_steps_is_recorded_at_its_end():
    cmd = CMDCallback(**CONFIG)
    trainer(max_steps=24 + 6, callbacks=[cmd]).fit(Digits(), train_loader())  # 24 batches an epoch
    assert cmd.recorder.num_records == 2


def test_an_error_during_validation_on_the_cmd_weights_gives_the_trained_weights_back():
    class FailingValidation(Digits):
        def validation_step(self, batch, batch_idx):
            if self.current_epoch == F:
                self.weights_validated = flat(self)
                raise KeyError("validation failed")
            return super().validation_step(batch, batch_idx)

    class LastTrained(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.weights = flat(pl_module)

    model, last = FailingValidation(), LastTrained()
    with pytest.raises(KeyError, match="validation failed"):
        trainer(max_epochs=EPOCHS, callbacks=[CMDCallback(**CONFIG, swap_for_validation=True), last]).fit(
            model, train_loader(), val_loader())
    assert not torch.equal(model.weights_validated, last.weights)  # validation ran on the CMD weights
    assert torch.equal(flat(model), last.weights)


def test_sharded_strategy_is_refused_naming_it():
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    try:
        with pytest.raises(ValueError, match="ModelParallelStrategy"):
            trainer(max_steps=1, callbacks=[CMDCallback()], strategy=ModelParallelStrategy()).fit(
                Digits(), train_loader())
    finally:
        if dist.is_initialized():  # the strategy set up a 1-process group
            dist.destroy_process_group()


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(warmup=1), ValueError, "warmup"), (dict(record_every_n_steps=0), ValueError, "record_every_n_steps"),
    (dict(swap_for_validation="yes"), TypeError, "swap_for_validation"),
    (dict(export_path=3), TypeError, "export_path"), (dict(modes=3, threshold=0.1), ValueError, "modes or threshold"),
    (dict(optimizer_index=-1), ValueError, "optimizer_index"),
    (dict(log_every=0), ValueError, "log_every"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        CMDCallback(**kwargs)


# ------------------------------------------------------------------------------------------ DDP
def test_ddp_two_processes_give_the_single_process_cmd_model(ddp_run):
    import _lightning_ddp as ddp

    out, ranks = ddp_results(ddp_run)
    cmd = CMDCallback(**ddp.CONFIG)
    # Lightning gives each rank every other example of a DistributedSampler permutation seeded by the epoch;
    # the same permutation in one process, in batches of 2 × BATCH, makes the same global batches
    trainer(max_epochs=ddp.EPOCHS, callbacks=[cmd]).fit(Digits(), train_loader(2 * ddp.BATCH, shuffle=True))
    single = cmd.recorder.trajectory()
    assert [r["world_size"] for r in ranks] == [2, 2]
    for got in ranks:
        assert got["global_step"] == 4 * 24 and got["num_records"] == cmd.recorder.num_records == 24
        assert_same_cmd_model(got, single)


def test_ddp_ranks_hold_identical_recorders_and_rank_0_writes_the_export(ddp_run):
    out, (r0, r1) = ddp_results(ddp_run)
    s0, s1 = leaves(r0["state"]), leaves(r1["state"])
    assert s0["meta.num_records"] == s1["meta.num_records"] > 0
    assert_same(s0, s1)  # references, history, samples, statistics: every entry
    assert (out / "export_rank0.ckpt").exists() and not (out / "export_rank1.ckpt").exists()
    exported = torch.load(out / "export_rank0.ckpt", weights_only=True)["state_dict"]
    for key, value in r0["cmd"].items():
        assert torch.equal(exported[key], value), key
    checkpoint = next((out / "checkpoints").glob("*.ckpt"))
    assert read_meta(torch.load(checkpoint, weights_only=True)["callbacks"]["CMDCallback"]["recorder"])["num_records"] == 24


# ------------------------------------------------------------------------------------------ the other namespace
def test_pytorch_lightning_namespace_records_with_a_pytorch_lightning_trainer():
    ptl = pytest.importorskip("pytorch_lightning")
    from cmd_online.integrations.pytorch_lightning import CMDCallback as PTLCallback

    class Module(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cmd = PTLCallback(modes=2, samples=100, warmup=3)
    ptl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=[cmd]).fit(Module(), train_loader())
    assert isinstance(cmd, ptl.Callback) and cmd.recorder.num_records == 4 and cmd.recorder.phase == "tracking"
