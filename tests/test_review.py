"""Defects found in the review of the merged issues 20, 22, 24 and 25: one tiny test each."""

import warnings

import pytest
import torch

import cmd_online as cmdo
from cmd_online.integrations import _common


def _setup(warmup=3, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, cmdo.CMDRecorder(opt, model, modes=2, samples=10, warmup=warmup, **kwargs)


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(8, 5)).pow(2).mean().backward()
    opt.step()


def test_record_inside_the_warm_up_fallback_of_swapped_is_refused_as_inside_swapped():
    """swapped() during the warm-up keeps the trained weights, but it is still a swapped() block: nothing is
    recorded inside it, so the block's behaviour does not change when the warm-up ends."""
    model, opt, rec = _setup()
    _step(model, opt)
    rec.record()
    with pytest.warns(UserWarning, match="during the warm-up"):
        with rec.swapped():
            with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\)"):
                rec.record()
    assert rec.num_records == 1
    rec.record()  # after the block: taken
    assert rec.num_records == 2


def test_the_swap_primitives_refuse_records_of_the_cmd_weights():
    """store() and copy_to() (the callbacks' swap) write the CMD weights into the parameters as swapped() does: a
    record meanwhile would enter the CMD weights into the statistics as a trajectory point."""
    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    assert rec.ready
    records = rec.num_records
    rec.store()
    rec.copy_to()
    with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\)"):
        rec.record()
    rec.restore()
    assert rec.num_records == records
    rec.record()
    assert rec.num_records == records + 1


