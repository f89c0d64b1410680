"""Worker functions for tests/test_distributed.py: 2-process gloo runs of DDP and FSDP2 training.

Every scenario trains a small classifier on sklearn's digits with the same global batches; the
single-process reference (``train_single``) lives here too so both sides share one definition.
Each rank writes what the tests check to ``out_dir``; a scenario that fails writes its traceback.
"""

from __future__ import annotations

import functools
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import cmd_online as cmdo

STEPS, RESUME_AT, BATCH, RECORD_EVERY = 24, 12, 64, 2
CONFIG = dict(modes=3, samples=200, warmup=4, seed=0)


class Classifier(torch.nn.Module):
    """64 → 25 → 10 with a learnt logit scale: 25 rows split 13/12 and a 1-row tensor split 1/0."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 25)
        self.fc2 = torch.nn.Linear(25, 10)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier()


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def batch(step: int, x: torch.Tensor, y: torch.Tensor, rank: int = 0, world_size: int = 1):
    """Global batch ``step`` (the same for every world size), this rank's equal part of it."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:BATCH]
    part = idx.chunk(world_size)[rank]
    return x[part], y[part]


def train_steps(model, optimizer, steps, rank=0, world_size=1, forward=None):
    x, y = digits()
    forward = forward or model
    for step in steps:
        xb, yb = batch(step, x, y, rank, world_size)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(forward(xb), yb).backward()
        optimizer.step()


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def train_single():
    """The single-process run on the same global batches: model, recorder."""
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    rec = cmdo.CMDRecorder(optimizer, model, record_every=RECORD_EVERY, **CONFIG)
    train_steps(model, optimizer, range(STEPS))
    return model, rec


def summary(rec) -> dict:
    traj = rec.trajectory()
    return {"a": traj.a, "b": traj.b, "modes": traj.modes, "references": traj.references,
            "reference_index": traj.reference_index, "statistics_bytes": rec.nbytes()["statistics"],
            "num_records": rec.num_records}


# ------------------------------------------------------------------------------------------ scenarios
def ddp(rank, world_size, out: Path):
    from torch.nn.parallel import DistributedDataParallel

    from torch.utils.tensorboard import SummaryWriter

    model = make_model()
    wrapped = DistributedDataParallel(model)
    optimizer = make_optimizer(wrapped.parameters())
    writer = SummaryWriter(str(out / f"tb_rank{rank}"))  # every rank passes one; only rank 0 may log
    rec = cmdo.CMDRecorder(optimizer, model, record_every=RECORD_EVERY, writer=writer, **CONFIG)
    offloaded = cmdo.CMDRecorder(optimizer, model, record_every=RECORD_EVERY, offload=True, **CONFIG)
    train_steps(model, optimizer, range(STEPS), rank, world_size, forward=wrapped)
    rec.close()
    writer.close()
    rec.export(out / f"ddp_export_{rank}.pt")  # only rank 0 writes
    torch.save({**summary(rec), "state": rec.state_dict(), "offloaded": offloaded.state_dict()},
               out / f"ddp_rank{rank}.pt")


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model.fc1)
    fully_shard(model)
    return model


