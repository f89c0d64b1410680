"""A tiny character-level GPT-2 (a real ``PreTrainedModel``, built from a config: no download) on the text
of Python's own standard library, shared by tests/test_transformers.py and the torchrun script."""

from __future__ import annotations

import functools
import json
import textwrap

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

LENGTH = 32  # characters per example


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[torch.Tensor, list[str]]:
    """The characters of two stdlib modules as ids, and the alphabet."""
    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (textwrap, json.decoder))
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text]), alphabet


class Chars(torch.utils.data.Dataset):
    """Consecutive LENGTH-character pieces of the corpus from piece ``start`` on; labels = inputs (the model
    shifts them)."""

    def __init__(self, count: int, start: int = 0):
        self.count, self.start = count, start

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, _ = corpus()
        piece = ids[(self.start + i) * LENGTH:(self.start + i + 1) * LENGTH]
        return {"input_ids": piece, "labels": piece}


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    _, alphabet = corpus()
    config = GPT2Config(vocab_size=len(alphabet), n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_tokenizer():
    """A character-level tokenizer of the corpus's alphabet (ids as in ``corpus()``), built here: no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, alphabet = corpus()
    tokenizer = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(alphabet)}, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=" ", bos_token=alphabet[0],
                                   eos_token=alphabet[0], pad_token=alphabet[0])


def arguments(output_dir, **kwargs) -> TrainingArguments:
    """Quiet CPU training arguments; keyword arguments override the defaults."""
    defaults = dict(per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant", use_cpu=True,
                    report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    return TrainingArguments(output_dir=str(output_dir), **(defaults | kwargs))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().clone() for name, p in model.named_parameters()}


def matrix(snapshots: list[dict[str, torch.Tensor]], names) -> torch.Tensor:
    """N × T: the snapshots flattened in the order of ``names`` (the recorder's: the optimizer's order)."""
    return torch.stack([torch.cat([s[n].reshape(-1) for n in names]) for s in snapshots], dim=1)


class Snapshots(TrainerCallback):
    """The weights (float64, by name) after every optimizer step and at every epoch end."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(weights(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epochs.append(weights(model))
