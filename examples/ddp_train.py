"""Record the CMD model of a DistributedDataParallel run.

    torchrun --nproc_per_node=2 examples/ddp_train.py --out runs/ddp

Every rank holds identical parameters, so every rank's recorder reaches the same state with no extra
communication; rank 0 alone writes the TensorBoard logs and the exported CMD checkpoint.
Uses NCCL and one GPU per rank when CUDA is available, gloo on CPU otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

import cmd_online as cmdo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"), help="output directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
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

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.out / "tb"))
    # pass the inner module: its state_dict keys are the plain model's, without "module."
    rec = cmdo.CMDRecorder(optimizer, model, modes=4, samples=500, warmup=10, writer=writer)

    steps = range(0, train.stop, args.batch)
    for epoch in range(args.epochs):
        order = torch.randperm(train.stop, generator=torch.Generator().manual_seed(epoch))
        for start in steps:
            part = order[start:start + args.batch].chunk(world)[rank]  # this rank's share of the batch
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x[part].to(device)), y[part].to(device))
            loss.backward()
            optimizer.step()
        rec.record()  # one trajectory point per epoch, on every rank

    rec.close()
    rec.export(args.out / "cmd_model.pt")  # written by rank 0 only
    with torch.no_grad():
        accuracy = (model(x[test].to(device)).argmax(1).cpu() == y[test]).float().mean().item()
        with rec.swapped():
            cmd_accuracy = (model(x[test].to(device)).argmax(1).cpu() == y[test]).float().mean().item()
    if rank == 0:
        print(f"world size {world}: test accuracy trained {accuracy:.4f}, CMD {cmd_accuracy:.4f}; "
              f"{rec.num_modes} modes; recorder statistics {rec.nbytes()['statistics']} bytes per rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
