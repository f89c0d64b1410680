"""cmd_online.integrations.transformers.CMDCallback with real Hugging Face Trainers on CPU.

The model is a 1-layer character-level GPT-2 built from a config (no download), trained on the text of
two Python standard-library modules. One run (gradient accumulation 2, a record every 2 optimizer
steps, checkpoints every 8 steps) serves the tests of what it records and writes; the others run their
own short trainings. The DDP run (``torchrun --nproc_per_node 2``, gloo) starts in the background at the
module's first test.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from _background import rank_results, run_in_background
from _states import assert_same, leaves
from cmd_online.checkpoint import read_meta
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, default_data_collator  # noqa: E402

import cmd_online as cmdo  # noqa: E402
from _cmd_checks import assert_same_cmd, assert_same_cmd_model, assert_same_trajectory  # noqa: E402
from _hf_setup import Chars, Snapshots, arguments, make_model, make_tokenizer, matrix  # noqa: E402
from cmd_online.integrations.transformers import CMDCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = dict(modes=3, samples=300, warmup=4, seed=0)
# the full form: its free modes are what decompose() computes post hoc
FULL = dict(freeze_modes_after=None)
STEPS, EVERY = 24, 2  # optimizer steps; a record every EVERY of them


def oracle(W: torch.Tensor, rec, **config) -> cmdo.CMDTrajectory:
    config = CONFIG | config
    return cmdo.decompose(W, modes=config["modes"], samples=config["samples"], seed=config["seed"],
                          warmup=config["warmup"], layout=rec.layout)


# ------------------------------------------------------------------------------------------ DDP run
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Start tests/_hf_ddp.py under torchrun (2 processes) now; the DDP tests wait for it."""
    out = tmp_path_factory.mktemp("hf_ddp")
    yield from run_in_background(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                  str(HERE / "_hf_ddp.py"), str(out)], out,
                                 TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def _start_ddp_early(ddp_run):
    """The DDP processes spend most of their time importing: let them overlap with the other tests."""


def ddp_results(ddp_run) -> tuple[Path, list[dict]]:
    return rank_results(ddp_run, "torchrun")


def replay(snapshots: list[dict[str, torch.Tensor]], names, **config) -> cmdo.CMDTrajectory:
    """The trajectory of a plain CMDRecorder (CONFIG, the default form) that records ``snapshots`` in turn."""
    params = dict(make_model().named_parameters())
    rec = cmdo.CMDRecorder(torch.optim.SGD([params[n] for n in names], lr=0.0), **CONFIG | config)
    for snapshot in snapshots:
        with torch.no_grad():
            for n in names:
                params[n].copy_(snapshot[n])
        rec.record()
    return rec.trajectory()


# ------------------------------------------------------------------------------------------ the main run
class Micro(TrainerCallback):
    """Counts micro-batches (substeps and steps) and keeps the optimizer the Trainer hands to callbacks."""

    def __init__(self):
        self.micro_batches = 0
        self.optimizer = None

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.micro_batches += 1
        self.optimizer = optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_run")
    cmd = CMDCallback(**CONFIG, record_every_n_steps=EVERY, evaluate_cmd=True, log_every=2)
    snapshots, micro = Snapshots(), Micro()
    trainer = Trainer(model=make_model(), train_dataset=Chars(256), eval_dataset=Chars(64, start=256),
                      processing_class=make_tokenizer(), data_collator=default_data_collator,  # batches as without
                      callbacks=[cmd, snapshots, micro],
                      args=arguments(out, gradient_accumulation_steps=2, max_steps=STEPS, save_strategy="steps",
                                     save_steps=8, eval_strategy="steps", eval_steps=8, report_to=["tensorboard"]))
    trainer.train()
    return dict(out=out, cmd=cmd, snapshots=snapshots, micro=micro, trainer=trainer)


