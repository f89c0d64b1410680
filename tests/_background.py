"""A script started in the background by a module fixture, and its per-rank results read when a test needs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_in_background(argv: list[str], out: Path, **env: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Start ``python argv…`` in ``out`` (its output in out/log.txt), yield it, kill it if still running.

    For a module fixture: the children import the test helpers and ``cmd_online`` from this checkout.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", **env)
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        yield proc, out
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rank_results(run: tuple[subprocess.Popen, Path], what: str, timeout: float = 300) -> tuple[Path, list[dict]]:
    """Wait for the background run; fail with its log's tail unless it exited 0; each rank's saved dict."""
    proc, out = run
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} did not finish in {timeout:.0f} s")
    assert proc.returncode == 0, (out / "log.txt").read_text()[-3000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
