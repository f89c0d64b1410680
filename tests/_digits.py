"""Real data and a small network for the tests: scikit-learn's bundled 8×8 digits (no download).

The pipeline is the demo's (cmd_online.demo) with the tests' own choices: a 75/25 split, one 3×3
convolution of 8 channels and a hidden layer of 32, a one-pixel shift drawn jointly per image.
"""

from __future__ import annotations

import functools

import torch

from cmd_online import demo


@functools.lru_cache(maxsize=1)
def digits(split_seed: int = 0):
    """(x_train, y_train, x_test, y_test): 1797 images 1×8×8 in [0, 1], a fixed 75/25 split."""
    x, y = demo.data.digits()
    (x_train, y_train), (x_test, y_test) = demo.data.split(x, y, (int(0.75 * len(y)), None), split_seed)
    return x_train, y_train, x_test, y_test


def small_cnn(seed: int = 0, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return demo.model.digits_cnn(channels=(8,), hidden=32, batchnorm=batchnorm)


def shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted at random by up to one pixel in each direction (zero padding)."""
    return demo.random_shift(x, 1, generator, draw="joint")


def train_epoch(model, optimizer, generator: torch.Generator, batch_size: int = 64, augment: bool = True,
                device=None):
    x, y, _, _ = digits()
    demo.train_epoch(model, optimizer, x, y, generator, batch_size, augment=shift_augment if augment else None,
                     device=device)


def accuracy(model) -> float:
    """Test accuracy in percent."""
    _, _, x, y = digits()
    return 100 * demo.accuracy(model, x, y)


def flat(model_or_params) -> torch.Tensor:
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return torch.cat([p.detach().reshape(-1).double() for p in params])
