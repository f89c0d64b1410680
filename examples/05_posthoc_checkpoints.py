"""Post-hoc CMD from a folder of per-epoch checkpoints (no recorder during training).

    python examples/05_posthoc_checkpoints.py [--epochs 30] [--modes 5] [--out DIR]

A run that already saved ``model.state_dict()`` every epoch can be decomposed afterwards, as in the
paper (Algorithm 2); the same from the shell is ``cmd-online decompose DIR -o trajectory.pt``.
The trajectory file then replaces the folder: any epoch's weights come back from it.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import cmd_online as cmdo


def digits(seed=0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--modes", type=int, default=5)
    parser.add_argument("--out", default="runs/examples/05_posthoc_checkpoints")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    folder = Path(args.out) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("epoch_*.pt"):
        old.unlink()

    # an ordinary training run that saves a checkpoint every epoch
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(y_train)).split(64):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(model.state_dict(), folder / f"epoch_{epoch:03d}.pt")

    # afterwards: CMD of the whole run from the folder
    paths = sorted(folder.glob("epoch_*.pt"))  # zero-padded names sort in epoch order
    trajectory = cmdo.decompose_checkpoints(paths, modes=args.modes, samples=500)
    trajectory.save(Path(args.out) / "trajectory.pt")

    print(f"{'epoch':>5}  {'checkpoint acc':>14}  {'CMD acc':>7}  {'max |w - CMD w|':>15}")
    for at in sorted({0, args.epochs // 4, args.epochs // 2, args.epochs - 1}):
        saved = torch.load(paths[at], weights_only=True)
        model.load_state_dict(saved)
        checkpoint_accuracy = accuracy(model, x_test, y_test)
        cmd_weights = trajectory.state_dict(at)  # names and shapes of the checkpoint
        error = max((cmd_weights[name] - saved[name]).abs().max().item() for name in saved)
        model.load_state_dict(cmd_weights)
        print(f"{at:>5}  {checkpoint_accuracy:>14.4f}  {accuracy(model, x_test, y_test):>7.4f}  {error:>15.4f}")
    folder_bytes = sum(p.stat().st_size for p in paths)
    file_bytes = (Path(args.out) / "trajectory.pt").stat().st_size
    print(f"{len(paths)} checkpoints: {folder_bytes} bytes; trajectory with {trajectory.num_modes} modes: "
          f"{file_bytes} bytes ({folder_bytes / file_bytes:.1f}x smaller)")


if __name__ == "__main__":
    main()
