"""A small LightningModule on scikit-learn's digits, shared by tests/test_lightning.py and the DDP script.

The data order depends only on the epoch (a sampler with ``set_epoch``, which Lightning calls), so a run
resumed from a checkpoint sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

TRAIN = 1536  # digits used for training: 24 batches of 64, or 12 global batches of 2 × 64 under DDP


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation seeded by the epoch (Lightning calls ``set_epoch``): resumable, unlike RandomSampler."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def train_loader(batch_size: int = 64, shuffle: bool = True) -> torch.utils.data.DataLoader:
    x, y = digits()
    data = torch.utils.data.TensorDataset(x[:TRAIN], y[:TRAIN])
    sampler = EpochShuffle(TRAIN) if shuffle else None
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)


def val_loader() -> torch.utils.data.DataLoader:
    x, y = digits()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN:], y[TRAIN:]), batch_size=128)


class Digits(pl.LightningModule):
    """64 → 32 → 10 classifier; logs val_loss and val_acc."""

    def __init__(self, lr: float = 0.1, compile_net: bool = False):
        super().__init__()
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
        self.net = torch.compile(net, backend="eager") if compile_net else net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=False)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU trainer; keyword arguments override the defaults."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0)
    return pl.Trainer(**(defaults | kwargs))


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


class Snapshots(pl.Callback):
    """The weights (float64, flat, in parameter order) at the end of every training epoch."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(flat(pl_module))

    def matrix(self) -> torch.Tensor:
        return torch.stack(self.weights, dim=1)


class StepSnapshots(pl.Callback):
    """The weights (float64, flat) after every ``every``-th optimizer step."""

    def __init__(self, every: int):
        self.every, self.weights = every, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step % self.every == 0:
            self.weights.append(flat(pl_module))

    def matrix(self) -> torch.Tensor:
        return torch.stack(self.weights, dim=1)
