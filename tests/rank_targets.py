"""Process targets for tests/test_rank_processes.py (spawned: a module of their own, light to import)."""

from __future__ import annotations

import os
import time


def report(rank: int, results, delay_s: float = 0.0) -> None:
    time.sleep(delay_s)
    results.put({"rank": rank, "pid": os.getpid()})


def die_unless_rank0(rank: int, results, exit_code: int = 3, rank0_reported=None) -> None:
    """Rank 0 reports; every other rank exits with ``exit_code`` without reporting, once
    ``rank0_reported`` (an event, if given) says rank 0's result is on the queue."""
    if rank != 0:
        if rank0_reported is not None:
            rank0_reported.wait(60)
        os._exit(exit_code)
    results.put({"rank": rank})
    results.close()
    results.join_thread()  # the result is in the pipe, not in this process's feeder buffer
    if rank0_reported is not None:
        rank0_reported.set()


def write_control(rank: int, control, progress, results) -> None:
    """Rank 0 sets the phase switches; every rank writes its own step count."""
    if rank == 0:
        control.plans_enabled = True
        control.experts_per_rank = 8
        control.layers_per_batch = 2
        control.phase = 5
    progress.set(rank, 10 + rank)
    results.put({"rank": rank, "coordinator_idle": bool(control.coordinator_idle)})


def report_then_linger(rank: int, results, linger_s: float) -> None:
    """Reports at once, then takes ``linger_s`` to end, as a rank tearing down its process group does."""
    results.put({"rank": rank})
    time.sleep(linger_s)


def report_large_then_end_as_a_simulated_rank(rank: int, results, marker: str) -> None:
    """Reports a result larger than a pipe holds, then ends as a simulated rank does; ``marker``
    is written only if the interpreter's own shutdown runs (its atexit handlers)."""
    import atexit

    from eplb_service.sim.serving_loop import _exit_once_reported

    atexit.register(lambda: open(marker, "w").close())
    results.put({"rank": rank, "payload": list(range(200_000))})
    _exit_once_reported(results, None)
