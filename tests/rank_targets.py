"""Process targets for tests/test_rank_processes.py (spawned: a module of their own, light to import)."""

from __future__ import annotations

import os
import time


def report(rank: int, results, delay_s: float = 0.0) -> None:
    time.sleep(delay_s)
    results.put({"rank": rank, "pid": os.getpid()})


def die_unless_rank0(rank: int, results, exit_code: int = 3) -> None:
    if rank != 0:
        os._exit(exit_code)
    results.put({"rank": rank})


def write_control(rank: int, control, progress, results) -> None:
    """Rank 0 sets the phase switches; every rank writes its own step count."""
    if rank == 0:
        control.plans_enabled = True
        control.experts_per_rank = 8
        control.layers_per_batch = 2
        control.phase = 5
    progress.set(rank, 10 + rank)
    results.put({"rank": rank, "coordinator_idle": bool(control.coordinator_idle)})
