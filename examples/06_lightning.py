"""PyTorch Lightning: CMD from one callback, validation on the CMD weights, the CMD model written at the end.

    python examples/06_lightning.py [--epochs 30] [--warmup 10] [--devices 1] [--out DIR]

Trains a small MLP on scikit-learn's bundled digits (no download) with a Lightning Trainer. The
callback builds the recorder on the LightningModule's optimizer when fit starts, records once per
epoch, validates on the CMD weights once they exist (the trained weights come back after each
validation; the checkpoints then hold the validated weights, the trained ones in the callback's state),
logs the mode statistics to the trainer's logger at the global step, and writes the CMD model as a
Lightning checkpoint when fit ends (``Classifier.load_from_checkpoint``).
Prints the test accuracy of the trained network and of its CMD model. ``--devices 2`` trains with
``strategy="ddp"`` on two CPU processes (Lightning starts the second by running this script again).
"""

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from cmd_online.checkpoint import read_meta
from cmd_online.integrations.lightning import CMDCallback


def digits(seed=0):
    """Train, validation and test sets of the 8×8 digits as 64 features in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = order[:1200], order[1200:1440], order[1440:]
    return [torch.utils.data.TensorDataset(x[part], y[part]) for part in parts]


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@torch.no_grad()
def accuracy(model, data):
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; 2 or more train with DDP")
    parser.add_argument("--out", default="runs/examples/06_lightning")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    pl.seed_everything(0, verbose=False)
    train, val, test = digits()
    out = Path(args.out)

    callback = CMDCallback(modes=5, samples=500, warmup=args.warmup, swap_for_validation=True,
                           export_path=out / "cmd_model.ckpt")  # the one line
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", callbacks=[callback],
                         default_root_dir=out, enable_progress_bar=False, enable_model_summary=False,
                         logger=pl.loggers.TensorBoardLogger(out, name="tensorboard"))
    model = Classifier()
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
                torch.utils.data.DataLoader(val, batch_size=256))
    if not trainer.is_global_zero:
        return
    rec = callback.recorder
    trained = accuracy(model, test)
    with callback.swapped():  # CMD weights inside, the trained ones come back on exit
        cmd = accuracy(model, test)
    exported = Classifier.load_from_checkpoint(out / "cmd_model.ckpt")  # a Lightning checkpoint of the CMD model
    checkpoint = max(out.rglob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]["CMDCallback"]["recorder"]
    print(f"recorded {rec.num_records} epochs into {rec.num_modes} modes ({rec.layout.numel} weights)")
    print(f"last validation accuracy (on the CMD weights): {trainer.callback_metrics['val_acc'].item():.4f}")
    print(f"trained test accuracy: {trained:.4f}")
    print(f"CMD test accuracy:     {cmd:.4f}")
    print(f"exported CMD model:    {accuracy(exported, test):.4f} ({out / 'cmd_model.ckpt'})")
    print(f"checkpoint {checkpoint.name} holds the recorder with {read_meta(saved)['num_records']} records")


if __name__ == "__main__":
    main()
