"""Checkpoint and resume: the recorder's state goes into the training checkpoint like the optimizer's.

    python examples/03_checkpoint_resume.py [--epochs 30] [--warmup 10] [--stop-at 5 15] [--out DIR]

The run is interrupted at each ``--stop-at`` epoch (here once in the warm-up and once in the tracking
phase): everything is rebuilt from scratch, as in a new process, and loaded from the checkpoint.
It then checks that the resumed run's CMD model equals that of an uninterrupted run.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import cmd_online as cmdo
from cmd_online.files import atomic_save


def digits(seed=0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def build(warmup):
    """Model, optimizer and recorder, built the same way in every (re)started process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    recorder = cmdo.CMDRecorder(optimizer, model, modes=5, samples=500, warmup=warmup)
    return model, optimizer, recorder


def train_epochs(model, optimizer, recorder, data, start, stop):
    x_train, y_train = data
    for epoch in range(start, stop):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))  # resumable
        for batch in order.split(64):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        recorder.record()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--stop-at", type=int, nargs="*", default=[5, 15], help="epochs to interrupt at")
    parser.add_argument("--out", default="runs/examples/03_checkpoint_resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    checkpoint = Path(args.out) / "checkpoint.pt"
    checkpoint.unlink(missing_ok=True)

    for stop in sorted(args.stop_at) + [args.epochs]:  # each pass stands for a fresh process
        model, optimizer, recorder = build(args.warmup)
        start = 0
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True)  # plain tensors and numbers: no pickled objects
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            recorder.load_state_dict(state["cmd_recorder"])
            start = state["epoch"]
            print(f"resumed at epoch {start} (recorder phase {recorder.phase!r}, {recorder.num_records} records)")
        train_epochs(model, optimizer, recorder, (x_train, y_train), start, stop)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "cmd_recorder": recorder.state_dict(), "epoch": stop}, checkpoint)
    resumed = recorder.trajectory()

    reference_model, reference_optimizer, reference_recorder = build(args.warmup)
    train_epochs(reference_model, reference_optimizer, reference_recorder, (x_train, y_train), 0, args.epochs)
    uninterrupted = reference_recorder.trajectory()

    difference = (resumed.reconstruct(-1) - uninterrupted.reconstruct(-1)).abs().max().item()
    with recorder.swapped():
        cmd = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"checkpoint: {checkpoint} ({checkpoint.stat().st_size} bytes)")
    print(f"same references as the uninterrupted run: "
          f"{torch.equal(resumed.reference_index, uninterrupted.reference_index)}")
    print(f"max |CMD weight difference| resumed vs uninterrupted: {difference:.3g}")
    print(f"CMD test accuracy: {cmd:.4f}")


if __name__ == "__main__":
    main()