def test_the_clustering_a_resumed_recorder_does_again_for_trajectory_is_agreed_between_the_ranks(monkeypatch):
    """trajectory() of a resumed recorder clusters the samples again (sample_modes); under FSDP2 a failure there
    must be agreed before the gathers, or the other ranks go on alone into a collective (hang or abort)."""
    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    state = rec.state_dict()
    model2 = torch.nn.Linear(5, 4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    resumed = cmdo.CMDRecorder(opt2, model2, modes=2, samples=10, warmup=3)
    resumed.load_state_dict(state)
    told = []
    real_agree = resumed._shards.agree
    monkeypatch.setattr(resumed._shards, "agree", lambda error: told.append(error) or real_agree(error))

    def failing(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr("cmd_online.recording.cluster", failing)
    with pytest.raises(MemoryError):
        resumed.trajectory()
    assert any(isinstance(e, MemoryError) for e in told)  # the ranks learnt of it before any gather


def test_an_ignored_record_leaves_the_offloaded_records_steps_in_place():
    """The callbacks' recorder stamps each record with the trainer's step; with offload the observers are told
    later, by position among the stamps: a record() that was ignored (right after an automatic one) must not
    take a stamp, or every later record is logged at the step before its own."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    now, seen = [0], []

    class Steps:
        def on_record(self, rec, index):
            seen.append(rec.step_of(index))

    rec = _common.StampedRecorder(opt, model, modes=2, samples=10, warmup=3, offload=True, record_every=1,
                                  clock=lambda: now[0], callbacks=[Steps()])
    rec.start_stamps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(6):
            now[0] = 10 * k
            _step(model, opt)
            if k == 2:
                assert rec.record() is False  # right after the automatic record: ignored
        rec.close()
    assert seen == [0, 10, 20, 30, 40, 50]


def test_swapped_falls_back_before_the_first_automatic_record():
    """With record_every, an evaluation in swapped() before the k-th step (no record yet, as expected) must fall
    back to the trained weights, not raise that record() was forgotten."""
    model, opt, rec = _setup(record_every=4)
    _step(model, opt)
    with pytest.warns(UserWarning, match="during the warm-up"):
        with rec.swapped():
            pass


def test_the_export_at_the_end_of_training_warns_when_the_parameters_were_replaced(tmp_path):
    """The callbacks' export at the end of training must not fail the finished training: the refusal of
    parameters replaced after the recorder was built (a ValueError) becomes a warning, as a failed write does."""
    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    target = tmp_path / "cmd_model.pt"
    with pytest.warns(RuntimeWarning, match="could not write the CMD model.*no longer the tensors recorded"):
        _common.export_at_end(rec, str(target), True,
                              lambda: torch.save(_common.export_state_dict(rec), target))
    assert not target.exists()


def test_the_trajectory_of_a_stored_recorder_state_keeps_its_metrics_and_samples():
    """inspect/export/report of a Lightning checkpoint or Trainer folder read the recorder state through
    saved.trajectory_of_state: the metrics kept in the state and the clustered samples must reach the report."""
    from cmd_online import saved

    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
        rec.add_metrics({"acc/trained": 0.5})
    traj = saved.trajectory_of_state(rec.state_dict())
    assert traj.metrics is not None and torch.equal(traj.metrics["acc/trained"], rec.trajectory().metrics["acc/trained"])
    assert traj.sample_index is not None and torch.equal(traj.sample_modes, rec.trajectory().sample_modes)


def test_export_refuses_to_overwrite_the_file_or_folder_it_reads(tmp_path, capsys):
    """`cmd-online export` now reads Lightning checkpoints and Trainer checkpoint folders: -o naming the source
    (or a folder holding it) replaced the training checkpoint, CMD state included, by the CMD model."""
    from cmd_online.cli import main

    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    folder = tmp_path / "run"
    folder.mkdir()
    source = folder / "traj.pt"
    rec.trajectory().save(source)
    before = source.read_bytes()
    assert main(["export", str(source), "-o", str(source)]) != 0
    assert main(["export", str(source), "-o", str(folder)]) != 0
    assert "would replace" in capsys.readouterr().err
    assert source.read_bytes() == before
    assert main(["export", str(source), "-o", str(tmp_path / "cmd.pt")]) == 0


def test_a_model_folder_is_never_written_over_a_training_runs_folder(tmp_path):
    """replace_folder (the HF callback's export, cmd-online export to a folder) replaces its target whole: an
    export_dir or -o naming the run's output folder deleted every checkpoint in it, CMD states included."""
    from cmd_online.files import replace_folder

    run = tmp_path / "out"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "cmd_recorder.pt").write_bytes(b"state")
    with pytest.raises(ValueError, match="checkpoint-5"):
        replace_folder(run, lambda folder: None)
    with pytest.raises(ValueError, match="cmd_recorder.pt"):
        replace_folder(run / "checkpoint-5", lambda folder: None)
    assert (run / "checkpoint-5" / "cmd_recorder.pt").read_bytes() == b"state"
    model = tmp_path / "cmd_model"
    for _ in range(2):  # an earlier export is replaced
        replace_folder(model, lambda folder: open(f"{folder}/config.json", "w").close())
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_decompose_refuses_to_write_over_a_checkpoint_it_reads(tmp_path, capsys):
    from cmd_online.cli import main

    paths = []
    for t in range(3):
        paths.append(tmp_path / f"epoch_{t}.pt")
        torch.save({"w": torch.randn(30) + t}, paths[-1])
    before = paths[0].read_bytes()
    assert main(["decompose", *map(str, paths), "--modes", "1", "--samples", "10", "-o", str(paths[0])]) != 0
    assert "would replace the checkpoint" in capsys.readouterr().err
    assert paths[0].read_bytes() == before


def test_trajectory_of_a_state_clustered_otherwise_leaves_its_samples_out(monkeypatch):
    """trajectory() of a resumed recorder clusters the kept samples again for sample_modes; where that clustering
    is not the state's (a state of an earlier cmd_online, whose cut differed), the labels do not belong to the
    state's modes: trajectory() raised (sample_modes out of range) or would mislabel them. The samples are left
    out instead."""
    import cmd_online.recording as recording_module

    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    resumed = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.1), model, modes=2, samples=10, warmup=3)
    resumed.load_state_dict(rec.state_dict())
    real = recording_module.cluster
    monkeypatch.setattr(recording_module, "cluster", lambda history, modes, *a: real(history, 3, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = resumed.trajectory()
    assert traj.sample_modes is None and traj.num_modes == rec.num_modes
    assert torch.equal(traj.a, rec.trajectory().a)
