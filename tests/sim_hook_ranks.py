"""Child target of tests/test_sim_serving_steps.py: the simulation's serving loop with recording hooks.

Each child joins a gloo serving group and runs :meth:`SimServingRank.run` as a simulated rank
does, but with an agent stand-in whose hooks record what the serving loop hands them: no
coordinator, no side communicator, only the loop's side of the hook contract.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from serving_group import join_serving_group, serving_spec

from eplb_service.sim.serving_loop import SimServingRank


class RecordingHooks:
    """The two hooks and the step counter ``SimServingRank.run`` uses, recording every call."""

    def __init__(self) -> None:
        self.steps_done = 0
        self.calls: list[str] = []
        self.loads: list[list] = []

    def before_step(self) -> None:
        self.calls.append("before")

    def after_step(self, load: torch.Tensor) -> None:
        self.calls.append("after")
        self.loads.append(load.tolist())  # a copy: the loop zeroes its tensor for the next step


def serve_recording(rank: int, world: int, store_port: int, steps: int, seeds: list[int], results) -> None:
    """Report ``(rank, [per seed: {"calls", "loads" [steps, L, P], "recv_counts" [steps, L], "mismatches"}])``."""
    join_serving_group(rank, world, store_port)
    runs = []
    for seed in seeds:
        sim = SimServingRank(serving_spec(rank, world, store_port, steps, seed))
        hooks = RecordingHooks()
        sim.run(SimpleNamespace(hooks=hooks))
        runs.append(
            {
                "calls": hooks.calls,
                "loads": hooks.loads,
                "recv_counts": sim.recv_counts.tolist(),
                "mismatches": sim.mismatches,
            }
        )
    results.put((rank, runs))
    dist.destroy_process_group()