def fsdp(rank, world_size, out: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model()
    optimizer = make_optimizer(model.parameters())
    rec = cmdo.CMDRecorder(optimizer, model, record_every=RECORD_EVERY, **CONFIG)
    offloaded = cmdo.CMDRecorder(optimizer, model, record_every=RECORD_EVERY, offload=True, **CONFIG)
    # a plain copy fed the gathered weights at every record: the same trajectory, recorded unsharded
    shadow = make_model()
    shadow_rec = cmdo.CMDRecorder(torch.optim.SGD(shadow.parameters(), lr=0.0), shadow, **CONFIG)

    def train(model, optimizer, rec, steps, shadow_rec=None):
        for step in steps:
            train_steps(model, optimizer, [step], rank, world_size)
            if shadow_rec is not None and (step + 1) % RECORD_EVERY == 0:
                with torch.no_grad():
                    for p, q in zip(model.parameters(), shadow.parameters()):
                        q.copy_(p.full_tensor())
                shadow_rec.record()

    train(model, optimizer, rec, range(RESUME_AT), shadow_rec)
    # sharded checkpoint: model and optimizer through torch.distributed.checkpoint, recorder per rank
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "fsdp_dcp"))
    torch.save(rec.state_dict(), out / f"fsdp_recorder_rank{rank}.pt")
    train(model, optimizer, rec, range(RESUME_AT, STEPS), shadow_rec)

    rec.export(out / "fsdp_export.pt")
    # a recorder of part of the parameters: the export holds the others whole (gathered), as live weights
    partial = cmdo.CMDRecorder(torch.optim.SGD([p for n, p in model.named_parameters() if n != "scale"], lr=0.0),
                               model, modes=2, samples=50, warmup=3)
    blind = cmdo.CMDRecorder(torch.optim.SGD(model.parameters(), lr=0.0), modes=2, samples=50, warmup=3)  # no model=
    x, y = digits()
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y).item()  # noqa: E731
    with torch.no_grad():
        trained_loss = loss()  # an evaluation first: FSDP2 keeps the root's own parameter (scale) unsharded
        with rec.swapped():
            swapped_loss = loss()
        after_loss = loss()  # and again after the block: the trained weights, not a stale CMD copy
    local_cmd = [t.clone() for t in rec.cmd_parameters()]
    offloaded.close()  # the pending records first
    torch.save({**summary(rec), "shadow": summary(shadow_rec), "swapped_loss": swapped_loss,
                "trained_loss": trained_loss, "after_loss": after_loss,
                "local_cmd": local_cmd, "state": rec.state_dict(), "offloaded": offloaded.state_dict(),
                "offloaded_fit": summary(offloaded)}, out / f"fsdp_rank{rank}.pt")
    rec.close()
    for step in range(STEPS, STEPS + 3):
        train_steps(model, optimizer, [step], rank, world_size)
        partial.record()
        blind.record()
    partial.export(out / "fsdp_partial_export.pt")
    try:
        with blind.swapped():
            refused = ""
    except ValueError as e:
        refused = str(e)
    torch.save({"scale": model.scale.full_tensor().detach(), "refused": refused}, out / f"fsdp_partial_rank{rank}.pt")

    # resume: fresh model, optimizer and recorder from the sharded checkpoint, same remaining batches
    model2 = _fsdp_model()
    optimizer2 = make_optimizer(model2.parameters())
    rec2 = cmdo.CMDRecorder(optimizer2, model2, record_every=RECORD_EVERY, **CONFIG)
    model_sd, optim_sd = get_state_dict(model2, optimizer2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(out / "fsdp_dcp"))
    set_state_dict(model2, optimizer2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rec2.load_state_dict(torch.load(out / f"fsdp_recorder_rank{rank}.pt", weights_only=True))
    train(model2, optimizer2, rec2, range(RESUME_AT, STEPS))
    torch.save({**summary(rec2), "state": rec2.state_dict()}, out / f"fsdp_resumed_rank{rank}.pt")

    # another rank's shard must be refused, not silently loaded
    other = torch.load(out / f"fsdp_recorder_rank{1 - rank}.pt", weights_only=True)
    try:
        rec2.load_state_dict(other)
        refused = ""
    except ValueError as e:
        refused = str(e)
    torch.save({"refused": refused}, out / f"fsdp_other_shard_rank{rank}.pt")


def placements(rank, world_size, out: Path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    mesh_2d = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    cases = {
        "shard1": lambda t: distribute_tensor(t, mesh, [Shard(1)]),
        "partial": lambda t: DTensor.from_local(t, mesh, [Partial()]),
        "mesh2d": lambda t: distribute_tensor(t, mesh_2d, [Replicate(), Shard(0)]),
    }
    messages = {}
    for name, make in cases.items():
        module = torch.nn.Linear(6, 4)
        module.weight = torch.nn.Parameter(make(module.weight.detach()))
        module.bias = torch.nn.Parameter(distribute_tensor(module.bias.detach(), mesh, [Shard(0)]))
        try:
            cmdo.CMDRecorder(torch.optim.SGD(module.parameters(), lr=0.1), module, modes=2, samples=8, warmup=2)
            messages[name] = ""
        except ValueError as e:
            messages[name] = str(e)
    torch.save(messages, out / f"placements_rank{rank}.pt")


def replicated(rank, world_size, out: Path):
    """Shard(0) and Replicate() DTensors side by side, moved along known trajectories."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(0)
    slope, offset = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)], [torch.randn(7, 3), torch.randn(5)]
    which = [torch.randint(0, 2, (7, 3), generator=g), torch.randint(0, 2, (5,), generator=g)]
    params = [torch.nn.Parameter(distribute_tensor(torch.zeros(7, 3), mesh, [Shard(0)])),
              torch.nn.Parameter(distribute_tensor(torch.zeros(5), mesh, [Replicate()]))]
    plain = [torch.nn.Parameter(torch.zeros(7, 3)), torch.nn.Parameter(torch.zeros(5))]
    config = dict(modes=2, samples=10, warmup=3, freeze_modes_after=3)  # ends in the compact form
    rec = cmdo.CMDRecorder(torch.optim.SGD(params, lr=0.0), **config)
    oracle = cmdo.CMDRecorder(torch.optim.SGD(plain, lr=0.0), **config)
    skip_warnings = 0
    for t in range(9):
        drive = torch.randn(2, generator=g)  # two latent references, the same on every rank
        values = [s * drive[w] + o + 0.01 * torch.randn(s.shape, generator=g)
                  for s, o, w in zip(slope, offset, which)]
        if t == 5:  # a NaN in rank 1's rows only: both ranks must skip this record
            values[0][-1, 0] = float("nan")
        with torch.no_grad():
            params[0].to_local().copy_(values[0].chunk(world_size)[rank])
            params[1].to_local().copy_(values[1])
            for p, v in zip(plain, values):
                p.copy_(v)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec.record()
            oracle.record()
        skip_warnings += sum("skipped" in str(w.message) for w in caught)
    torch.save({"sharded": {**summary(rec), "skipped": rec.skipped_records, "compact": rec.moments.compact},
                "plain": {**summary(oracle), "skipped": oracle.skipped_records}, "skip_warnings": skip_warnings},
               out / f"replicated_rank{rank}.pt")


SCENARIOS = {"ddp": ddp, "fsdp": fsdp, "placements": placements, "replicated": replicated}


# ------------------------------------------------------------------ third hardening round: ranks that must agree
def _small_fsdp():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _once_on_rank(rank, fail_rank, real, message):
    """``real``, raising MemoryError(message) on ``fail_rank`` the first time it is called."""
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if rank == fail_rank and calls[0] == 1:
            raise MemoryError(message)
        return real(*args, **kwargs)

    return flaky


def agree_warmup(rank, world_size, out: Path):
    """Rank 1's clustering at the end of the warm-up raises once, then its freeze of the modes; the user catches
    each and trains on (issue 22, 5)."""
    import cmd_online.recording as recording_module

    results = {}
    cluster, mode_dtype = recording_module.cluster, recording_module.mode_dtype
    for offload in (False, True):
        recording_module.cluster = _once_on_rank(rank, 1, cluster, "simulated")
        recording_module.mode_dtype = _once_on_rank(rank, 1, mode_dtype, "no room for the modes")
        model = _small_fsdp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        # k ≥ 5: the full form, frozen by the recorder, together on the ranks (k ≤ 4 freezes inside a record)
        rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=20, warmup=3, freeze_modes_after=5, offload=offload)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 6, generator=g)
        loss = lambda: model(x).pow(2).mean()  # noqa: E731
        with torch.no_grad():
            loss_before = loss().item()
        outcomes, caught, freeze_error, compact_at = [], [], "", None
        for t in range(9):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    outcomes.append(rec.record())
                except Exception as e:  # the user catches it and trains on
                    outcomes.append(f"{type(e).__name__}: {e}")
                    if "no room for the modes" in str(e):
                        freeze_error = str(e)
                        outcomes[-1] = True  # the record was taken; only its freeze failed
            caught += [str(m.message) for m in w]
            if compact_at is None and rec.phase == "tracking" and rec.moments.compact:
                compact_at = t
        with torch.no_grad():
            loss_after = loss().item()
        results[offload] = {"outcomes": outcomes, "warnings": caught, "num_records": rec.num_records,
                            "phase": rec.phase, "compact": rec.moments.compact, "compact_at": compact_at,
                            "freeze_error": freeze_error, "fit": summary(rec), "loss_before": loss_before,
                            "loss_after": loss_after}
        rec.close()
    recording_module.cluster, recording_module.mode_dtype = cluster, mode_dtype
    torch.save(results, out / f"agree_warmup_rank{rank}.pt")


def agree_queries(rank, world_size, out: Path):
    """A collective query whose local part fails on rank 1 only, and a state refused on rank 1 only."""
    model = _small_fsdp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = cmdo.CMDRecorder(optimizer, model, modes=2, samples=20, warmup=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)

    def train(records):
        for _ in range(records):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            rec.record()

    train(5)
    state = rec.state_dict()
    saved = {"meta": state["meta"], "stats": state["stats"]}
    results = {}
    fit = rec._recording.flat_fit
    rec._recording.flat_fit = _once_on_rank(rank, 1, fit, "simulated")
    for key in ("trajectory", "again"):
        try:
            rec.trajectory()
            results[key] = "ok"
        except Exception as e:
            results[key] = f"{type(e).__name__}: {e}"
    del rec._recording.flat_fit
    damaged = dict(saved, meta=b"not a state") if rank == 1 else saved
    try:
        rec.load_state_dict(damaged)
        results["load"] = "loaded"
    except ValueError as e:
        results["load"] = f"{type(e).__name__}: {e}"
    train(2)
    results["records_after_load"] = rec.num_records
    torch.save(results, out / f"agree_queries_rank{rank}.pt")


LIFECYCLE = {"agree_warmup": agree_warmup, "agree_queries": agree_queries}


def run(rank: int, world_size: int, init_method: str, out_dir: str, names: list[str]) -> None:
    """Process entry point: every named scenario in turn; a failure is written, not raised."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        for name in names:
            try:
                (SCENARIOS.get(name) or LIFECYCLE[name])(rank, world_size, out)
            except Exception:
                (out / f"{name}_rank{rank}.error").write_text(traceback.format_exc())
            dist.barrier()
    finally:
        dist.destroy_process_group()
