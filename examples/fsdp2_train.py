"""Record the CMD model of an FSDP2 (``fully_shard``) run, with a sharded checkpoint to resume from.

    torchrun --nproc_per_node=2 examples/fsdp2_train.py --out runs/fsdp2 --epochs 15
    torchrun --nproc_per_node=4 examples/fsdp2_train.py --out runs/fsdp2 --epochs 30 --resume

Each rank keeps statistics for its own rows of every parameter only. Model, optimizer and recorder
go through torch.distributed.checkpoint together: the recorder's statistics are DTensors placed
like the parameters, so the run can resume on another number of ranks. Uses NCCL and one GPU per
rank when CUDA is available, gloo on CPU otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import cmd_online as cmdo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp2"), help="output directory")
    parser.add_argument("--epochs", type=int, default=30, help="train until this epoch")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # ranks share the CPU cores

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train, test = slice(0, 1500), slice(1500, None)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)  # parameters are now DTensors, Shard(0) over the ranks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = cmdo.CMDRecorder(optimizer, model, modes=4, samples=500, warmup=10)

    checkpoint = args.out / "checkpoint"
    first_epoch = 0
    if args.resume:  # everything is built afresh, then loaded: the recorder is a DCP Stateful
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "cmd": rec}
        dcp.load(state, checkpoint_id=str(checkpoint))  # resharded if the world size changed
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        first_epoch = rec.num_records  # one record per epoch

    for epoch in range(first_epoch, args.epochs):
        order = torch.randperm(train.stop, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, train.stop, args.batch):
            part = order[start:start + args.batch].chunk(world)[rank]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[part].to(device)), y[part].to(device)).backward()
            optimizer.step()
        rec.record()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "cmd": rec},  # every rank writes its shard
             storage_writer=dcp.FileSystemWriter(str(checkpoint), overwrite=True))

    if rec.phase == "tracking":
        rec.export(args.out / "cmd_model.pt")  # gathers full tensors; rank 0 writes
        trajectory = rec.trajectory()  # gathers a, b and modes once, on every rank
        with torch.no_grad():
            accuracy = (model(x[test].to(device)).argmax(1).cpu() == y[test]).float().mean().item()
            with rec.swapped():
                cmd_accuracy = (model(x[test].to(device)).argmax(1).cpu() == y[test]).float().mean().item()
        held = torch.tensor(rec.nbytes()["statistics"], device=device)
        per_rank = [torch.zeros_like(held) for _ in range(world)]
        dist.all_gather(per_rank, held)
        if rank == 0:
            trajectory.save(args.out / "trajectory.pt")
            print(f"world size {world}, {rec.num_records} records: test accuracy trained {accuracy:.4f}, "
                  f"CMD {cmd_accuracy:.4f}; {rec.num_modes} modes; recorder statistics per rank "
                  f"{[int(b) for b in per_rank]} bytes")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
