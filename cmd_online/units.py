"""Human-readable units for the command line and the demo's report."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KB, MB or GB (powers of 1024), e.g. ``human_bytes(153128) == "149.5 KB"``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
