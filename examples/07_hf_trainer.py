"""Hugging Face Trainer: CMD from one callback, checkpoints that carry it, the CMD model saved with save_pretrained.

    python examples/07_hf_trainer.py [--epochs 3] [--every 10] [--warmup 8] [--pieces 1500] [--out DIR]

Trains a small character-level GPT-2 (built from a config: no download) on the source of a few Python
standard-library modules, and tests it on another one. The callback finds the torch optimizer inside
the Trainer's AcceleratedOptimizer, records after every ``--every`` optimizer steps (one per
``gradient_accumulation_steps`` micro-batches), writes its state into every ``checkpoint-*`` folder
and saves the CMD model next to the trained one, in ``OUT/cmd_model``, loadable with ``from_pretrained``.
Prints the next-character accuracy on the held-out module of the trained model and of its CMD model.
Run it under ``torchrun --nproc_per_node 2`` for DDP.
"""

import argparse
import importlib
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from cmd_online.checkpoint import read_meta
from cmd_online.integrations.transformers import CMDCallback

TRAIN_MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "csv", "string")
TEST_MODULE = "shlex"
LENGTH = 64


def source(name):
    return Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")


class Pieces(torch.utils.data.Dataset):
    """Consecutive LENGTH-character pieces of a text as ids (0: a character outside the alphabet)."""

    def __init__(self, text, alphabet, count=None):
        index = {c: i + 1 for i, c in enumerate(alphabet)}
        ids = torch.tensor([index.get(c, 0) for c in text])
        self.pieces = ids[:len(ids) // LENGTH * LENGTH].view(-1, LENGTH)[:count]

    def __len__(self):
        return len(self.pieces)

    def __getitem__(self, i):
        return {"input_ids": self.pieces[i], "labels": self.pieces[i]}  # the model shifts the labels itself


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    ids = data.pieces
    logits = model(input_ids=ids).logits
    return (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--every", type=int, default=10, help="optimizer steps per record")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up records")
    parser.add_argument("--pieces", type=int, default=1500, help="training pieces of 64 characters")
    parser.add_argument("--out", default="runs/examples/07_hf_trainer")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: more threads only add overhead
    text = "".join(source(name) for name in TRAIN_MODULES)
    alphabet = sorted(set(text))
    train, test = Pieces(text, alphabet, args.pieces), Pieces(source(TEST_MODULE), alphabet, 200)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(alphabet) + 1, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    callback = CMDCallback(modes=5, samples=1000, warmup=args.warmup, record_every_n_steps=args.every,
                           evaluate_cmd=True)  # the one line; evaluate() gives eval_cmd_* beside eval_*
    trainer = Trainer(model=model, train_dataset=train, eval_dataset=test, callbacks=[callback],
                      args=TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs,
                                             per_device_train_batch_size=16, gradient_accumulation_steps=2,
                                             learning_rate=3e-3, save_strategy="epoch", logging_strategy="no",
                                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0))
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    rec = callback.recorder
    trained = accuracy(model, test)
    metrics = trainer.evaluate()  # the trained weights' eval_loss and the CMD weights' eval_cmd_loss
    with callback.swapped():  # CMD weights inside, the trained ones back on exit
        cmd = accuracy(model, test)
    loaded = GPT2LMHeadModel.from_pretrained(Path(args.out) / "cmd_model")
    checkpoints = sorted(Path(args.out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    saved = torch.load(checkpoints[-1] / "cmd_recorder.pt", weights_only=True)
    print(f"{trainer.state.global_step} optimizer steps, {rec.num_records} records, {rec.num_modes} modes "
          f"({rec.layout.numel} weights)")
    print(f"trained model: eval loss {metrics['eval_loss']:.4f}, next-character accuracy {trained:.4f}")
    print(f"CMD model:     eval loss {metrics['eval_cmd_loss']:.4f}, next-character accuracy {cmd:.4f}")
    print(f"loaded with from_pretrained from {Path(args.out) / 'cmd_model'}: accuracy {accuracy(loaded, test):.4f}")
    print(f"{checkpoints[-1].name} holds the recorder with {read_meta(saved['recorder'])['num_records']} records")


if __name__ == "__main__":
    main()
