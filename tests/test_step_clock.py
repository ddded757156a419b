"""The step-clock comparison of two probes (``step_clock.probe_offset``)."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service.step_clock import probe_offset


def numpy_offset(ref: np.ndarray, other: np.ndarray, fit: float = 1 / 3, miss: float = 2 / 3) -> int | None:
    """The comparison as first written, with numpy medians: the oracle the list version must match."""
    n = ref.size
    delta = float(np.median(np.diff(ref)))
    if not delta > 0:
        return None
    radius = (n - 1) // 2
    errors = {
        d: float(np.median(np.abs(other[max(0, d) : n - max(0, -d)] - ref[max(0, -d) : n - max(0, d)])))
        for d in range(-radius, radius + 1)
        if n - abs(d) >= 3
    }
    ranked = sorted(errors, key=lambda d: errors[d])
    if errors[ranked[0]] < fit * delta and errors[ranked[1]] > miss * delta:
        return ranked[0]
    return None


def probe(first_step: int, step_s: float = 0.05, jitter_s: float = 0.0, seed: int = 0) -> np.ndarray:
    """End times of 7 steps from ``first_step`` on a rank stepping every ``step_s``."""
    noise = np.random.default_rng(seed).normal(0.0, jitter_s, 7) if jitter_s else 0.0
    return (np.arange(first_step, first_step + 7) * step_s + noise).astype(np.float64)


@pytest.mark.parametrize("shift", [-2, -1, 0, 1, 3])
def test_a_rank_counting_steps_apart_is_found_by_its_shift(shift):
    assert probe_offset(probe(100), probe(100 - shift)) == shift


def test_jitter_as_large_as_a_step_and_times_that_are_not_finite_decide_nothing():
    assert probe_offset(probe(100), probe(100, jitter_s=0.05, seed=1)) is None
    bad = probe(100)
    bad[3] = np.inf
    assert probe_offset(probe(100), bad) is None and probe_offset(bad, probe(100)) is None
    assert probe_offset(probe(100)[:2], probe(100)[:2]) is None  # too short to compare


def test_the_list_arithmetic_matches_numpy_on_random_probes():
    rng = np.random.default_rng(7)
    decisive = 0
    for _ in range(3000):
        step_s = rng.uniform(0.005, 0.2)
        ref = probe(
            int(rng.integers(0, 10**6)), step_s, jitter_s=rng.uniform(0, step_s), seed=int(rng.integers(1 << 30))
        )
        other = ref + rng.integers(-3, 4) * step_s + rng.normal(0, rng.uniform(0, step_s), 7)
        found = probe_offset(ref, other)
        assert found == numpy_offset(ref, other)
        decisive += found is not None
    assert decisive > 500, "the random probes must exercise decisive shifts too, not only None"


@pytest.mark.parametrize("offset", [1, -1, 3])
def test_the_guard_halts_on_a_rank_counting_even_one_step_apart(offset):
    """One step apart is enough to split a commit: ``S`` would land on different forward passes,
    so the divergence guard halts on any nonzero offset, naming the rank and the count."""
    from types import SimpleNamespace

    from eplb_service.coordinator.guards import DivergenceGuard
    from eplb_service.logutil import rank_logger
    from eplb_service.step_clock import ClockState

    gauge = SimpleNamespace(labels=lambda rank: SimpleNamespace(set=lambda value: None))
    guard = DivergenceGuard(
        True, 5.0, SimpleNamespace(step_clock_offset=gauge), rank_logger("test.guards", "coordinator")
    )
    offsets = {0: 0, 1: 0}
    guard.clock_states = lambda alive: {r: ClockState(rank=r, reference=0, offset=offsets[r]) for r in alive}
    assert guard.clock_verdict([0, 1], complete=True, now=1.0) is None and not guard.clock_halt
    offsets[1] = offset
    why = guard.clock_verdict([0, 1], complete=True, now=2.0)
    assert why is not None and f"rank 1 counts {offset:+d} step(s) against rank 0" in why
    assert guard.clock_halt
