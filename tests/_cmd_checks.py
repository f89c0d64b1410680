"""Comparisons of CMD models shared by tests/test_lightning.py and tests/test_transformers.py."""

from __future__ import annotations

import torch

from cmd_online import CMDTrajectory


def assert_same_cmd(online: torch.Tensor, oracle: torch.Tensor, rtol: float = 1e-6) -> None:
    """Two flat vectors of CMD weights agree to ``rtol`` in relative norm."""
    error = ((online.double() - oracle.double()).norm() / oracle.double().norm()).item()
    assert error < rtol, error


def coefficient_floor(want: CMDTrajectory, dtype: torch.dtype, at: int) -> float:
    """The relative error of ``want``'s CMD weights at record ``at`` once its a and b are rounded to ``dtype``.

    A trajectory stores a and b in the weights' dtype. Where a reference has a large mean against its motion
    (a LayerNorm weight near 1), |a| and |b| are far larger than the weights they give, a·r + b cancels, and
    this rounding alone costs more than 10⁻⁶ of the weights (docs/caveats.md).
    """
    rounded = CMDTrajectory(want.references, want.reference_index, want.a.to(dtype), want.b.to(dtype), want.modes,
                            want.window_start)
    exact = want.reconstruct(at).double()
    return ((rounded.reconstruct(at).double() - exact).norm() / exact.norm()).item()


def assert_same_trajectory(traj: CMDTrajectory, want: CMDTrajectory, rtol: float = 1e-6) -> None:
    """An online trajectory gives a float64 post-hoc one's CMD weights at every record, to ``rtol`` relative
    beyond the rounding of the post-hoc coefficients to the trajectory's dtype (:func:`coefficient_floor`)."""
    assert torch.equal(traj.reference_index, want.reference_index)
    for at in range(want.num_records):
        assert_same_cmd(traj.reconstruct(at), want.reconstruct(at), rtol + 2 * coefficient_floor(want, traj.a.dtype, at))


def assert_same_cmd_model(got: dict, want: CMDTrajectory, rtol: float = 1e-5) -> None:
    """A DDP run's CMD model (a, b, modes, references, reference_index as saved by a rank) is the one-process one.

    The two trainings differ by float round-off (a gradient all-reduce against one batch mean), so the same
    references must come out, and the same CMD weights at every record to ``rtol``; a weight whose best two
    |ρ| are within round-off may pick the other mode, with an equally good fit.
    """
    assert torch.equal(got["reference_index"], want.reference_index)
    torch.testing.assert_close(got["references"], want.references, rtol=1e-4, atol=1e-6)
    assert (got["modes"] == want.modes).double().mean() > 0.995
    traj = CMDTrajectory(got["references"], got["reference_index"], got["a"], got["b"], got["modes"], want.window_start)
    for at in range(want.num_records):
        assert_same_cmd(traj.reconstruct(at), want.reconstruct(at), rtol)
