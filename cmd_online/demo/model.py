"""The demo's small CNNs, built from parts that the tests, figures and benchmarks use with their own widths.

Layers are created in a fixed order, so the same seed gives the same weights and the same
``state_dict`` names (``0.weight``, ...) wherever a network is built.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .data import DATASETS


def conv_block(dims: int, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
               batchnorm: bool = False) -> list[nn.Module]:
    """A ``dims``-D convolution padded to keep the size (at stride 1), optional BatchNorm, then ReLU."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    layers = [conv(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)]
    if batchnorm:
        layers.append((nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(out_channels))
    return layers + [nn.ReLU()]


def digits_cnn(channels: Sequence[int] = (16, 32), hidden: int = 64, batchnorm: bool = False) -> nn.Sequential:
    """For 1×8×8 digits: 3×3 convolutions of the given widths, 2×2 max-pooling, one hidden layer, 10 outputs.

    Args:
        channels (sequence of int): output channels of each convolution (default (16, 32), the demo's).
        hidden (int): width of the hidden linear layer (default 64).
        batchnorm (bool): BatchNorm after each convolution (default False).
    """
    layers: list[nn.Module] = []
    width = 1
    for out in channels:
        layers += conv_block(2, width, out, 3, batchnorm=batchnorm)
        width = out
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def mnist1d_cnn(kernel: int = 5, batchnorm: bool = False) -> nn.Sequential:
    """For MNIST-1D (1×40): a 5-wide convolution, two ``kernel``-wide ones of stride 2, 32 channels, 10 outputs."""
    return nn.Sequential(
        *conv_block(1, 1, 32, 5, batchnorm=batchnorm),
        *conv_block(1, 32, 32, kernel, stride=2, batchnorm=batchnorm),
        *conv_block(1, 32, 32, kernel, stride=2, batchnorm=batchnorm),
        nn.Flatten(), nn.Linear(32 * 10, 10))


def build_model(data: str) -> nn.Module:
    """The demo's small CNN for ``data`` (no BatchNorm, so parameters are the whole state)."""
    if data == "digits":
        return digits_cnn()
    if data == "mnist1d":
        return mnist1d_cnn()
    raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {data!r}")


def model_bytes(model: nn.Module) -> int:
    """Bytes of one copy of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
