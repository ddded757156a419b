"""The step-clock watch's verdicts: how many probes an offset needs, which rank is the reference,
when a halted clock counts as aligned again, and what a re-registered reference is compared with.

Written against hand-made mutations of ``step_clock`` that the rest of the suite let through
(an offset declared on one probe, an aligned-again that took one zero among offsets, a
re-registered reference whose new probes were never compared)."""

from __future__ import annotations

import numpy as np

from eplb_service.step_clock import PROBE_RADIUS, StepClockWatch, probes_from_ring

STEP_S = 0.05


def beat(watch: StepClockWatch, rank: int, probes: list[int], shift: int = 0, wall_minus_mono: float = 1000.0) -> None:
    """``rank``'s probes at ``probes``, counting ``-shift`` steps against a rank with ``shift`` 0;
    its monotonic clock reads ``wall - wall_minus_mono``."""
    times = [
        [(k + j + shift) * STEP_S - wall_minus_mono for j in range(-PROBE_RADIUS, PROBE_RADIUS + 1)] for k in probes
    ]
    watch.observe(rank, probes, times, wall_minus_mono)


def offsets(watch: StepClockWatch, ranks: list[int]) -> dict[int, int | None]:
    return {rank: state.offset for rank, state in watch.states(ranks).items()}


def test_an_offset_is_declared_only_after_confirm_decisive_probes_agree():
    """One probe a step apart is not yet evidence (a hiccup at that step): a halt needs ``confirm``."""
    watch = StepClockWatch(confirm=2)
    beat(watch, 0, [32, 64])
    beat(watch, 1, [32], shift=-1)
    assert offsets(watch, [0, 1]) == {0: 0, 1: None}
    beat(watch, 1, [64], shift=-1)
    assert offsets(watch, [0, 1]) == {0: 0, 1: 1}


def test_the_latest_probe_at_offset_zero_reads_aligned_at_once():
    """A rank whose newest decisive probe lines up with the reference is aligned: an older offset
    in its history no longer stands (it needs ``confirm`` probes again to be declared)."""
    watch = StepClockWatch(confirm=2)
    beat(watch, 0, [32, 64])
    beat(watch, 1, [32], shift=-1)
    beat(watch, 1, [64])
    state = watch.states([0, 1])[1]
    assert state.offset == 0 and state.probes == (64,)


def test_the_reference_is_the_lowest_rank_and_offsets_count_against_it():
    watch = StepClockWatch(confirm=2)
    beat(watch, 0, [32, 64])
    beat(watch, 1, [32, 64])
    beat(watch, 2, [32, 64], shift=-1)  # rank 2 counts one step ahead of ranks 0 and 1
    states = watch.states([2, 0, 1])
    assert {rank: (s.reference, s.offset) for rank, s in states.items()} == {0: (0, 0), 1: (0, 0), 2: (0, 1)}


def test_aligned_again_needs_every_rank_s_latest_probes_all_at_zero():
    """Lifting a step-clock halt takes the evidence declaring it took: ``confirm`` zeros in a row.
    One zero after an offset is not enough."""
    watch = StepClockWatch(confirm=2)
    beat(watch, 0, [32, 64, 96, 128])
    beat(watch, 1, [32, 64], shift=-1)
    assert not watch.aligned_again([0, 1])
    beat(watch, 1, [96])
    assert not watch.aligned_again([0, 1])
    beat(watch, 1, [128])
    assert watch.aligned_again([0, 1])
    assert not watch.aligned_again([0])  # one rank has nothing to be aligned with


def test_a_re_registered_reference_is_compared_afresh_with_every_rank():
    """Rank 0 (the reference) restarted and now counts a step behind: the others' old comparisons at
    the same probe steps were against the old process and must be made again with its new probes."""
    watch = StepClockWatch(confirm=2)
    beat(watch, 0, [32, 64])
    beat(watch, 1, [32, 64])
    assert offsets(watch, [0, 1]) == {0: 0, 1: 0}
    watch.forget(0)
    beat(watch, 0, [32, 64], shift=1)  # rank 1 now counts one step ahead of the new rank 0
    assert offsets(watch, [0, 1]) == {0: 0, 1: 1}


def test_a_rank_s_probes_leave_out_the_step_it_may_be_writing():
    """The serving thread writes step ``steps_done - 1``'s end time while the agent reads the ring: a
    probe window must end at ``steps_done - 2`` at the latest."""
    ring = np.arange(256, dtype=np.float64) * STEP_S
    probe_last = 32 + PROBE_RADIUS  # the last step probe 32's window needs
    steps, _ = probes_from_ring(ring, steps_done=probe_last + 1)
    assert 32 not in steps  # step probe_last may be half written
    steps, rows = probes_from_ring(ring, steps_done=probe_last + 2)
    assert steps == [32] and rows[0] == ring[32 - PROBE_RADIUS : probe_last + 1].tolist()
