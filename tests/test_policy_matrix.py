"""The workload matrix of ``bench/planner.py --matrix``: a fast subset of its cells meets the targets.

Each cell runs exactly as in the full matrix (same loads, layers and rebalances), so a number here
is the number in ``bench/README.md``'s table.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bench.planner as planner
from bench.planner import (
    BALANCE_TARGET_PP,
    MATRIX_SHAPES,
    MOVED_TARGET,
    Workload,
    cap_shares,
    drift_window,
    matrix_loads,
    matrix_windows,
    run_cell,
)
from eplb_service.coordinator import policy_exact, policy_lookahead, spend_control
from eplb_service.coordinator.policy_deepseek import balanced_packing
from eplb_service.coordinator.policy_lookahead import roomy_costs
from eplb_service.coordinator.policy_migration import fine_pass_fits, packing_lower_bound


def shape(label: str):
    (match,) = [s for s in MATRIX_SHAPES if s.label.startswith(label)]
    return match


CELLS = [
    # The held-out workload of issue 16: 64 experts + 16 redundant on 8 ranks, Zipf, a swap per
    # layer every window, strong sampling noise.
    ("DeepSeek-V2-Lite EP8: 64+16", Workload("zipf-1.0", "swap", "high")),
    ("Mixtral-8x7B EP4: 8+0", Workload("zipf-1.0", "slow", "high")),
    ("DeepSeek-V2-Lite EP32: 64+0", Workload("lognormal", "abrupt", "low")),
    ("Qwen3-235B-A22B EP16: 128+32", Workload("lognormal", "slow", "low")),
    # Held to its 8 groups on 2 nodes, as DeepSeek is; its abrupt cells move whole groups
    # between nodes and miss the slots target (bench/README.md), so a swap cell stands for it.
    ("DeepSeek-V3 EP16: 256+0", Workload("zipf-1.4", "swap", "high")),
    ("DeepSeek-V3 EP32: 256+32 on 32 (9/rank, 8 groups", Workload("zipf-1.0", "swap", "low")),
    ("DeepSeek-V3 EP144: 256+32", Workload("zipf-1.0", "abrupt", "high")),
    ("Qwen3.5-397B-A17B EP8: 512+32", Workload("zipf-0.6", "slow", "low")),
    ("Qwen3.5-397B-A17B EP16: 512+0", Workload("zipf-0.6", "swap", "high")),
    ("Qwen3.5-397B-A17B EP32: 512+256", Workload("zipf-1.0", "abrupt", "low")),
    # (Its slow cells move nothing after the first plan's packing: nothing to assert a sequence on.)
    ("Qwen3.5-397B-A17B EP256: 512+0", Workload("lognormal", "abrupt", "low")),
    ("DeepSeek-V2-Lite EP16: 64+32", Workload("zipf-1.4", "swap", "high")),
    ("DeepSeek-V3 EP32: 256+32 on 32 (9/rank)", Workload("zipf-0.6", "swap", "low")),
    ("Qwen3-30B-A3B EP8: 128+0", Workload("zipf-0.6", "slow", "high")),
    ("Qwen3-235B-A22B EP64: 128+64", Workload("lognormal", "slow", "high")),
    ("DeepSeek-V3 EP64: 256+64", Workload("zipf-1.0", "slow", "high")),
    # Slowly drifting coarse layers that the fine pass (step 4 of the policy) brings within the
    # 0.5 pp of DeepSeek's next window; each missed the balance target without it.
    ("DeepSeek-V3 EP144: 256+32", Workload("zipf-1.0", "slow", "low")),
    ("Qwen3-235B-A22B EP64: 128+64", Workload("lognormal", "slow", "low")),
    ("Qwen3-235B-A22B EP16: 128+32", Workload("zipf-1.4", "slow", "high")),
    # Hot experts hopping to another expert every window: the forecast and the price on moves
    # (step 6 of the policy, from the persistence of the last two windows) keep these within a
    # fifth of DeepSeek's slots; each moved 24-63% of them without it.
    # Slow drift in coarse layers: the 10% slack on replica counts (step 1) stops counts flipping
    # at the bound; each missed the balance target without it (-1.30 pp and -0.53 pp).
    ("Qwen3-235B-A22B EP64: 128+64", Workload("zipf-1.4", "slow", "low")),
    ("DeepSeek-V2-Lite EP16: 64+32", Workload("zipf-1.4", "slow", "low")),
    # Slow drift over 144 ranks of 2 slots: the fine pass lowering the soft maximum (spreading
    # the ranks crowding under the largest) took it from -0.98 pp to -0.32 pp.
    ("DeepSeek-V3 EP144: 256+32", Workload("lognormal", "slow", "low")),
    # A new hot expert that lasts: planning for the load as it is once most of the imbalance
    # lasts (persistence >= 0.6) took it from -0.82 pp (the shrunk forecast) to -0.08 pp.
    ("Qwen3.5-397B-A17B EP32: 512+256", Workload("zipf-0.6", "abrupt", "low")),
    # Mixtral 8+2 on 2 ranks, planned exactly (policy_exact: every one of the 280 layouts weighed):
    # slow drift, hopping and new hot experts. The swap search moved 24-37% of DeepSeek's slots
    # in the abrupt cells; one re-laid layer moves a hot expert's new copy and the cold expert
    # it displaces together.
    ("Mixtral-8x7B EP2: 8+2", Workload("zipf-1.4", "slow", "low")),
    ("Mixtral-8x7B EP2: 8+2", Workload("zipf-1.0", "slow", "low")),
    ("Mixtral-8x7B EP2: 8+2", Workload("zipf-1.4", "swap", "high")),
    ("Mixtral-8x7B EP2: 8+2", Workload("lognormal", "swap", "low")),
    ("Mixtral-8x7B EP2: 8+2", Workload("zipf-1.0", "abrupt", "low")),
    ("Mixtral-8x7B EP2: 8+2", Workload("lognormal", "abrupt", "high")),
    # Mixtral 8+4 on 4 ranks of 3 (74 900 layouts): each plan takes the cheapest change of up to
    # two slots (policy_exact.local_phy2log). Its abrupt cells moved 24-38% of DeepSeek's slots
    # with the swap search.
    ("Mixtral-8x7B EP4: 8+4", Workload("zipf-1.4", "slow", "high")),
    ("Mixtral-8x7B EP4: 8+4", Workload("zipf-1.4", "slow", "low")),
    ("Mixtral-8x7B EP4: 8+4", Workload("zipf-1.0", "swap", "high")),
    ("Mixtral-8x7B EP4: 8+4", Workload("zipf-1.0", "abrupt", "low")),
    ("Mixtral-8x7B EP4: 8+4", Workload("lognormal", "abrupt", "high")),
    # Mixtral 8+0 on 4 ranks of 2 where the hottest expert hops every window (persistence under
    # 0.6): every one of the 105 pairings weighed (policy_exact). The swap search priced each
    # exchange out and sat 0.5-0.8 pp under DeepSeek's balance.
    ("Mixtral-8x7B EP4: 8+0", Workload("zipf-1.4", "swap", "high")),
    # Mixtral 8+0 where a cold expert turns hot in a quarter of the layers per window: planned a
    # few windows ahead under the law of surges read from the windows (policy_lookahead), from a
    # first pairing that leaves cold experts together. The swap search moved 33-50% of DeepSeek's
    # slots here.
    ("Mixtral-8x7B EP4: 8+0", Workload("zipf-1.4", "abrupt", "low")),
    ("Mixtral-8x7B EP4: 8+0", Workload("zipf-1.4", "abrupt", "high")),
    ("Mixtral-8x7B EP4: 8+0", Workload("zipf-1.0", "abrupt", "high")),
    # Spending far below the slot budget: the coordinator's spend controller makes moves cheaper
    # (the price where hot experts hop, the fine pass's room where the load drifts slowly).
    ("Qwen3-235B-A22B EP64: 128+64", Workload("zipf-0.6", "slow", "low")),
]


@pytest.mark.parametrize("label,workload", CELLS, ids=[f"{s.split(':')[0]}-{w.label}" for s, w in CELLS])
def test_cell_meets_the_targets(label, workload):
    result = run_cell(shape(label), workload, decayed=False)
    assert result.balance_pp >= BALANCE_TARGET_PP, (
        f"next window {result.migration.next_window:.4f} vs DeepSeek {result.deepseek.next_window:.4f}"
    )
    assert result.moved_share <= MOVED_TARGET, f"moved {result.migration.moved} vs DeepSeek {result.deepseek.moved}"
    # The sequence is the policy's own: every measured rebalance started from its previous plan.
    assert result.migration.moved > 0 and result.deepseek.moved > 0


def test_hopping_hot_experts_cost_a_fifth_of_the_slots_only_with_the_persistence(monkeypatch):
    """The same cell with the persistence withheld (plan for the last window as it is) spends more
    for less: with the lead's price kept off its exactly planned layers it moves over a fifth of
    DeepSeek's slots, and with that price on it keeps within the budget only by spending most of
    its lead (about 2 points less ahead than with the persistence)."""
    cell, workload = shape("Mixtral-8x7B EP4: 8+4"), Workload("zipf-1.0", "swap", "high")
    with_it = run_cell(cell, workload, decayed=False)
    without = run_cell(cell, workload, decayed=False, forecast=False)
    assert with_it.moved_share <= MOVED_TARGET and without.moved_share <= MOVED_TARGET
    assert with_it.balance_pp > without.balance_pp + 1.0
    monkeypatch.setattr(spend_control, "exact_price_scale", lambda state: 1.0)
    no_lead_price = run_cell(cell, workload, decayed=False, forecast=False)
    assert no_lead_price.moved_share > MOVED_TARGET


@pytest.mark.parametrize(
    "label,workload,misses_without",
    [
        ("Qwen3-235B-A22B EP64", Workload("zipf-0.6", "slow", "low"), True),
        # 512-slot layers: the controller's wider room also runs step 4 there (screened per layer),
        # which at the defaults skips layers of more than 384 slots. Without it this cell read
        # -0.70 pp at 2% of DeepSeek's slots where it was first measured (AVX-512); it is -0.09
        # with AVX2 alone and -0.43 with neither: its high-noise loads tie often, and numpy's
        # default sort, which DeepSeek's packing uses as vLLM's does (the reference and the first
        # plan), orders equal loads by the CPU's vector instructions. So here the test asserts the
        # controller's gain, not a miss without it.
        ("Qwen3.5-397B-A17B EP16", Workload("zipf-1.4", "abrupt", "high"), False),
    ],
)
def test_cells_spending_far_below_the_budget_meet_the_balance_target_only_with_the_spend_controller(
    label, workload, misses_without
):
    """At the policy's default settings these cells move under a tenth of DeepSeek's slots, and the
    first two lose more than 0.5 pp; the controller spends more of the budget (still within it) on
    balance: at least 0.3 pp more in each (0.48-0.70 measured with AVX2 alone or with neither AVX2
    nor AVX-512), within the balance target."""
    with_it = run_cell(shape(label), workload, decayed=False)
    without = run_cell(shape(label), workload, decayed=False, spend_control=False)
    assert with_it.balance_pp >= BALANCE_TARGET_PP
    assert with_it.balance_pp >= without.balance_pp + 0.3
    if misses_without:
        assert without.balance_pp < BALANCE_TARGET_PP
    assert without.moved_share < 0.1 and without.moved_share < with_it.moved_share <= MOVED_TARGET


def test_a_cell_spending_just_over_the_budget_at_the_defaults_meets_it_only_with_dearer_moves():
    """DeepSeek-V3 on 32 ranks with its hierarchy, a lasting new hot expert in a quarter of the
    layers per window: at the defaults it moves just over a fifth of DeepSeek's slots (with
    balance in hand); close to the line the controller narrows the fine pass (scale above 1) and
    brings it under."""
    cell = shape("DeepSeek-V3 EP32: 256+32 on 32 (9/rank, 8 groups")
    workload = Workload("zipf-1.4", "abrupt", "low")
    with_it = run_cell(cell, workload, decayed=False)
    without = run_cell(cell, workload, decayed=False, spend_control=False)
    assert with_it.moved_share <= MOVED_TARGET < without.moved_share
    assert min(with_it.balance_pp, without.balance_pp) >= BALANCE_TARGET_PP


@pytest.mark.parametrize(
    "label,workload",
    [
        # Its hierarchy, a swap per layer and window: -0.82 pp from the repaired layout.
        ("DeepSeek-V3 EP32: 256+32 on 32 (9/rank, 8 groups", Workload("zipf-1.4", "swap", "low")),
    ],
)
def test_cells_meet_the_targets_only_when_the_first_plan_is_deepseek_s_packing(label, workload):
    """The first plan, from vLLM's initial placement, lays DeepSeek's packing
    (``plan_rebalance(fresh=True)``): later plans repair a packing, not an arbitrary layout.
    (Layers of ranks of 2 slots without redundant ones take the roomiest best pairing instead:
    :func:`test_surges_are_met_from_a_roomy_first_pairing_and_not_from_deepseek_s`.)"""
    packed = run_cell(shape(label), workload, decayed=False)
    repaired = run_cell(shape(label), workload, decayed=False, fresh_start=False)
    assert packed.meets_targets and not repaired.meets_targets
    assert packed.migration.warmup_moved == packed.deepseek.warmup_moved > repaired.migration.warmup_moved


def test_surges_are_met_from_a_roomy_first_pairing_and_not_from_deepseek_s(monkeypatch):
    """Mixtral 8+0 on 4 GPUs, a cold expert turning hot in a quarter of the layers per window:
    the first plan's best pairing that keeps cold experts together (``roomy_costs``) leaves a
    surge a cold partner; from DeepSeek's packing, which gives every cold expert a hot partner,
    the same lookahead spends more slots answering surges and still misses."""
    cell, workload = shape("Mixtral-8x7B EP4: 8+0"), Workload("zipf-1.4", "abrupt", "low")
    roomy = run_cell(cell, workload, decayed=False)
    assert roomy.meets_targets, (roomy.balance_pp, roomy.moved_share)
    assert roomy.migration.warmup_moved != roomy.deepseek.warmup_moved  # not DeepSeek's packing

    def most_even(space, load):  # the same best pairings, the most even of them taken
        costs = roomy_costs(space, load)
        return np.where(costs <= 0, -costs, costs)

    monkeypatch.setattr(policy_lookahead, "roomy_costs", most_even)
    even = run_cell(cell, workload, decayed=False)
    assert not even.meets_targets
    assert even.moved_share > roomy.moved_share


def test_loads_respect_the_top_k_cap_and_the_seed():
    cell = shape("Qwen3.5-397B-A17B EP8")
    loads = matrix_loads(cell, Workload("zipf-1.4", "abrupt", "high"), layers=4, windows=3, seed=7)
    again = matrix_loads(cell, Workload("zipf-1.4", "abrupt", "high"), layers=4, windows=3, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(loads, again))
    tokens = 256 * cell.experts
    for window in loads:
        assert window.shape == (4, cell.experts) and (window.sum(axis=1) == tokens).all()
    shares = cap_shares(np.array([[0.7, 0.2, 0.1, 0.0]]), 0.4)
    assert np.allclose(shares, [[0.4, 0.4, 0.2, 0.0]])


def test_each_window_keeps_the_hidden_popularity_that_drew_it():
    """``matrix_windows`` (what ``bench/oracle_pairs.py``'s generator rule draws futures from)
    gives the matrix's loads, and each window's logits are what its tokens were sampled from."""
    cell = shape("Mixtral-8x7B EP4: 8+0")
    workload = Workload("lognormal", "swap", "low")
    windows = matrix_windows(cell, workload, layers=6, windows=4, seed=11)
    loads = matrix_loads(cell, workload, layers=6, windows=4, seed=11)
    assert all(np.array_equal(w.loads, x) for w, x in zip(windows, loads))
    assert np.array_equal(windows[0].logits, windows[0].base)  # no drift before the first window
    for window in windows:
        prob = np.exp(window.logits - window.logits.max(axis=1, keepdims=True))
        prob = cap_shares(prob / prob.sum(axis=1, keepdims=True), 1.0 / cell.top_k)
        shares = window.loads / window.loads.sum(axis=1, keepdims=True)
        assert np.abs(shares - prob).max() < 0.02  # 16384 tokens per expert: under 1% noise
    # A swap lasts: the base is a per-layer permutation of the first window's, never a new value.
    assert np.array_equal(np.sort(windows[-1].base, axis=1), np.sort(windows[0].base, axis=1))
    assert not np.array_equal(windows[-1].base, windows[0].base)
    # Drift makes new arrays: the window it started from keeps its own.
    before = windows[1].logits.copy()
    drift_window(windows[1].logits, windows[1].base, "abrupt", np.random.default_rng(0))
    assert np.array_equal(windows[1].logits, before)


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.integers(1, 8),
    per_rank=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    skew=st.sampled_from([0.3, 1.0, 2.5]),
)
def test_lower_bound_never_exceeds_a_real_packing(ranks, per_rank, seed, skew):
    rng = np.random.default_rng(seed)
    slot_load = rng.lognormal(0.0, skew, size=(3, ranks * per_rank))
    bound = packing_lower_bound(slot_load, ranks)
    assert (bound >= slot_load.sum(axis=1) / ranks - 1e-12).all()
    assert (bound >= slot_load.max(axis=1) - 1e-12).all()
    for pack in (balanced_packing(slot_load, ranks).pack_index, np.argsort(rng.random(slot_load.shape)) // per_rank):
        packed = np.zeros((3, ranks))
        np.add.at(packed, (np.repeat(np.arange(3), ranks * per_rank), pack.ravel()), slot_load.ravel())
        assert (bound <= packed.max(axis=1) + 1e-12).all()


def test_held_out_cells_are_in_the_issues_scope_and_off_the_matrix():
    """``--held-out``: shapes the policy was not tuned on, within issue 16's ranges, the same per seed."""
    from bench.planner import WORKLOADS, held_out_cells

    cells = held_out_cells(200, seed=3)
    assert len(cells) == 200 and held_out_cells(200, seed=3) == cells and held_out_cells(200, seed=4) != cells
    tuned = {(s.experts, s.redundant, s.ranks) for s in MATRIX_SHAPES}
    off_matrix = 0
    for shape, workload in cells:
        assert shape.slots % shape.ranks == 0 and 2 <= shape.slots // shape.ranks <= 68
        assert 0 <= shape.redundant <= shape.experts // 2 and 2 * shape.top_k <= shape.experts
        assert workload in WORKLOADS
        off_matrix += (shape.experts, shape.redundant, shape.ranks) not in tuned
    assert off_matrix >= 180
    assert len({s.experts for s, _ in cells}) >= 6 and len({w for _, w in cells}) >= 20


def test_a_held_out_cell_runs_as_a_matrix_cell():
    """Both policies run its whole sequence, as on a matrix cell."""
    from bench.planner import held_out_cells

    shape, workload = held_out_cells(1, seed=0)[0]
    result = run_cell(shape, workload, rebalances=2, decayed=False)
    assert result.deepseek.moved > 0 and 0 < result.migration.next_window <= 1


def test_a_hot_expert_s_copies_stay_spread_as_it_fades():
    """Held-out cell 17 of ``--held-out 100 --seed 1``: 32 experts + 16 on 4 ranks, a new hot
    expert (24 copies) in a quarter of the layers per window, fading after. Step 2 keeps each
    expert's copies within one of even on every rank, so its fading changes every rank alike:
    -0.89 pp of DeepSeek's next-window balance with seed 0 (-1.57 when copies were dropped from
    the most loaded ranks and added to the lightest, 8/4/6/6 after a few windows)."""
    from bench.planner import held_out_cells

    shape, workload = held_out_cells(100, seed=1)[17]
    assert (shape.experts, shape.redundant, shape.ranks, workload) == (32, 16, 4, Workload("zipf-1.4", "abrupt", "low"))
    result = run_cell(shape, workload, decayed=False)
    assert result.balance_pp > -1.2, f"{result.balance_pp:+.2f} pp"


def test_mixtral_8_plus_0_on_2_gpus_stays_within_the_budget_with_the_best_split_and_the_held_price(monkeypatch):
    """Off the matrix (``--small-layers``): Mixtral's 8 experts on 2 GPUs of 4 slots, slowly
    drifting, well ahead of DeepSeek's balance. The first plan lays the best split (DeepSeek's
    greedy packing missed it, and the next plan spent the difference), and the balance lead's
    dearer price holds down to SPEND_LOW rather than swinging back under the cap. Without the
    held price the run goes past a fifth of DeepSeek's slots."""
    cell = next(s for s in planner.SMALL_LAYER_SHAPES if (s.experts, s.ranks) == (8, 2))
    workload = Workload("zipf-0.6", "slow", "low")
    held = run_cell(cell, workload, decayed=False)
    assert held.meets_targets and held.balance_pp > 1.0  # a lead of more than a point, kept

    def price_halves_under_the_cap(state, spent, reference, **kwargs):
        """The rule before: under the cap the price halves, held or not."""
        new = spend_control.update_spend(state, spent, reference, **kwargs)
        under_the_cap = new.spent <= spend_control.SPEND_CAP * new.reference  # the faded tallies
        if kwargs.get("lead") is not None and new.price_scale == state.price_scale and under_the_cap:
            new = replace(new, price_scale=max(new.price_scale / spend_control.SPEND_STEP, 1.0))
        return new

    monkeypatch.setattr(planner, "update_spend", price_halves_under_the_cap)
    swinging = run_cell(cell, workload, decayed=False)
    assert swinging.moved_share > MOVED_TARGET >= held.moved_share


def test_dbrx_on_8_gpus_slowly_drifting_spends_its_room_on_balance(monkeypatch):
    """Off the matrix (``--sixteen-experts``): DBRX's 16 experts + 8 redundant on 8 GPUs of 3
    slots, slowly drifting, low noise. The controller's scale sits at its floor (6-9% of
    DeepSeek's slots); now that a cheap scale opens step 4's fine pass in layers of 16-24 slots
    every such cell is within both targets and better balanced than with the room closed, where
    two of them fall more than half a point behind DeepSeek."""
    (cell,) = [s for s in planner.SIXTEEN_EXPERT_SHAPES if s.label.startswith("DBRX EP8")]
    workloads = [
        Workload(popularity, "slow", "low") for popularity in ("zipf-0.6", "zipf-1.0", "zipf-1.4", "lognormal")
    ]
    opened = [run_cell(cell, workload, decayed=False) for workload in workloads]
    assert all(result.meets_targets for result in opened), [(r.balance_pp, r.moved_share) for r in opened]
    monkeypatch.setattr(spend_control, "room_follows_scale", fine_pass_fits)  # the rule before
    closed = [run_cell(cell, workload, decayed=False) for workload in workloads]
    assert sum(result.balance_pp < BALANCE_TARGET_PP for result in closed) >= 2
    assert all(o.balance_pp > c.balance_pp + 0.2 for o, c in zip(opened, closed, strict=True))


def pooled_cell(shape: planner.MatrixShape, workload: Workload) -> planner.PooledCell:
    """One cell over seeds 0-2, pooled as ``--seeds 0,1,2`` pools it (the policy under whatever the
    test has patched at the time of the call)."""
    (cell,) = planner.pool_seeds([[run_cell(shape, workload, decayed=False, seed=s)] for s in (0, 1, 2)])
    return cell


def test_ahead_of_deepseek_over_a_lasting_load_the_lead_s_price_keeps_a_held_out_cell_within_the_budget(
    monkeypatch,
):
    """A random cell off the matrix (``--held-out 100 --seed 2``, cell 81: 32 experts on 4 GPUs
    of 8 slots, Zipf 0.6, swap, low noise), pooled over seeds 0-2: ahead of DeepSeek's balance,
    so the controller raises step 6's price, but the load lasts (persistence about 0.9) and the
    price fades with its square. Floored at LEAD_PRICE_FLOOR while the balance leads, the cell
    keeps within a fifth of DeepSeek's slots, still ahead; without the floor it goes past."""
    shape, workload = planner.held_out_cells(100, 2)[81]
    assert (shape.experts, shape.redundant, shape.ranks, shape.top_k) == (32, 0, 4, 2)
    assert workload == Workload("zipf-0.6", "swap", "low")

    floored = pooled_cell(shape, workload)
    assert floored.meets_targets and floored.balance_pp > 0, (floored.balance_pp, floored.moved_share)
    monkeypatch.setattr(spend_control, "LEAD_PRICE_FLOOR", 0.0)  # the price before
    fading = pooled_cell(shape, workload)
    assert fading.moved_share > MOVED_TARGET >= floored.moved_share


def test_mixtral_on_2_gpus_under_a_lasting_drift_trades_a_little_of_its_balance_for_the_budget(monkeypatch):
    """Off the matrix (``--small-layers``): Mixtral's 8 experts on 2 GPUs of 4 slots, log-normal,
    slowly drifting, low noise, pooled over seeds 0-2: about level with DeepSeek's balance and
    over the cap, so the lead's price rises (layers under 25 slots have no other lever) and the
    cell keeps within a fifth of DeepSeek's slots, still within half a point of its balance. Two
    rules raise it there: the brake while level (this deployment has no hierarchy and is not
    planned ahead), whatever the persistence, and the one for a lasting load in small layers.
    Without either the price only holds and the cell goes past."""
    cell = next(s for s in planner.SMALL_LAYER_SHAPES if (s.experts, s.ranks) == (8, 2))
    workload = Workload("lognormal", "slow", "low")

    lasting = pooled_cell(cell, workload)
    assert lasting.meets_targets, (lasting.balance_pp, lasting.moved_share)
    real_update = planner.update_spend

    def without(*names):
        def update(state, spent, reference, **kwargs):
            for name in names:
                kwargs.pop(name, None)
            return real_update(state, spent, reference, **kwargs)

        return update

    monkeypatch.setattr(planner, "update_spend", without("persistence"))
    level_only = pooled_cell(cell, workload)
    assert level_only.meets_targets, (level_only.balance_pp, level_only.moved_share)
    monkeypatch.setattr(planner, "update_spend", without("persistence", "level_brake"))
    unknown = pooled_cell(cell, workload)
    assert unknown.moved_share > MOVED_TARGET >= lasting.moved_share


def test_mixtral_8_plus_2_under_new_hot_experts_meets_the_budget_only_with_the_layer_price(monkeypatch):
    """Mixtral 8+2 on 2 GPUs, Zipf 1.4, a new hot expert in a quarter of the layers per window, low
    noise, pooled over seeds 0-2: at a price per slot alone (0.05, the price before) it moves more
    than a fifth of DeepSeek's slots; with the price per changed layer, which holds back the
    one-slot plans that follow a fading hot expert, it keeps within both targets."""
    cell = shape("Mixtral-8x7B EP2: 8+2")
    workload = Workload("zipf-1.4", "abrupt", "low")
    charged = pooled_cell(cell, workload)
    assert charged.meets_targets, (charged.balance_pp, charged.moved_share)
    monkeypatch.setattr(policy_exact, "SPARE_MOVE_PRICE", policy_exact.EXACT_MOVE_PRICE)
    monkeypatch.setattr(policy_exact, "SPARE_LAYER_PRICE", 0.0)
    per_slot = pooled_cell(cell, workload)
    assert per_slot.moved_share > MOVED_TARGET >= charged.moved_share, (per_slot.moved_share, charged.moved_share)


def test_small_layers_clearly_ahead_of_deepseek_spend_the_lead_instead_of_slots(monkeypatch):
    """Off the matrix (``--spare-layers``): 8 experts + 2 on 2 GPUs, top-4, log-normal, a hot
    expert trading places every window, low noise, pooled over seeds 0-2. The layers are planned
    exactly and stay well ahead of DeepSeek's balance; with the lead's price on them while the
    lead is over half a point (``exact_price_scale``) the cell keeps within a fifth of DeepSeek's
    slots, still ahead. Without it, it stays further ahead at more than a fifth."""
    (cell,) = [s for s in planner.SPARE_LAYER_SHAPES if (s.experts, s.redundant, s.ranks, s.top_k) == (8, 2, 2, 4)]
    workload = Workload("lognormal", "swap", "low")
    spending = pooled_cell(cell, workload)
    assert spending.meets_targets and spending.balance_pp > 0, (spending.balance_pp, spending.moved_share)
    monkeypatch.setattr(spend_control, "exact_price_scale", lambda state: 1.0)
    keeping = pooled_cell(cell, workload)
    assert keeping.balance_pp > spending.balance_pp
    assert keeping.moved_share > MOVED_TARGET >= spending.moved_share, (keeping.moved_share, spending.moved_share)
