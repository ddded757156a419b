"""A gloo serving group of simulated ranks with no coordinator: for tests of the simulation's
serving loop alone (tests/test_sim_mismatch_check.py, tests/test_sim_serving_steps.py).

This process hosts the group's store; each child joins it (:func:`join_serving_group`), builds
its :class:`~eplb_service.sim.serving_loop.RankSpec` (:func:`serving_spec`), and puts
``(rank, result)`` on the queue it was given."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist
from child_context import CTX
from child_results import gather_results

from eplb_service.sim.processes import free_port
from eplb_service.sim.serving_loop import RankSpec
from eplb_service.sim.workload import SimModelConfig

STORE_TIMEOUT = datetime.timedelta(seconds=60)


def join_serving_group(rank: int, world: int, store_port: int) -> None:
    """In a child: one thread for torch, then the serving group on the parent's store."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, world, False, timeout=STORE_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=STORE_TIMEOUT)


def serving_spec(rank: int, world: int, store_port: int, steps: int, seed: int) -> RankSpec:
    """The spec of a simulated rank that serves on its own (no coordinator to reach)."""
    return RankSpec(
        rank=rank,
        world_size=world,
        steps=steps,
        seed=seed,
        model=SimModelConfig(),
        coordinator_endpoint="unused",
        serving_store_port=store_port,
    )


def run_serving_ranks(target: Callable[..., None], world: int, args: tuple, name: str) -> list:
    """Each rank's result, by rank, of ``target(rank, world, store_port, *args, queue)`` run in
    ``world`` child processes named ``<name>-<rank>`` (every rank must report)."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world, True, timeout=STORE_TIMEOUT, wait_for_workers=False)
    out = CTX.Queue()
    procs = [CTX.Process(target=target, args=(r, world, port, *args, out), name=f"{name}-{r}") for r in range(world)]
    for p in procs:
        p.start()
    results = gather_results(out, procs, 120, join_s=10)
    del store  # the ranks are gone: their store can go
    assert sorted(results) == list(range(world)), results
    return [results[r] for r in range(world)]
