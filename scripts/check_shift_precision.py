"""Why the streaming moments are shifted: float32 centred Welford vs shifted Welford vs float64.

    python scripts/check_shift_precision.py [--mean 1e3] [--motion 1e-3] [--records 100] [--weights 1000]

Weights of mean ``--mean`` move by about ``--motion`` (an affine copy of one reference plus a little
noise of their own). The slope a of every weight is computed three ways from the same float32
trajectory: plain float32 centred Welford (DESIGN.md step 4, no shift), the library's
``StreamingMoments`` (Welford on w − c, c = the weight at the window start), and the float64 oracle
``cmd_online.fit_affine``. Prints the relative error of the vector a against the oracle and the
largest error of one a (the a_i lie in [−1, 1]).
"""

import argparse

import torch

from cmd_online import fit_affine
from cmd_online.stats import StreamingMoments


def trajectory(mean: float, motion: float, records: int, weights: int, seed: int) -> torch.Tensor:
    """N × T float32: row 0 is the reference; every row is a_i · (its motion) + noise around ``mean``."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(records, generator=g, dtype=torch.float64)
    profile = torch.cumsum(steps, 0)
    profile = (profile - profile.mean()) / profile.std()  # unit-variance reference motion
    a = torch.rand(weights, generator=g, dtype=torch.float64) * 2 - 1
    a[0] = 1.0
    noise = 0.05 * torch.randn(weights, records, generator=g, dtype=torch.float64)
    noise[0] = 0
    W = mean + motion * (a[:, None] * profile[None, :] + noise)
    return W.float()  # the trajectory a float32 network would really hold


def plain_welford_slope(W: torch.Tensor) -> torch.Tensor:
    """a = P / Q from float32 centred Welford without a shift (the form DESIGN.md first described)."""
    mean = torch.zeros(W.shape[0])
    S = torch.zeros(W.shape[0])
    P = torch.zeros(W.shape[0])
    nu = torch.zeros(())
    Q = torch.zeros(())
    for n, w in enumerate(W.T, start=1):
        y = w[0]
        dx = w - mean
        mean += dx / n
        S += dx * (w - mean)
        dy = y - nu
        nu += dy / n
        Q += dy * (y - nu)
        P += (y - nu) * dx
    return P / Q


def shifted_welford_slope(W: torch.Tensor) -> torch.Tensor:
    """a from the library's StreamingMoments (shifted Welford), one reference = row 0."""
    stats = StreamingMoments([W.shape[0]], 1)
    for w in W.T:
        stats.update([w.clone()], w[:1].clone())
    return stats.fit().a


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mean", type=float, default=1e3)
    parser.add_argument("--motion", type=float, default=1e-3)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--weights", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    W = trajectory(args.mean, args.motion, args.records, args.weights, args.seed)
    exact = fit_affine(W.double(), [0]).a  # float64 least squares on the same float32 values
    print(f"weights of mean {args.mean:g} moving by ~{args.motion:g}; {args.weights} weights, {args.records} records")
    print(f"{'float32 moments':<28}{'||a - a64|| / ||a64||':>24}{'max |a - a64|':>16}")
    for name, slope in (("centred Welford, no shift", plain_welford_slope(W)),
                        ("shifted Welford (library)", shifted_welford_slope(W))):
        error = slope.double() - exact
        norm = (error.norm() / exact.norm()).item()
        print(f"{name:<28}{norm:>24.3g}{error.abs().max().item():>16.3g}")


if __name__ == "__main__":
    main()
