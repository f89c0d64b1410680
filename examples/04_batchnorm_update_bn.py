"""BatchNorm: after swapping the CMD weights in, recompute the BatchNorm statistics with update_bn.

    python examples/04_batchnorm_update_bn.py [--epochs 30] [--warmup 10]

CMD models the trained *parameters*; BatchNorm's running mean and variance are buffers, which the
optimizer never steps, so they still describe the trained weights. The recipe is the same as for
SWA: ``torch.optim.swa_utils.update_bn`` over the training data, with the CMD weights in place.
``update_bn`` overwrites the buffers, so they are saved and put back to leave the trained network as
it was.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

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
    model.eval()
    result = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)

    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                          nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    recorder = cmdo.CMDRecorder(optimizer, model, modes=5, samples=500, warmup=args.warmup)
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        recorder.record()

    trained = accuracy(model, x_test, y_test)
    at = args.warmup  # an early record, where the CMD weights are far from the final ones
    with recorder.swapped(at=at):
        stale = accuracy(model, x_test, y_test)  # CMD weights, BatchNorm statistics of the trained weights
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        update_bn(loader, model)  # recompute the statistics for the CMD weights
        recalibrated = accuracy(model, x_test, y_test)
        shift = max((buffer - saved[name]).abs().max().item()
                    for name, buffer in model.named_buffers() if "running" in name)
        with torch.no_grad():  # put the trained network's statistics back
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
    print(f"CMD model at record {at} of {recorder.num_records}; BatchNorm running statistics moved by up to "
          f"{shift:.3f} under update_bn")
    print(f"trained test accuracy:                      {trained:.4f}")
    print(f"CMD test accuracy, trained BN statistics:   {stale:.4f}")
    print(f"CMD test accuracy, after update_bn:         {recalibrated:.4f}")
    print(f"trained network unchanged afterwards: {accuracy(model, x_test, y_test) == trained}")


if __name__ == "__main__":
    main()
