"""Step 4's first part: spread the replicas of an expert that has more replicas than ranks.

Why: a rank's load is the sum of ``copies / replicas x load`` over the experts it holds. When an
expert's load changes between windows, every rank holding more than its share of that expert's
copies moves with it, and every rank holding fewer moves against it. An expert spread evenly
(every rank within one copy of every other) changes all ranks alike, which leaves the layer's
balance as it was. DeepSeek's greedy packing spreads such experts as a side effect (equal
replicas go round the ranks); the migration policy's count changes put new copies in the slots
the shrinking experts freed, so a hot expert that gained 30 copies on 16 ranks sat 0 to 4 to a
rank, and when it cooled in the next window the ranks with few of its copies carried the layer
(512 experts + 64 on 16 ranks, top-2, Zipf 1.4, an expert from nowhere taking 41% of a layer:
max / mean 1.35 after planning at 1.005, DeepSeek's placement 1.03).

Each exchange moves one copy of such an expert from the rank with the most copies to the rank
with the fewest, for the replica on that rank whose load is nearest its own (of an expert that is
not left less even). The planned load decides only how much may be given up for it: the pair's
larger load may end at most ``sigma`` times the moved replica's load above the layer's largest
rank before the pass (a copy too many on a rank weighs ``load change / replicas`` on it; with
``sigma`` 0.5, the exchange is made where that risk is at least the planned load it costs at a
50% change of the expert's load, the size of changes hot experts see between windows). The pass
spends step 4's room (two slots per exchange, also where an exchange changes a slot an earlier one
changed) before the soft maximum's pass spends what is left. An expert none of whose exchanges
fits is tried again once the layer has changed; one without load carries no risk and stays.

Experts with at most as many replicas as ranks are not spread (they move only as the replica
traded back, and then end no less even): step 2 already puts their copies on distinct ranks
where it can, and on the matrix (``bench/planner.py --matrix``) spreading them
too took room the soft maximum's pass uses better (391 instead of 392 cells, DeepSeek-V3 on 32
and 64 ranks losing up to 0.4 pp).
"""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.load_forecast import replica_shares
from eplb_service.placement import HOLDINGS_BLOCK_ENTRIES, rank_holdings

DEFAULT_SPREAD_SIGMA = 0.5
"""How far (in moved replica loads) a spreading exchange may take its pair above the layer's top."""


