"""StreamingMoments: its multi-tensor (GPU) and per-tensor (CPU) record paths keep the same statistics."""

import pytest
import torch

from _devices import DEVICES
from cmd_online.stats import StreamingMoments


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
def test_foreach_and_per_tensor_updates_keep_the_same_statistics(compact, device):
    sizes, M = [300, 7, 1000], 4
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=g) for n in sizes]
    steps = [([torch.randn(n, generator=g) * 0.1 for n in sizes], torch.randn(M, generator=g)) for _ in range(9)]
    modes = [torch.randint(0, M, (n,), generator=g) for n in sizes]
    results = []
    for foreach in (False, True):
        stats = StreamingMoments(sizes, M, device, foreach=foreach)
        assert stats.foreach is foreach
        weights = [w.clone().to(device) for w in base]
        for t, (dw, refs) in enumerate(steps):
            for w, d in zip(weights, dw):
                w.add_(d.to(device))
            stats.update(weights, refs.to(device))
            if compact and t == 4:
                stats.freeze([m.to(device) for m in modes])
        results.append(stats.tensors())
    per_tensor, foreach = results
    assert per_tensor.keys() == foreach.keys()
    for name in per_tensor:
        xs, ys = per_tensor[name], foreach[name]
        for x, y in zip(*((xs, ys) if isinstance(xs, list) else ([xs], [ys]))):
            if device == "cpu":  # the same arithmetic, element by element
                assert torch.equal(x, y), name
            else:  # fused multi-tensor kernels may contract a·b + c differently
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not torch.equal(per_tensor["comoment"][0], torch.zeros_like(per_tensor["comoment"][0]))


def test_the_default_is_multi_tensor_on_accelerators_only():
    assert StreamingMoments([3], 2, "cpu").foreach is False
    assert StreamingMoments([3], 2, torch.device("meta")).foreach is True
