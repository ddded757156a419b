"""Child target of tests/test_sim_mismatch_check.py: the simulation's serving loop, broken on purpose.

Each child joins a gloo serving group, then for every scenario builds a fresh
:class:`~eplb_service.sim.serving_loop.SimServingRank`, breaks its live state the way a faulty
commit would (the same on every rank, as a commit is), runs a few forward passes and reports its
own mismatch count. No agent and no coordinator: only the output check is under test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from serving_group import join_serving_group, serving_spec

from eplb_service.sim.serving_loop import SimServingRank
from eplb_service.sim.workload import popularity
from eplb_service.worker_agent.expert_model import map_tensors

SCENARIOS = ("intact", "maps_without_weights", "one_weight_slightly_off", "log2phy_left_stale")
"""``intact``: nothing broken. ``maps_without_weights``: two experts' slots swapped in the maps of
the last layer, weights left where they were (a commit that skipped its copies).
``one_weight_slightly_off``: one entry of the row holding the last layer's most popular expert is
off by 2**-10 (still exact in float32: any tolerance, not only a wrong expert, must show).
``log2phy_left_stale``: the last layer's ``phy2log`` and weight rows swapped as a commit would,
``log2phy``/``logcnt`` left as they were (a check through the live ``phy2log`` would agree)."""


def _swap_two_popular_experts(sim: SimServingRank, layer: int, seed: int) -> np.ndarray:
    """The last layer's ``phy2log`` with its two most popular experts' slots exchanged."""
    order = np.argsort(-popularity(sim.cfg, seed, layer, 0), kind="stable")
    a, b = int(order[0]), int(order[1])
    phy2log = sim.model.phy2log.numpy().copy()
    row = phy2log[layer]
    at_a, at_b = row == a, row == b
    row[at_a], row[at_b] = b, a
    return phy2log


def _break(sim: SimServingRank, scenario: str, seed: int) -> None:
    layer = sim.cfg.num_layers - 1  # not layer 0: a check that looks at one layer only must miss it
    if scenario == "intact":
        return
    if scenario == "one_weight_slightly_off":
        popular = int(np.argmax(popularity(sim.cfg, seed, layer, 0)))
        slot = int(np.flatnonzero(sim.model.phy2log[layer].numpy() == popular)[0])
        if slot // sim.spr == sim.rank:
            sim.model.expert_weights[layer][0][slot % sim.spr, 0] += 2.0**-10
        return
    new_phy2log = _swap_two_popular_experts(sim, layer, seed)
    p2l, l2p, cnt = map_tensors(new_phy2log, sim.cfg.num_logical, sim.model.log2phy.shape[2])
    if scenario == "maps_without_weights":
        sim.model.phy2log.copy_(p2l)
        sim.model.log2phy.copy_(l2p)
        sim.model.logcnt.copy_(cnt)
        return
    if scenario == "log2phy_left_stale":
        sim.model.phy2log.copy_(p2l)
        first = sim.rank * sim.spr
        experts = torch.from_numpy(new_phy2log[layer, first : first + sim.spr])
        w, b = sim.model.expert_weights[layer]
        w.copy_(sim.ref_w[layer, experts].reshape(sim.spr, -1))
        b.copy_(sim.ref_b[layer, experts])
        return
    raise ValueError(f"scenario {scenario!r} is not one of {SCENARIOS}")


def serve_broken(rank: int, world: int, store_port: int, steps: int, seed: int, results) -> None:
    """Report ``(rank, {"rank", "mismatches": {scenario: count}, "load": [L, P] of the intact run})``."""
    join_serving_group(rank, world, store_port)
    spec = serving_spec(rank, world, store_port, steps, seed)
    mismatches: dict[str, int] = {}
    load: list = []
    for scenario in SCENARIOS:
        sim = SimServingRank(spec)
        _break(sim, scenario, seed)
        for step in range(steps):
            sim.forward(step)
        mismatches[scenario] = sim.mismatches
        if scenario == "intact":
            load = sim.load_pass.tolist()
    results.put((rank, {"rank": rank, "mismatches": mismatches, "load": load}))
    dist.destroy_process_group()