def spread_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    *,
    room: np.ndarray,
    sigma: float = DEFAULT_SPREAD_SIGMA,
    max_rounds: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Even the copies of every loaded expert with more replicas than ranks (a new array, and the room left).

    Args:
        phy2log: ``[L, P]`` placement whose replica counts are ``counts``.
        load: ``[L, N_log]`` load per logical expert; counts: ``[L, N_log]`` replicas per expert.
        num_ranks: EP ranks (divides ``P``).
        room: ``[L]`` slots each layer may still change (two per exchange).
        sigma: see the module docstring; max_rounds: upper bound on rounds (each makes one
            exchange per layer, or gives up one expert there until the layer next changes).

    Returns:
        ``(phy2log, room)``: the placement after the exchanges and each layer's room left.
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    room = np.asarray(room, dtype=np.float64).copy()
    num_layers, num_physical = out.shape
    slots = num_physical // num_ranks if num_ranks else 0
    if num_ranks < 2 or slots == 0:
        return out, room
    crowded = counts > num_ranks  # [L, N]: experts that can sit unevenly with a copy on every rank
    layers = np.flatnonzero((room >= 2) & crowded.any(axis=1) & (load.sum(axis=1) > 0))
    if layers.size == 0:
        return out, room
    block = max(1, HOLDINGS_BLOCK_ENTRIES // (num_ranks * load.shape[1]))
    for start in range(0, layers.size, block):
        part = layers[start : start + block]
        out[part], room[part] = _spread_layers(
            out[part], load[part], counts[part], num_ranks, room[part], sigma, max_rounds
        )
    return out, room


def _spread_layers(
    sub: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    left: np.ndarray,
    sigma: float,
    max_rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spread_search` on one block of layers that all have room and a crowded expert;
    changes ``sub`` and ``left`` in place (the caller's copies of its rows) and returns them."""
    num_layers, num_physical = sub.shape
    slots = num_physical // num_ranks
    replica = replica_shares(load, counts)  # [l, N]
    held = rank_holdings(sub, load.shape[1], num_ranks)  # [l, R, N] copies per rank
    slot_load = replica[np.arange(num_layers)[:, None], sub]
    rank_load = slot_load.reshape(num_layers, num_ranks, slots).sum(axis=2)
    top = rank_load.max(axis=1)
    # Experts not to spread: those with at most one copy per rank, and those no exchange could
    # move since the layer last changed (an exchange elsewhere can make room for theirs).
    crowded = counts > num_ranks
    settled = ~crowded
    local = np.arange(slots)
    most, fewest = held.max(axis=1), held.min(axis=1)  # [l, N] copies on the fullest and emptiest rank
    for _ in range(max_rounds):
        uneven = most - fewest
        risk = np.where(~settled & (uneven >= 2), replica * (uneven - 1), -1.0)
        act = np.flatnonzero((left >= 2) & (risk.max(axis=1) > 0))
        if act.size == 0:
            break
        exp = risk[act].argmax(axis=1)
        copies = held[act, :, exp]  # [a, R]
        # The rank with the most copies (of those, the most loaded) gives one to the rank with
        # the fewest (of those, the least loaded); rank loads are shares of the layer, below 1.
        giver = (copies + 0.5 * rank_load[act]).argmax(axis=1)
        taker = (copies + 0.5 * rank_load[act]).argmin(axis=1)
        take_slots = taker[:, None] * slots + local
        other = sub[act[:, None], take_slots]  # [a, S] the experts the taker could send back
        # The expert sent back must not end less even than it is (or than one copy apart).
        give_after = held[act[:, None], giver[:, None], other] + 1
        keep_after = held[act[:, None], taker[:, None], other] - 1
        other_after = np.maximum(most[act[:, None], other], give_after) - np.minimum(
            fewest[act[:, None], other], keep_after
        )
        delta = replica[act, exp][:, None] - slot_load[act[:, None], take_slots]
        pair_max = np.maximum(rank_load[act, giver][:, None] - delta, rank_load[act, taker][:, None] + delta)
        ok = (
            (other != exp[:, None])
            & (other_after <= np.maximum(uneven[act[:, None], other], 1))
            & (pair_max <= (top[act] + sigma * replica[act, exp])[:, None] + 1e-12)
        )
        score = np.where(ok, np.abs(delta), np.inf)
        pick = score.argmin(axis=1)
        found = np.isfinite(score[np.arange(act.size), pick])
        settled[act[~found], exp[~found]] = True
        act, exp, giver, taker, pick = act[found], exp[found], giver[found], taker[found], pick[found]
        if act.size == 0:
            continue
        slot_b = taker * slots + pick
        slot_a = giver * slots + (sub[act[:, None], giver[:, None] * slots + local] == exp[:, None]).argmax(axis=1)
        partner = sub[act, slot_b]
        val_a, val_b = slot_load[act, slot_a], slot_load[act, slot_b]
        sub[act, slot_a], sub[act, slot_b] = partner, exp
        slot_load[act, slot_a], slot_load[act, slot_b] = val_b, val_a
        rank_load[act, giver] -= val_a - val_b
        rank_load[act, taker] += val_a - val_b
        held[act, giver, exp] -= 1
        held[act, taker, exp] += 1
        held[act, giver, partner] += 1
        held[act, taker, partner] -= 1
        for changed in (exp, partner):
            copies = held[act, :, changed]
            most[act, changed], fewest[act, changed] = copies.max(axis=1), copies.min(axis=1)
        left[act] -= 2
        settled[act] = ~crowded[act]
    return sub, left
