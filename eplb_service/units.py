"""Byte counts as people read them in logs.

A plan on a small model moves kilobytes and one on Qwen3.5 gigabytes; a fixed unit prints the
first as ``0.0 MiB`` (indistinguishable from nothing moved) and the second as ``12288.0 MiB``.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at or above 1: ``512 B``,
    ``23.0 KiB``, ``1.5 MiB``, ``2.00 GiB`` (two decimals from GiB on, where 0.1 is a lot)."""
    if n < 0:
        raise ValueError(f"byte count must be >= 0, got {n}")
    if n < 1024:
        return f"{int(n)} B"
    value, unit = float(n), "B"
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.2f} {unit}" if unit in ("GiB", "TiB") else f"{value:.1f} {unit}"
