"""The minimal loop: attach a CMDRecorder in one line, record once per epoch, evaluate with swapped().

    python examples/01_minimal.py [--epochs 40] [--warmup 10]

Trains a small MLP on scikit-learn's bundled digits (no download) and prints the test accuracy of
the trained network and of its CMD model.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import cmd_online as cmdo


def digits(seed=0):
    """(x_train, y_train, x_test, y_test): 8×8 digits as 64 features in [0, 1], a seeded 80/20 split."""
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
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    x_train, y_train, x_test, y_test = digits()

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    recorder = cmdo.CMDRecorder(optimizer, model, modes=5, samples=500, warmup=args.warmup)  # the one line

    for epoch in range(args.epochs):
        for batch in torch.randperm(len(y_train)).split(64):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        recorder.record()  # one trajectory point per epoch

    trained = accuracy(model, x_test, y_test)
    with recorder.swapped():  # CMD weights inside, the trained ones come back on exit
        cmd = accuracy(model, x_test, y_test)
    print(f"recorded {recorder.num_records} epochs into {recorder.num_modes} modes "
          f"({recorder.layout.numel} weights)")
    print(f"trained test accuracy: {trained:.4f}")
    print(f"CMD test accuracy:     {cmd:.4f}")
    print(f"trained weights restored: {accuracy(model, x_test, y_test) == trained}")


if __name__ == "__main__":
    main()
