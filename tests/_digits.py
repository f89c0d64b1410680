"""Real data and a small network for the tests: scikit-learn's bundled 8×8 digits (no download)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def digits(split_seed: int = 0):
    """(x_train, y_train, x_test, y_test): 1797 images 1×8×8 in [0, 1], a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    cut = int(0.75 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def small_cnn(seed: int = 0, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(1, 8, 3, padding=1)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm2d(8))
    layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 32),
               torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    return torch.nn.Sequential(*layers)


def shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted at random by up to one pixel in each direction (zero padding)."""
    padded = F.pad(x, (1, 1, 1, 1))
    crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    choice = torch.randint(0, 9, (len(x),), generator=generator)
    return crops[choice, torch.arange(len(x))]


def train_epoch(model, optimizer, generator: torch.Generator, batch_size: int = 64, augment: bool = True):
    x, y, _, _ = digits()
    model.train()
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        xb = shift_augment(x[idx], generator) if augment else x[idx]
        optimizer.zero_grad()
        F.cross_entropy(model(xb), y[idx]).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model) -> float:
    _, _, x, y = digits()
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() * 100


def flat(model_or_params) -> torch.Tensor:
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return torch.cat([p.detach().reshape(-1).double() for p in params])
