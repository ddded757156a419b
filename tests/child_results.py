"""Two-process tests: each child puts ``(rank, result)`` on a queue and leaves; the parent collects.

Shared by the copy-engine transport tests on CPU (``tests/test_copy_engine_transport.py``) and on
GPUs (``tests/gpu/test_copy_engine.py``), whose children run gloo and CUDA: a child must leave
with ``os._exit`` once its result is out, since tearing those threads down at exit can hang.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable


def put_result_and_exit(queue, rank: int, run: Callable[[], dict]) -> None:
    """Put ``(rank, run())`` on ``queue`` (or the traceback as ``{"exception": ...}``), then exit."""
    try:
        queue.put((rank, run()))
    except BaseException:
        queue.put((rank, {"exception": traceback.format_exc()}))
    queue.close()
    queue.join_thread()  # the result is out: leave without tearing down threads (gloo's) at exit
    os._exit(0)


def gather_results(
    queue,
    procs: list,
    timeout_s: float,
    *,
    join_s: float,
    done_early: Callable[[dict[int, dict]], bool] = lambda results: False,
) -> dict[int, dict]:
    """``{rank: result}`` of every process that reported within ``timeout_s``.

    Stops early once every process is gone (what they sent was read first) or ``done_early``
    says so; then joins each process for ``join_s`` and kills what is still alive.
    """
    results: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < len(procs) and time.monotonic() < deadline and not done_early(results):
            try:
                rank, result = queue.get(timeout=1)
            except Exception:
                if all(p.exitcode is not None for p in procs):
                    break
                continue
            results[rank] = result
    finally:
        for p in procs:
            p.join(join_s)
            if p.is_alive():
                p.kill()
    return results
