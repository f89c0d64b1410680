"""Defects found in the review of the merged issues 20, 22, 24 and 25: one tiny test each."""

import warnings

import pytest
import torch

import cmd_online as cmdo
from cmd_online.integrations import _common


def _setup(warmup=3, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, cmdo.CMDRecorder(opt, model, modes=2, samples=10, warmup=warmup, **kwargs)


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(8, 5)).pow(2).mean().backward()
    opt.step()


def test_record_inside_the_warm_up_fallback_of_swapped_is_refused_as_inside_swapped():
    """swapped() during the warm-up keeps the trained weights, but it is still a swapped() block: nothing is
    recorded inside it, so the block's behaviour does not change when the warm-up ends."""
    model, opt, rec = _setup()
    _step(model, opt)
    rec.record()
    with pytest.warns(UserWarning, match="during the warm-up"):
        with rec.swapped():
            with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\)"):
                rec.record()
    assert rec.num_records == 1
    rec.record()  # after the block: taken
    assert rec.num_records == 2


def test_the_callbacks_swap_refuses_records_of_the_cmd_weights():
    """The callbacks' Swap writes the CMD weights into the parameters as swapped() does: a record meanwhile
    would enter the CMD weights into the statistics as a trajectory point."""
    model, opt, rec = _setup()
    for _ in range(4):
        _step(model, opt)
        rec.record()
    assert rec.ready
    records = rec.num_records
    with _common.Swap().around(rec):
        with pytest.raises(RuntimeError, match=r"record\(\) inside swapped\(\)"):
            rec.record()
    assert rec.num_records == records
    rec.record()
    assert rec.num_records == records + 1
