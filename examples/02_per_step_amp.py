"""Per-step recording alongside an LR scheduler, mixed precision with GradScaler, and gradient clipping.

    python examples/02_per_step_amp.py [--epochs 20] [--record-every 10] [--warmup 10]

The recorder hooks the optimizer's step, so nothing in the loop changes: ``record_every=k`` takes a
record after every k-th optimizer step that really happens. GradScaler skips ``optimizer.step()``
when the scaled gradients overflow; such a step is no step for the recorder either. Autocast uses
float16 (with a GradScaler) on CUDA and on CPU alike, so the same code runs everywhere.
"""

import argparse

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
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--record-every", type=int, default=10, help="optimizer steps per record")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up records")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps_per_epoch = -(-len(y_train) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=args.epochs * steps_per_epoch)
    # a high initial scale makes the first steps overflow and be skipped, as in many float16 runs
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24)
    recorder = cmdo.CMDRecorder(optimizer, model, modes=5, samples=500, warmup=args.warmup,
                                record_every=args.record_every)
    steps_taken = 0

    def count_step(optimizer, args, kwargs):
        nonlocal steps_taken
        steps_taken += 1

    optimizer.register_step_post_hook(count_step)  # only to report; the recorder counts on its own

    iterations = 0
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(y_train), device=device).split(64):
            with torch.autocast(device, dtype=torch.float16):
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            scaler.step(optimizer)  # may skip the step (overflow): then no record either
            scale = scaler.get_scale()
            scaler.update()
            if scaler.get_scale() >= scale:  # the step was taken: advance the schedule with it
                scheduler.step()
            iterations += 1

    trained = accuracy(model, x_test, y_test)
    with recorder.swapped():
        cmd = accuracy(model, x_test, y_test)
    print(f"iterations: {iterations}, optimizer steps taken: {steps_taken} "
          f"(GradScaler skipped {iterations - steps_taken})")
    print(f"records: {recorder.num_records} (one per {args.record_every} steps), modes: {recorder.num_modes}")
    print(f"trained test accuracy: {trained:.4f}")
    print(f"CMD test accuracy:     {cmd:.4f}")


if __name__ == "__main__":
    main()
