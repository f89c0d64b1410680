"""Processes of tests/test_dcp.py: record a planted trajectory, checkpoint with torch.distributed.checkpoint
on one number of ranks, resume a freshly built recorder on another, record on, and write the CMD model.

The weights are set to a planted trajectory at every record (no gradients), so every world size sees
exactly the same weights and an uninterrupted single-process run is the exact reference.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import cmd_online as cmdo

SHAPES = {"a.weight": (5, 3), "a.bias": (7,), "b.weight": (1, 4), "b.scale": (3,)}  # uneven rows, 0-row ranks
CONFIG = dict(samples=24, warmup=4, seed=3)
RECORDS = 12


class Planted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Module()
        self.b = torch.nn.Module()
        for name, shape in SHAPES.items():
            owner, leaf = name.split(".")
            getattr(self, owner).register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))


def trajectory(records: int = RECORDS) -> torch.Tensor:
    """records × N float32: three signals, each weight an affine copy of one, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    N = sum(torch.Size(s).numel() for s in SHAPES.values())
    t = torch.arange(records, dtype=torch.float64)
    signals = torch.stack([torch.sin(t / 2), torch.randn(records, generator=g, dtype=torch.float64).cumsum(0),
                           0.1 * t * t])
    mode = torch.arange(N) % 3
    a, b = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    return (a * signals[mode].T + b + 0.01 * torch.randn(records, N, generator=g, dtype=torch.float64)).float()


def build(world_size: int, **kwargs):
    """Model (FSDP2 on more than one rank), optimizer, recorder: the usual resume builds all three first."""
    model = Planted()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return model, optimizer, cmdo.CMDRecorder(optimizer, model, **CONFIG, **kwargs)


def set_weights(model, row: torch.Tensor) -> None:
    """This rank's part of every parameter from one record of the planted trajectory."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            whole = row[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            if hasattr(p, "to_local"):
                local = p.to_local()
                chunk = -(-p.shape[0] // dist.get_world_size())
                start = min(dist.get_rank() * chunk, p.shape[0])
                local.copy_(whole[start:start + local.shape[0]])
            else:
                p.copy_(whole)


def record(model, rec, rows) -> None:
    for row in rows:
        set_weights(model, row)
        rec.record()


def model_and_optim(model, optimizer, world_size):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if world_size > 1:
        return get_state_dict(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def phase(save_or_load: str, world_size: int, out: Path, stop: int, kwargs: dict) -> None:
    """``save``: record ``stop`` records and dcp.save; ``load``: a fresh recorder dcp.loads, then records the rest."""
    import torch.distributed.checkpoint as dcp

    W = trajectory()
    model, optimizer, rec = build(world_size, **kwargs)
    rank = 0 if world_size == 1 else dist.get_rank()
    if save_or_load == "save":
        record(model, rec, W[:stop])
        model_sd, optim_sd = model_and_optim(model, optimizer, world_size)
        dcp.save({"model": model_sd, "optim": optim_sd, "cmd": rec}, checkpoint_id=str(out / "dcp"))
        return
    if save_or_load == "save_per_rank":  # each rank torch.saves its own state (a resume on the same ranks)
        record(model, rec, W[:stop])
        torch.save(rec.state_dict(), out / f"cmd_rank{rank}.pt")
        return
    if save_or_load == "trajectory":  # a sharded save of the CMD model, and the gathered one to compare with
        record(model, rec, W[:stop])
        dcp.save({"trajectory": rec.trajectory_state_dict()}, checkpoint_id=str(out / "trajectory"))
        traj = rec.trajectory()
        if world_size == 1 or dist.get_rank() == 0:
            torch.save({name: getattr(traj, name) for name in ("references", "reference_index", "a", "b", "modes",
                                                               "mode_r2", "set_aside")}, out / "gathered.pt")
        return
    assert rec.num_records == 0 and rec.phase == "warmup"  # freshly built
    if save_or_load == "load_per_rank":
        rec.load_state_dict(torch.load(out / f"cmd_rank{rank}.pt", weights_only=True))
    else:
        model_sd, optim_sd = model_and_optim(model, optimizer, world_size)
        dcp.load({"model": model_sd, "optim": optim_sd, "cmd": rec}, checkpoint_id=str(out / "dcp"))
    loaded = rec.num_records
    record(model, rec, W[stop:])
    traj = rec.trajectory()  # gathered on every rank
    if world_size == 1 or dist.get_rank() == 0:
        torch.save({"loaded_records": loaded, "references": traj.references, "reference_index": traj.reference_index,
                    "a": traj.a, "b": traj.b, "modes": traj.modes, "num_records": rec.num_records,
                    "compact": rec.moments.compact}, out / "resumed.pt")


def run(rank: int, world_size: int, init_method: str, out_dir: str, step: str, stop: int, kwargs: dict) -> None:
    """Process entry point (world_size > 1); a failure is written, not raised."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        phase(step, world_size, out, stop, kwargs)
    except Exception:
        (out / f"{step}_rank{rank}.error").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()
