"""Reading and editing CMDRecorder state_dicts (version 3: a packed ``meta`` and per-parameter ``stats``)."""

from __future__ import annotations

from typing import Callable

import torch

from cmd_online.checkpoint import read_meta
from cmd_online.files import pack


def leaves(state) -> dict:
    """Every value of a recorder state_dict by a path-like key, ``meta`` unpacked, DTensors as their local
    part, tensors cloned: two states compare as equal dicts of these."""
    out = {}

    def walk(prefix, value):
        if prefix == "meta" and isinstance(value, (bytes, bytearray)):
            walk("meta", read_meta({"meta": value}))
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            out[prefix] = local.detach().clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", state)
    return out


def assert_same(a: dict, b: dict) -> None:
    """Two ``leaves`` dicts hold the same keys and bit-identical values."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def edit_meta(state: dict, edit: Callable[[dict], None]) -> dict:
    """``state`` with its replicated part changed by ``edit(meta)`` (for tests of damaged states)."""
    meta = read_meta(state)
    edit(meta)
    return {**state, "meta": pack(meta)}
