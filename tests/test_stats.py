"""StreamingMoments: every update variant against the float64 two-pass reference; the affine fit."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from _devices import DEVICES
from cmd_online.stats import KERNELS, StreamingMoments, affine_fit, compact_block, pin_references


@dataclass
class Moments:
    """Moments of weights against references over a window, as :func:`two_pass_moments` returns them.

    Attributes: ``mean`` (n,), ``sumsq`` S (n,), ``comoment`` P (M × n), ``ref_mean`` (M,),
    ``ref_sumsq`` Q (M,).
    """

    mean: torch.Tensor
    sumsq: torch.Tensor
    comoment: torch.Tensor
    ref_mean: torch.Tensor
    ref_sumsq: torch.Tensor


def two_pass_moments(W: torch.Tensor, R: torch.Tensor) -> Moments:
    """The reference computation: moments of W (n × T) against R (M × T) in float64, two passes.

    The plain definition — means first, then sums of products of deviations — that
    :class:`StreamingMoments` computes one record at a time; every update variant is compared with it.
    """
    W, R = W.double(), R.double()
    mean, ref_mean = W.mean(dim=1), R.mean(dim=1)
    Wc, Rc = W - mean.unsqueeze(1), R - ref_mean.unsqueeze(1)
    return Moments(mean, (Wc * Wc).sum(dim=1), Rc @ Wc.T, ref_mean, (Rc * Rc).sum(dim=1))


SIZES = [300, 7, 1, (1 << 17) + 5]  # a block boundary inside the last tensor
M = 4


def random_records(T=9, offset=0.0, motion=0.1, seed=0):
    """T records of the tensors SIZES (float32) and M reference values each, as a random walk."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=g) + offset for n in SIZES]
    refs = torch.randn(M, generator=g)
    records = []
    for _ in range(T):
        weights = [w + motion * torch.randn(w.shape, generator=g) for w in weights]
        refs = refs + torch.randn(M, generator=g)
        records.append(([w.clone() for w in weights], refs.clone()))
    return records


def stream(records, kernel, device, freeze_at=None, modes=None):
    stats = StreamingMoments(SIZES, M, device, kernel=kernel)
    for t, (weights, refs) in enumerate(records):
        stats.update([w.to(device) for w in weights], refs.to(device))
        if t == freeze_at:
            stats.freeze(modes.to(device))
    return stats


def reference(records):
    W = torch.stack([torch.cat(w) for w, _ in records], dim=1)
    R = torch.stack([r for _, r in records], dim=1)
    return two_pass_moments(W, R)


