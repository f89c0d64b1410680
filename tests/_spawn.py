"""Start real gloo process groups for the distributed tests and wait for them, with a deadline."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch


def run_ranks(fn, args: tuple, nprocs: int, seconds: float, what: str) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes; fails the test if they outlive ``seconds`` (a collective
    mismatch hangs) or one dies (gloo aborts on a collective mismatch). fork where the platform has it:
    the children inherit the imported torch (spawn re-imports it, about 10 s here)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {seconds:.0f} s")
    except torch.multiprocessing.ProcessRaisedException as e:
        pytest.fail(f"{what}: a rank raised: {e}")
    except torch.multiprocessing.ProcessExitedException as e:
        pytest.fail(f"{what}: a rank died: {e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