def test_records_every_k_optimizer_steps_are_those_of_the_step_weights(run):
    rec, snapshots = run["cmd"].recorder, run["snapshots"]
    assert run["micro"].micro_batches == 2 * STEPS and len(snapshots.steps) == STEPS
    assert rec.num_records == STEPS // EVERY  # per optimizer step, not per micro-batch
    W = matrix(snapshots.steps[EVERY - 1::EVERY], rec.layout.names)
    want = oracle(W, rec)  # the default recorder: its records, references and history are decompose's
    traj = rec.trajectory()
    assert torch.equal(traj.reference_index, want.reference_index)
    assert torch.equal(traj.references.double(), want.references.double().float().double())
    plain = replay(snapshots.steps[EVERY - 1::EVERY], rec.layout.names)  # a CMDRecorder fed the same weights
    assert torch.equal(traj.modes, plain.modes) and torch.equal(traj.a, plain.a) and torch.equal(traj.b, plain.b)


def test_the_callback_unwraps_accelerates_optimizer_which_has_no_step_hooks(run):
    from cmd_online.integrations._common import torch_optimizer

    wrapped = run["micro"].optimizer
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    with pytest.raises(AttributeError):
        wrapped.register_step_post_hook(lambda *a: None)
    assert run["cmd"].recorder.params[0] is wrapped.optimizer.param_groups[0]["params"][0]
    assert torch_optimizer(wrapped) is wrapped.optimizer


def test_every_checkpoint_folder_holds_the_recorder_state(run):
    for step in (8, 16, 24):
        folder = run["out"] / f"checkpoint-{step}"
        state = torch.load(folder / "cmd_recorder.pt", weights_only=True)
        assert state["global_step"] == step and read_meta(state["recorder"])["steps"] == step
        assert read_meta(state["recorder"])["num_records"] == step // EVERY
        # docs/integrations.md: the default's file, about 3.3 model copies, a little more for so small a model
        ratio = (folder / "cmd_recorder.pt").stat().st_size / (folder / "model.safetensors").stat().st_size
        assert 3.25 < ratio < 3.7, ratio


def test_cmd_model_folder_loads_with_from_pretrained_and_reproduces_cmd_state_dict(run):
    loaded = GPT2LMHeadModel.from_pretrained(run["out"] / "cmd_model").state_dict()
    want = run["cmd"].cmd_state_dict()
    assert loaded.keys() == want.keys()
    for key in want:
        assert torch.equal(loaded[key], want[key]), key
    names = run["cmd"].recorder.layout.names
    flat = torch.cat([loaded[n].reshape(-1) for n in names])
    assert_same_cmd(flat, run["cmd"].recorder.trajectory().reconstruct(-1))