def assert_moments_close(stats, ref, rtol=2e-5, mean_atol=1e-6):
    torch.testing.assert_close(stats.mean_of().cpu(), ref.mean, rtol=1e-6, atol=mean_atol)
    scale = ref.sumsq.abs().max()
    torch.testing.assert_close(stats.sumsq.double().cpu(), ref.sumsq, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(stats.ref_sumsq.double().cpu(), ref.ref_sumsq, rtol=rtol, atol=0)
    torch.testing.assert_close((stats.ref_shift.double() + stats.ref_mean.double()).cpu(), ref.ref_mean,
                               rtol=1e-6, atol=1e-6)


def test_two_pass_reference_is_the_definition():
    g = torch.Generator().manual_seed(1)
    W, R = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    ref = two_pass_moments(W, R)
    cov = np.cov(np.concatenate([W.numpy(), R.numpy()]), bias=True) * 8  # centred sums of products
    np.testing.assert_allclose(ref.sumsq.numpy(), np.diag(cov)[:5])
    np.testing.assert_allclose(ref.ref_sumsq.numpy(), np.diag(cov)[5:])
    np.testing.assert_allclose(ref.comoment.numpy(), cov[5:, :5])
    np.testing.assert_allclose(ref.mean.numpy(), W.numpy().mean(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("offset, motion", [(0.0, 0.1), (1e3, 1e-3)], ids=["unit", "large_mean"])
def test_full_form_equals_the_two_pass_reference(kernel, device, offset, motion):
    records = random_records(offset=offset, motion=motion)
    stats = stream(records, kernel, device)
    ref = reference(records)
    assert stats.window_count() == len(records)
    assert_moments_close(stats, ref)
    P = torch.stack(stats.comoment).double().cpu()
    torch.testing.assert_close(P, ref.comoment, rtol=2e-5, atol=2e-5 * ref.comoment.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("offset, motion", [(0.0, 0.1), (1e3, 1e-3)], ids=["unit", "large_mean"])
def test_compact_form_equals_the_reference_co_moment_with_the_own_mode(kernel, device, offset, motion):
    records = random_records(offset=offset, motion=motion)
    modes = torch.randint(0, M, (sum(SIZES),), generator=torch.Generator().manual_seed(2))
    stats = stream(records, kernel, device, freeze_at=4, modes=modes)
    ref = reference(records)
    assert stats.compact and stats.shift is None and stats.window_count() == len(records)
    # the compact form has no shift: a mean of 1000 in float32 is off by up to half its spacing (3e-5), and
    # each record's w − μ by as much against a motion of 1e-3 (docs/caveats.md, the compact form's precision)
    rtol = 2e-5 if offset == 0 else 3e-2
    assert_moments_close(stats, ref, rtol, mean_atol=1e-6 if offset == 0 else 1e-4)
    own = ref.comoment.gather(0, modes.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(stats.comoment[0].double().cpu(), own, rtol=rtol, atol=rtol * own.abs().max())
    assert torch.equal(stats.modes.long().cpu(), modes)


def test_compact_state_holds_three_floats_and_a_byte_per_weight_on_cpu():
    N = sum(SIZES)
    stats = stream(random_records(T=5), "blocks", "cpu", freeze_at=3,
                   modes=torch.zeros(N, dtype=torch.int64))
    assert stats.modes.dtype == torch.uint8 and stats.shift is None
    assert stats.nbytes() == N * (3 * 4 + 1) + 3 * M * 4
    assert stats.scratch_nbytes() == compact_block(N) * (4 + 4 + 4)  # dx, own y − ν, int32 mode: one block each


def test_freeze_frees_the_other_rows_of_p():
    stats = stream(random_records(T=5), "blocks", "cpu")
    row0 = stats.comoment[0]
    expected = torch.stack(stats.comoment).gather(0, torch.full((1, sum(SIZES)), 2)).squeeze(0)
    stats.freeze(torch.full((sum(SIZES),), 2))
    assert len(stats.comoment) == 1 and stats.comoment[0].data_ptr() == row0.data_ptr()  # reused in place
    assert torch.equal(stats.comoment[0], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_kernel_skips_a_record_flagged_on_the_device(device):
    records = random_records(T=8)
    bad = ([torch.full_like(w, float("nan")) for w in records[5][0]], torch.full((M,), float("nan")))
    stats = StreamingMoments(SIZES, M, device, kernel="flat")
    for t, (weights, refs) in enumerate(records[:5] + [bad] + records[5:]):
        ok = torch.tensor(t != 5, device=device)
        stats.update([w.to(device) for w in weights], refs.to(device), ok=ok)
    assert stats.window_count() == len(records)
    assert_moments_close(stats, reference(records))
    assert all(torch.isfinite(row).all() for row in stats.comoment)


def test_fit_of_the_streamed_moments_equals_the_fit_of_the_reference():
    records = random_records()
    stats = stream(records, "blocks", "cpu")
    ref = reference(records)
    exact = affine_fit(ref.comoment, ref.sumsq, ref.ref_sumsq, ref.mean, ref.ref_mean)
    streamed = stats.fit()
    assert torch.equal(streamed.modes, exact.modes)
    torch.testing.assert_close(streamed.a, exact.a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(streamed.b, exact.b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(streamed.r2, exact.r2, rtol=1e-4, atol=1e-6)


def test_fit_of_a_slice_equals_the_slice_of_the_fit():
    stats = stream(random_records(), "blocks", "cpu")
    whole, part = stats.fit(), stats.fit(slice(290, 310))
    for name in ("modes", "a", "b", "r2"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[290:310])


def test_affine_fit_gives_a_weight_that_does_not_move_its_value():
    P = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    fit = affine_fit(P, torch.tensor([0.0, 4.0]), torch.tensor([1.0, 4.0]), torch.tensor([3.0, 1.0]),
                     torch.tensor([0.5, 0.5]))
    assert fit.a[0] == 0 and fit.b[0] == 3.0  # S = 0: a = 0, b = mean
    assert fit.modes[1] == 0 and fit.a[1] == 2.0 and fit.r2[1] == 1.0  # ρ = 2/√4 = 1 with mode 0


def test_pin_references_makes_each_reference_its_own_exact_copy():
    stats = stream(random_records(), "blocks", "cpu")
    fit = stats.fit()
    pin_references(fit, [3, 301], [2, 0])
    assert fit.modes[[3, 301]].tolist() == [2, 0]
    assert fit.a[[3, 301]].tolist() == [1.0, 1.0] and fit.b[[3, 301]].tolist() == [0.0, 0.0]
