"""The surge law read from load windows (eplb_service/coordinator/surge_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service.coordinator.surge_model import PRIOR_REVERSION, SurgeTracker, centred_log_shares, seen_surges


def law_windows(
    windows: int, layers: int, experts: int, rate: float, reversion: float, jump: float, seed: int
) -> list[np.ndarray]:
    """Routed-token counts of a layer set under the module's law, with little sampling noise."""
    rng = np.random.default_rng(seed)
    level = np.log(1.0 / np.arange(1, experts + 1)) + 0.0
    level = np.stack([rng.permutation(level) for _ in range(layers)])
    logits = level.copy()
    out = []
    for _ in range(windows):
        out.append(rng.multinomial(200_000, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(float))
        logits = logits + reversion * (level - logits)
        colder = np.argsort(logits, axis=1)[:, : experts // 2]
        hit = rng.random(layers) < rate
        rows = np.flatnonzero(hit)
        pick = colder[rows, rng.integers(0, experts // 2, len(rows))]
        others = logits.max(axis=1)
        logits[rows, pick] = others[rows] + jump
    return out


def test_centred_log_shares_drop_the_layer_total_and_count_an_idle_expert_at_half_a_token():
    load = np.array([[4.0, 2.0, 0.0, 2.0]])
    centred = centred_log_shares(load)
    assert centred.sum() == pytest.approx(0.0, abs=1e-12)
    assert centred[0, 0] - centred[0, 1] == pytest.approx(np.log(2.0))
    assert centred[0, 1] - centred[0, 2] == pytest.approx(np.log(2.0 / 0.5))
    assert np.allclose(centred_log_shares(3 * load[:, [0, 1, 3]]), centred_log_shares(load[:, [0, 1, 3]]))


def test_a_surge_is_a_cold_expert_that_climbs_to_the_top():
    before = centred_log_shares(np.array([[8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0]]))
    after = centred_log_shares(
        np.array(
            [
                [8.0, 4.0, 2.0, 20.0],  # the coldest now on top: a surge
                [8.0, 12.0, 2.0, 1.0],  # the second on top: it was not in the colder half
                [8.0, 4.0, 2.0, 1.0],  # nothing changed
            ]
        )
    )
    assert seen_surges(before, after).tolist() == [3, -1, -1]


def test_the_tracker_reads_the_rate_fade_and_height_of_surges_it_was_not_told():
    tracker = SurgeTracker()
    assert tracker.model() is None
    for load in law_windows(12, 64, 8, rate=0.25, reversion=0.1, jump=float(np.log(2.0)), seed=3):
        tracker.add(load)
    model = tracker.model()
    assert model is not None and model.windows == 12
    assert model.rate == pytest.approx(0.25, abs=0.05)
    assert model.reversion == pytest.approx(0.1, abs=0.03)
    assert model.jump == pytest.approx(np.log(2.0), abs=0.1)
    assert model.level.shape == (64, 8)


def test_other_laws_are_read_as_they_are():
    tracker = SurgeTracker()
    for load in law_windows(12, 64, 8, rate=0.1, reversion=0.3, jump=1.0, seed=4):
        tracker.add(load)
    model = tracker.model()
    assert model is not None
    assert model.rate == pytest.approx(0.1, abs=0.04)
    assert model.reversion == pytest.approx(0.3, abs=0.06)
    assert model.jump == pytest.approx(1.0, abs=0.15)


def test_a_steady_load_has_no_surges_and_the_prior_fade():
    shares = np.random.default_rng(0).dirichlet(np.ones(8), size=16)
    tracker = SurgeTracker()
    for _ in range(6):
        tracker.add(100_000 * shares)
    model = tracker.model()
    assert model is not None
    assert model.rate == 0.0 and model.reversion == PRIOR_REVERSION
    assert np.allclose(model.level, centred_log_shares(100_000 * shares))


def test_a_gap_reads_no_surge_across_it_and_a_new_shape_starts_over():
    calm = np.tile([8.0, 4.0, 2.0, 1.0], (4, 1))
    hot = np.tile([8.0, 4.0, 2.0, 40.0], (4, 1))
    tracker = SurgeTracker()
    tracker.add(calm)
    tracker.add(hot, follows=False)
    assert tracker.model() is None  # no pair of consecutive windows yet
    tracker.add(calm)
    tracker.add(hot)
    model = tracker.model()
    assert model is not None and model.rate == pytest.approx(
        0.5
    )  # of the two pairs, the climb (calm -> hot), not the fall back
    tracker.add(np.ones((2, 4)))
    assert tracker.windows == 1 and tracker.model() is None
    model_rows = SurgeTracker()
    for load in (calm, hot):
        model_rows.add(load)
    part = model_rows.model()
    assert part is not None
    assert part.select(slice(1, 3)).level.shape == (2, 4)
    assert part.select(np.array([0, 3])).rate == part.rate


def hop_windows(windows: int, layers: int, experts: int, hop: float, seed: int) -> list[np.ndarray]:
    """Routed-token counts where, with chance ``hop`` per layer and window, the hottest expert trades
    places with another one (each alike) and the new arrangement lasts."""
    rng = np.random.default_rng(seed)
    level = np.log(1.0 / np.arange(1, experts + 1))
    logits = np.stack([rng.permutation(level) for _ in range(layers)])
    out = []
    for _ in range(windows):
        out.append(rng.multinomial(200_000, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(float))
        rows = np.flatnonzero(rng.random(layers) < hop)
        top = logits[rows].argmax(axis=1)
        other = (top + rng.integers(1, experts, len(rows))) % experts
        logits[rows, top], logits[rows, other] = logits[rows, other], logits[rows, top]
    return out


@pytest.mark.parametrize("hop", [0.3, 0.6, 0.9])
def test_the_tracker_reads_how_much_of_the_hottest_expert_s_lead_is_gone_a_window_later(hop):
    tracker = SurgeTracker()
    for load in hop_windows(10, 64, 8, hop, seed=5):
        tracker.add(load)
    model = tracker.model()
    assert model is not None and model.hop == pytest.approx(hop, abs=0.08)
    assert model.select(slice(0, 2)).hop == model.hop


def test_surges_that_fade_and_a_steady_load_read_little_or_no_hop():
    surging = SurgeTracker()
    for load in law_windows(12, 64, 8, rate=0.25, reversion=0.1, jump=float(np.log(2.0)), seed=3):
        surging.add(load)
    model = surging.model()
    assert model is not None and model.hop < 0.2  # a surge keeps most of its lead from window to window
    steady = SurgeTracker()
    shares = np.random.default_rng(0).dirichlet(np.ones(8), size=16)
    for _ in range(4):
        steady.add(100_000 * shares)
    still = steady.model()
    assert still is not None and still.hop == pytest.approx(0.0, abs=1e-12)
    flat = SurgeTracker()
    flat.add(np.ones((2, 4)))
    flat.add(np.ones((2, 4)))
    level = flat.model()
    assert level is not None and level.hop == 0.0  # no lead to lose