def test_cmd_model_folder_is_as_complete_as_save_model_writes_and_loads_in_a_pipeline(run, tmp_path):
    from transformers import AutoTokenizer, pipeline

    run["trainer"].save_model(tmp_path / "trained")
    written = {p.name for p in (tmp_path / "trained").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_args.bin"} <= written
    assert {p.name for p in (run["out"] / "cmd_model").iterdir()} == written
    tokenizer = AutoTokenizer.from_pretrained(run["out"] / "cmd_model")
    assert tokenizer("def f(x):")["input_ids"] == make_tokenizer()("def f(x):")["input_ids"]
    generate = pipeline("text-generation", model=str(run["out"] / "cmd_model"), device="cpu")
    text = generate("def f(x):", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("def f(x):")


def test_mode_statistics_and_cmd_metrics_reach_report_to_at_the_global_step(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next((run["out"] / "runs").iterdir())  # the Trainer's TensorBoardCallback (report_to="tensorboard")
    events = EventAccumulator(str(folder))
    events.Reload()
    record_steps = list(range(EVERY * CONFIG["warmup"], STEPS + 1, EVERY))  # from the warm-up's end
    assert [e.step for e in events.Scalars("train/cmd/reference/mode_00")] == record_steps
    references = run["cmd"].recorder.trajectory().references
    assert [e.value for e in events.Scalars("train/cmd/reference/mode_00")] == pytest.approx(
        references[0, CONFIG["warmup"] - 1:].tolist())
    assert [e.step for e in events.Scalars("train/cmd/fit/mean_r2")] == record_steps[2::2]
    # evaluate_cmd: eval_cmd_* beside eval_* (eval/cmd_loss beside eval/loss), at every evaluation
    assert [e.step for e in events.Scalars("eval/cmd_loss")] == [e.step for e in events.Scalars("eval/loss")] \
        == [8, 16, 24]
    history = [h for h in run["trainer"].state.log_history if "eval_cmd_loss" in h]
    assert [h["step"] for h in history] == [8, 16, 24]
    loss = {h["step"]: h["eval_loss"] for h in run["trainer"].state.log_history if "eval_loss" in h}
    assert history[0]["eval_cmd_loss"] == pytest.approx(loss[8], rel=1e-5)  # the first record of the window
    assert abs(history[-1]["eval_cmd_loss"] - loss[24]) > 1e-3
    with run["cmd"].swapped():
        assert run["trainer"].evaluate(metric_key_prefix="x")["x_loss"] == pytest.approx(history[-1]["eval_cmd_loss"])


def test_export_replaces_the_cmd_model_folder_and_leaves_no_temporary_folder(run):
    cmd, folder = run["cmd"], run["out"] / "cmd_model"
    cmd.export(folder, at=0)
    loaded = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    for key, value in cmd.cmd_state_dict(at=0).items():
        assert torch.equal(loaded[key], value), key
    assert not [p.name for p in run["out"].iterdir() if p.name.startswith(".")]
    cmd.export(folder)  # the last record again, for the other tests


def test_evaluate_inside_swapped_evaluates_the_cmd_model_and_gives_the_weights_back(run):
    trainer, cmd = run["trainer"], run["cmd"]
    trained = trainer.evaluate()["eval_loss"]
    with cmd.swapped():
        cmd_loss = trainer.evaluate(metric_key_prefix="cmd_eval")["cmd_eval_loss"]
    assert trainer.evaluate()["eval_loss"] == trained
    exported = Trainer(model=GPT2LMHeadModel.from_pretrained(run["out"] / "cmd_model"),
                       args=arguments(run["out"] / "exported"), eval_dataset=Chars(64, start=256))
    assert cmd_loss == pytest.approx(exported.evaluate()["eval_loss"], rel=1e-6)
    assert abs(cmd_loss - trained) > 1e-3


def test_the_command_line_reads_a_trainer_output_folder_and_the_cmd_state_of_a_checkpoint(run, tmp_path, capsys):
    from cmd_online.cli import main

    out = run["out"]
    # the Trainer's output folder stands for its checkpoint-N folders, in step order (8 before 16 and 24)
    assert main(["decompose", str(out), "-o", str(tmp_path / "t.pt"), "--modes", "3", "--samples", "300"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "records: 3 checkpoints, in this order: checkpoint-8, checkpoint-16, checkpoint-24" in said
    traj = cmdo.CMDTrajectory.load(tmp_path / "t.pt")
    W = matrix(run["snapshots"].steps[7::8], traj.layout.names)  # model.safetensors: the parameters, by name
    oracle = cmdo.decompose(W, modes=3, samples=300, layout=traj.layout)
    for at in range(3):
        assert_same_cmd(traj.reconstruct(at), oracle.reconstruct(at))
    # inspect and export read the cmd_recorder.pt of a checkpoint folder; the export is a model folder
    assert main(["inspect", str(out / "checkpoint-24")]) == 0
    assert f"records      {STEPS // EVERY} " in capsys.readouterr().out
    assert main(["export", str(out / "checkpoint-24"), "-o", str(tmp_path / "cmd")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert not {"optimizer.pt", "trainer_state.json", "cmd_recorder.pt"} & {p.name for p in (tmp_path / "cmd").iterdir()}
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "cmd").state_dict()
    for key, value in run["cmd"].cmd_state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6)
    assert torch.equal(loaded["lm_head.weight"], loaded["transformer.wte.weight"])  # still tied


class StopAt(TrainerCallback):
    """Stops training after the step ``step`` (its checkpoint is written first): an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(folder, cmd, resume=None, stop=None, **kwargs) -> Trainer:
    """The main run's training in ``folder``."""
    trainer = Trainer(model=make_model(), train_dataset=Chars(256), callbacks=[cmd] + ([StopAt(stop)] if stop else []),
                      args=arguments(folder, gradient_accumulation_steps=2, max_steps=STEPS, save_strategy="steps",
                                     save_steps=8, **kwargs))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_train_resumed_from_a_checkpoint_continues_the_same_recording(run, tmp_path):
    train(tmp_path, CMDCallback(**CONFIG, record_every_n_steps=EVERY), stop=8)
    assert not (tmp_path / "checkpoint-16").exists()
    cmd = CMDCallback(**CONFIG, record_every_n_steps=EVERY)
    train(tmp_path, cmd, resume=True)
    assert cmd.recorder.num_records == STEPS // EVERY
    resumed, uninterrupted = cmd.recorder.trajectory(), run["cmd"].recorder.trajectory()
    for key in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(resumed, key), getattr(uninterrupted, key)), key
    saved = torch.load(tmp_path / "checkpoint-24" / "cmd_recorder.pt", weights_only=True)
    assert read_meta(saved["recorder"])["steps"] == STEPS


def test_resume_from_a_checkpoint_without_cmd_state_is_refused_unless_resume_false(run, tmp_path):
    shutil.copytree(run["out"] / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / "cmd_recorder.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"global step 8.*checkpoint-8/cmd_recorder\.pt.*resume=False"):
        train(tmp_path, CMDCallback(**CONFIG, record_every_n_steps=EVERY), resume=True)
    cmd = CMDCallback(**CONFIG, record_every_n_steps=EVERY, resume=False)
    train(tmp_path, cmd, resume=str(tmp_path / "checkpoint-8"))
    assert cmd.recorder.num_records == (STEPS - 8) // EVERY  # a new recording of the steps after 8


def test_a_checkpoint_outside_output_dir_is_found_through_training_arguments(run, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "checkpoint-8"
    shutil.copytree(run["out"] / "checkpoint-8", elsewhere)
    cmd = CMDCallback(**CONFIG, record_every_n_steps=EVERY)
    train(tmp_path / "out", cmd, resume=str(elsewhere), resume_from_checkpoint=str(elsewhere))
    assert torch.equal(cmd.recorder.trajectory().references, run["cmd"].recorder.trajectory().references)


def test_a_state_of_the_same_step_from_another_run_is_refused_not_loaded(tmp_path):
    config = CONFIG | dict(warmup=2)

    def epochs(folder, cmd, resume=None, data=Chars(64), **kwargs):  # 8 steps an epoch, a checkpoint after each
        Trainer(model=make_model(), train_dataset=data, callbacks=[cmd],
                args=arguments(folder, num_train_epochs=3, save_strategy="epoch", **kwargs)).train(
            resume_from_checkpoint=resume)

    run_a, run_b = CMDCallback(**config), CMDCallback(**config)
    epochs(tmp_path / "a", run_a)
    epochs(tmp_path / "b", run_b, data=Chars(64, start=500), learning_rate=1e-3)  # the same step numbers
    a16 = str(tmp_path / "a" / "checkpoint-16")
    with pytest.raises(ValueError, match=r"global step 16.*b/checkpoint-16/cmd_recorder\.pt was saved with other "
                                         r"weights.*resume_from_checkpoint="):
        epochs(tmp_path / "b", CMDCallback(**config), resume=a16)  # run A's weights; output_dir holds run B's
    cmd = CMDCallback(**config)
    epochs(tmp_path / "b", cmd, resume=a16, resume_from_checkpoint=a16)
    assert torch.equal(cmd.recorder.trajectory().references, run_a.recorder.trajectory().references)


# ------------------------------------------------------------------------------------------ other runs
def test_per_epoch_records_equal_decompose_of_the_epoch_end_weights_and_log_to_the_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    cmd, snapshots = CMDCallback(**CONFIG | dict(warmup=3) | FULL, writer=writer, log_every=2), Snapshots()
    Trainer(model=make_model(), train_dataset=Chars(64), callbacks=[cmd, snapshots],
            args=arguments(tmp_path, num_train_epochs=6)).train()
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("cmd/reference/mode_00")) == 6 - 3 + 1  # every record from the warm-up's end
    rec = cmd.recorder
    assert rec.num_records == 6 == len(snapshots.epochs)
    want = oracle(matrix(snapshots.epochs, rec.layout.names), rec, warmup=3)
    assert_same_trajectory(rec.trajectory(), want)


def per_epoch(folder, cmd, resume=None, **kwargs) -> Trainer:
    """Per-epoch recording: 64 examples in batches of 8, so 8 optimizer steps an epoch."""
    trainer = Trainer(model=make_model(), train_dataset=Chars(64), callbacks=[cmd],
                      args=arguments(folder, **{"num_train_epochs": 4} | kwargs))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def same_recording(got, want) -> None:
    assert got.num_records == want.num_records
    got, want = got.trajectory(), want.trajectory()
    for key in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key


def test_resume_from_a_checkpoint_at_an_epochs_last_step_keeps_that_epochs_record(tmp_path):
    # save_steps = the steps of an epoch: the Trainer saves checkpoint-16 before its on_epoch_end, and a
    # run resumed from it starts the next epoch
    config = CONFIG | dict(warmup=3)
    uninterrupted = CMDCallback(**config)
    per_epoch(tmp_path / "full", uninterrupted, save_strategy="steps", save_steps=8)
    assert uninterrupted.recorder.num_records == 4
    for step in (16, 24):
        saved = torch.load(tmp_path / "full" / f"checkpoint-{step}" / "cmd_recorder.pt", weights_only=True)
        assert saved["recorded_epoch"] == step // 8 - 1 and read_meta(saved["recorder"])["num_records"] == step // 8
        cmd, folder = CMDCallback(**config), str(tmp_path / "full" / f"checkpoint-{step}")
        per_epoch(tmp_path / f"resumed{step}", cmd, resume=folder, resume_from_checkpoint=folder)
        same_recording(cmd.recorder, uninterrupted.recorder)
    # a checkpoint of an earlier version, which recorded only at on_epoch_end, after the save: the epoch's
    # record is missing there, and the resumed run takes it from the weights it loads, the epoch's end
    older = type("Older", (CMDCallback,), {"on_step_end": lambda self, *args, **kwargs: None})(**config)
    per_epoch(tmp_path / "older", older, save_strategy="steps", save_steps=8)
    folder = str(tmp_path / "older" / "checkpoint-16")
    assert torch.load(Path(folder) / "cmd_recorder.pt", weights_only=True)["recorded_epoch"] == 0
    cmd = CMDCallback(**config)
    per_epoch(tmp_path / "resumed_older", cmd, resume=folder, resume_from_checkpoint=folder)
    same_recording(cmd.recorder, uninterrupted.recorder)


def test_an_epoch_cut_short_by_max_steps_keeps_its_record_when_training_is_extended(tmp_path):
    # documented in docs/integrations.md: the record of the cut epoch (step 20, in epoch 2 of 8 steps) stays;
    # the extended run does not record epoch 2 again at its end (step 24)
    config = CONFIG | dict(warmup=3)
    short, extended, straight = CMDCallback(**config), CMDCallback(**config), CMDCallback(**config)
    per_epoch(tmp_path / "run", short, max_steps=20, save_strategy="epoch")
    saved = torch.load(tmp_path / "run" / "checkpoint-20" / "cmd_recorder.pt", weights_only=True)
    assert short.recorder.num_records == 3 and saved["recorded_epoch"] == 2
    per_epoch(tmp_path / "run", extended, resume=True, max_steps=40)
    per_epoch(tmp_path / "straight", straight, max_steps=40)
    assert extended.recorder.num_records == straight.recorder.num_records == 5  # epochs 0, 1, 2 (cut), 3, 4
    got, cut, want = (c.recorder.trajectory().references for c in (extended, short, straight))
    assert torch.equal(got[:, :3], cut)  # the record of step 20 is kept and counted as epoch 2's
    assert not torch.equal(got, want)  # so the CMD model differs from the straight run's


def test_a_second_train_continues_the_recording_of_the_first(tmp_path):
    config = CONFIG | dict(warmup=2)
    straight, cmd = CMDCallback(**config), CMDCallback(**config)
    per_epoch(tmp_path / "straight", straight)
    trainer = per_epoch(tmp_path / "twice", cmd, num_train_epochs=2)
    first = cmd.recorder.trajectory().references.clone()
    trainer.train()  # the Trainer counts epochs and steps from 0 again; the recording goes on
    assert cmd.recorder.num_records == straight.recorder.num_records == 4
    assert read_meta(cmd.recorder.state_dict())["steps"] == 4 * 8
    references = cmd.recorder.trajectory().references
    assert torch.equal(references[:, :2], first)
    assert torch.equal(references[:, :2], straight.recorder.trajectory().references[:, :2])


OVERFLOW = (1, 4, 5, 10)  # the optimizer steps (0-based) whose gradients are made non-finite


class ScaledTrainer(Trainer):
    """The Trainer with the GradScaler accelerate makes for fp16 on a GPU (accelerate makes none on a CPU).

    The scaler is given to the Accelerator as soon as the Trainer creates it, before anything is prepared, so
    the optimizer is prepared with it (``AcceleratedOptimizer(scaler=...)``) and ``accelerator.backward`` scales
    the loss with it, as on a GPU; this route works alike with accelerate 1.15 and 1.16. The loss of the
    optimizer steps in OVERFLOW is made infinite: their gradients are non-finite, as in an fp16 overflow,
    and the scaler skips exactly those steps."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * math.inf if self.state.global_step in OVERFLOW else loss


def test_steps_the_grad_scaler_skips_are_not_counted_with_the_default_fused_adamw(tmp_path):
    cmd = CMDCallback(modes=3, samples=200, warmup=2, record_every_n_steps=3, export_dir=None)
    trainer = ScaledTrainer(model=make_model(), train_dataset=Chars(256), callbacks=[cmd],
                            args=arguments(tmp_path, gradient_accumulation_steps=2, max_steps=STEPS, max_grad_norm=0))
    calls = []  # every call of the torch optimizer's step(), and whether the scaler had found inf/NaN
    trainer.create_optimizer()
    torch_adamw = trainer.optimizer
    torch_adamw.register_step_post_hook(lambda opt, *a: calls.append(bool(getattr(opt, "found_inf", 0))))
    trainer.train()
    scaler = trainer.accelerator.scaler
    assert trainer.optimizer.scaler is scaler and trainer.optimizer.optimizer is torch_adamw
    assert torch_adamw.defaults["fused"]  # GradScaler calls its step() even for a step it skips, with found_inf set
    assert len(calls) == STEPS and sum(calls) == len(OVERFLOW) == round(math.log2(2.0 ** 10 / scaler.get_scale()))
    assert trainer.state.global_step == STEPS  # the Trainer counts the skipped steps; the callback does not
    assert read_meta(cmd.recorder.state_dict())["steps"] == STEPS - len(OVERFLOW)
    assert cmd.recorder.num_records == (STEPS - len(OVERFLOW)) // 3
    assert all(p.isfinite().all() for p in trainer.model.parameters())  # the skipped steps changed nothing


def test_evaluate_cmd_metrics_exist_from_the_warm_up_on_and_can_pick_the_best_model(tmp_path):
    cmd = CMDCallback(**CONFIG, record_every_n_steps=2, evaluate_cmd=True, export_dir=None)
    trainer = Trainer(model=make_model(), train_dataset=Chars(128), eval_dataset=Chars(32, start=256), callbacks=[cmd],
                      args=arguments(tmp_path, max_steps=16, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                                     save_steps=4, metric_for_best_model="cmd_loss", load_best_model_at_end=True))
    trainer.train()  # the first evaluation (step 4, record 2 of the warm-up of 4) has eval_cmd_loss too
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    cmd_history = [h for h in trainer.state.log_history if "eval_cmd_loss" in h]
    assert [h["step"] for h in history] == [h["step"] for h in cmd_history] == [4, 8, 12, 16]
    assert cmd_history[0]["eval_cmd_loss"] == history[0]["eval_loss"]  # no CMD model yet: the trained weights'
    assert abs(cmd_history[-1]["eval_cmd_loss"] - history[-1]["eval_loss"]) > 1e-4
    assert trainer.state.best_metric == min(h["eval_cmd_loss"] for h in cmd_history)
    assert trainer.evaluate()["eval_cmd_loss"]  # evaluate() returns them


OPTIONS = [dict(modes=None, threshold=0.5, max_modes=2), dict(distance="euclidean"), dict(kernel="flat"),
           dict(offload=True), dict(modes=None, threshold=0.5, max_modes=2, offload=True, distance="euclidean")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_every_recorder_option_works_through_the_callback(tmp_path, options):
    config = CONFIG | dict(warmup=3) | FULL | options
    cmd, snapshots = CMDCallback(**config, record_every_n_steps=2, export_dir=None, log_every=1), Snapshots()
    trainer = Trainer(model=make_model(), train_dataset=Chars(128), callbacks=[cmd, snapshots],
                      args=arguments(tmp_path, max_steps=12, report_to=["tensorboard"]))
    trainer.train()
    rec = cmd.recorder
    assert rec.num_records == 6 and rec.offload == options.get("offload", False)
    W = matrix(snapshots.steps[1::2], rec.layout.names)
    oracle = cmdo.decompose(W, **{k: v for k, v in config.items() if k not in ("offload", "kernel", *FULL)}, layout=rec.layout)
    traj = rec.trajectory()
    assert traj.num_modes <= options.get("max_modes", 3)
    assert_same_trajectory(traj, oracle)
    logged = [h["step"] for h in trainer.state.log_history if "cmd/reference/mode_00" in h]
    assert logged == [6, 8, 10, 12]  # at the records' global steps, offload too


def test_recorder_arguments_are_checked_when_the_callback_is_created():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'mode'.*modes, threshold"):
        CMDCallback(mode=3)
    with pytest.raises(TypeError, match="record_every_n_steps"):
        CMDCallback(record_every=3)
    with pytest.raises(ValueError, match="offload=True"):
        CMDCallback(kernel="flat", offload=True)


def test_training_that_ends_in_the_warm_up_warns_and_writes_no_cmd_model(tmp_path):
    cmd = CMDCallback(**CONFIG, record_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match=r"ended during the warm-up \(2 of 4 records\)"):
        Trainer(model=make_model(), train_dataset=Chars(64), callbacks=[cmd],
                args=arguments(tmp_path, max_steps=2)).train()
    assert not (tmp_path / "cmd_model").exists()


class Plain(torch.nn.Module):
    """Not a PreTrainedModel: an embedding and a linear layer that predict the next character."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        from _hf_setup import corpus

        vocab = len(corpus()[1])
        self.embed, self.out = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

    def forward(self, input_ids, labels=None, **kwargs):  # the Trainer may pass num_items_in_batch
        logits = self.out(self.embed(input_ids))
        predicted, following = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(predicted, following)
        return {"loss": loss, "logits": logits}


def test_compiled_plain_model_is_exported_as_a_safetensors_state_dict_with_its_own_names(tmp_path):
    from safetensors.torch import load_file

    plain = Plain()
    cmd = CMDCallback(modes=2, samples=100, warmup=2, record_every_n_steps=2)
    Trainer(model=torch.compile(plain, backend="eager"), train_dataset=Chars(64), callbacks=[cmd],
            args=arguments(tmp_path, max_steps=8, remove_unused_columns=False)).train()  # forward(*args, **kwargs)
    assert sorted(os.listdir(tmp_path / "cmd_model")) == ["model.safetensors", "training_args.bin"]  # as save_model
    exported = load_file(tmp_path / "cmd_model" / "model.safetensors")
    assert exported.keys() == Plain().state_dict().keys() == cmd.trajectory().state_dict().keys()
    for key, value in cmd.cmd_state_dict().items():
        assert torch.equal(exported[key], value), key
    fresh = Plain()
    fresh.load_state_dict(exported, strict=True)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(samples=0), ValueError, "samples"), (dict(record_every_n_steps=1.5), TypeError, "record_every_n_steps"),
    (dict(export_dir=""), TypeError, "export_dir"), (dict(resume=1), TypeError, "resume"),
    (dict(threshold=2.0), ValueError, "threshold"), (dict(modes=50, samples=10), ValueError, "modes"),
    (dict(writer=3), TypeError, "writer"), (dict(writer="runs/x"), TypeError, "writer"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        CMDCallback(**kwargs)


# ------------------------------------------------------------------------------------------ DDP
def test_ddp_under_torchrun_gives_the_single_process_cmd_model(ddp_run, tmp_path):
    import _hf_ddp as ddp

    out, ranks = ddp_results(ddp_run)
    cmd = CMDCallback(**ddp.CONFIG, export_dir=None)
    Trainer(model=make_model(), train_dataset=Chars(ddp.EXAMPLES), callbacks=[cmd],
            args=arguments(tmp_path, per_device_train_batch_size=2 * ddp.BATCH, max_steps=ddp.STEPS,
                           train_sampling_strategy="sequential")).train()
    single = cmd.recorder.trajectory()
    for got in ranks:
        assert got["world_size"] == 2 and got["global_step"] == ddp.STEPS
        assert got["num_records"] == cmd.recorder.num_records == ddp.STEPS // ddp.CONFIG["record_every_n_steps"]
        assert_same_cmd_model(got, single)


def test_ddp_ranks_hold_identical_recorders_and_rank_0_writes_the_files(ddp_run):
    out, (r0, r1) = ddp_results(ddp_run)
    s0, s1 = leaves(r0["state"]), leaves(r1["state"])
    assert s0["meta.num_records"] > 0
    assert_same(s0, s1)  # references, history, samples, statistics: every entry
    run = out / "run"
    assert (run / "cmd_model_rank0").is_dir() and not (run / "cmd_model_rank1").exists()
    loaded = GPT2LMHeadModel.from_pretrained(run / "cmd_model_rank0").state_dict()
    for key, value in r0["cmd"].items():
        assert torch.equal(loaded[key], value), key
    assert read_meta(torch.load(run / "checkpoint-8" / "cmd_recorder.pt", weights_only=True)["recorder"])["num_records"] == 8 // 3


def test_fsdp_trainer_is_refused_naming_it(ddp_run):
    _, ranks = ddp_results(ddp_run)
    for got in ranks:  # FSDP needs a distributed run to get as far as the callbacks
        assert got["fsdp"].startswith("ValueError: CMDCallback does not support the Hugging Face Trainer with FSDP")
