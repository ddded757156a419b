"""``LoopStalls``: silence measured in the time a loop ran (pure, on given clock readings)."""

from __future__ import annotations

import pytest

from eplb_service.loop_stalls import STALLS_EXCUSED_UP_TO, STALLS_KEPT, LoopStalls


def test_a_stall_is_taken_out_of_the_silence_across_it():
    stalls = LoopStalls(slack_s=0.25)
    assert stalls.ran(10.0, 10.1) == 0.0  # jitter within the slack: the loop ran
    assert stalls.ran(10.1, 16.1) == pytest.approx(6.0)  # not scheduled for 6 s
    assert stalls.scheduled_s(9.0, 17.0) == pytest.approx(2.0)
    assert stalls.scheduled_s(12.0, 17.0) == pytest.approx(0.9)  # heard in the middle of the stall
    assert stalls.scheduled_s(16.5, 17.0) == pytest.approx(0.5)  # heard after it
    assert stalls.scheduled_s(9.0, 13.1) == pytest.approx(1.1)  # judged before the stall ended
    assert stalls.total_s == pytest.approx(6.0)


def test_overlapping_reports_of_one_stall_count_once():
    """The agent notes a late poll and the gap before the next one: both may cover one stall."""
    stalls = LoopStalls(slack_s=0.25)
    stalls.ran(1.0, 4.0)
    assert stalls.ran(2.0, 4.0) == 0.0
    assert stalls.ran(3.0, 5.0) == pytest.approx(1.0)
    assert stalls.scheduled_s(0.0, 6.0) == pytest.approx(2.0)
    assert stalls.total_s == pytest.approx(4.0)


def test_only_the_newest_stalls_are_kept_and_a_silence_is_never_counted_short():
    stalls = LoopStalls(slack_s=0.0)
    for i in range(STALLS_KEPT + 10):
        stalls.ran(2.0 * i, 2.0 * i + 1.0)
    now = 2.0 * (STALLS_KEPT + 10)
    assert stalls.scheduled_s(0.0, now) == pytest.approx(now - STALLS_KEPT)  # the oldest ten count as silence


def test_a_negative_slack_is_refused():
    with pytest.raises(ValueError, match="slack_s must be >= 0 seconds, got -1"):
        LoopStalls(-1)


def test_a_coordinator_late_on_every_tick_still_finds_a_dead_rank_within_a_bounded_wall_time():
    """Ticks 0.3 s late every 0.32 s excuse almost all of a silence (liveness would read 1/16 of
    the wall time); past STALLS_EXCUSED_UP_TO timeouts of wall time the rank is dead anyway."""
    import numpy as np

    from eplb_service.coordinator.registry import AgentRecord, Registry

    registry = Registry(world_size=1)
    registry.register(AgentRecord(0, b"rank-0", "n", 1, 0, 0, np.zeros((1, 2), dtype=np.int64), last_seen=0.0))
    stalls = LoopStalls(0.25)
    t = 0.0
    dead_at = None
    while t < 60 and dead_at is None:
        meant = t + 0.02
        t = meant + 0.3
        stalls.ran(meant, t)
        if registry.expire(t, 5.0, stalls):
            dead_at = t
    assert dead_at is not None and 5.0 * STALLS_EXCUSED_UP_TO <= dead_at < 5.0 * STALLS_EXCUSED_UP_TO + 0.5
    assert stalls.scheduled_s(0.0, dead_at) < 5.0  # the excused silence alone would not have found it


def test_an_agent_late_on_every_poll_still_counts_a_quarter_of_the_coordinator_s_silence():
    """Polls 0.3 s late every 0.32 s would excuse 15/16 of a dead coordinator's silence; the agent
    counts at least a quarter of the wall time, so it reopens within 4 x its limit."""
    import collections
    import logging

    from eplb_service.worker_agent.link import CoordinatorLink

    link = CoordinatorLink(
        0, "ipc:///nonexistent", None, collections.Counter(), logging.LoggerAdapter(logging.getLogger("t"), {})
    )
    link.last_heard = 0.0
    t = 0.0
    for _ in range(100):
        meant = t + 0.02
        t = meant + 0.3
        link.stalls.ran(meant, t)
    assert link.stalls.scheduled_s(0.0, t) < t / 10
    assert link.silent_s(t) == pytest.approx(t / STALLS_EXCUSED_UP_TO)


def test_a_thread_stopped_between_reading_the_socket_and_the_silence_check_is_not_the_coordinator_s_silence():
    """The agent reads its socket, then checks the coordinator's silence. Stopped between the two
    for 2.6 s (seen once in CI: one rank of two reopened its connection after a SIGSTOP), no poll
    had measured the stall yet, and the whole 2.7 s read as the coordinator's silence."""
    import collections
    import logging

    from eplb_service.worker_agent.link import LISTEN_SLACK_S, CoordinatorLink

    link = CoordinatorLink(
        0, "ipc:///nonexistent", None, collections.Counter(), logging.LoggerAdapter(logging.getLogger("t"), {})
    )
    link.last_heard = 9.9
    link._listened_at = 10.0  # the last poll returned; then the thread was stopped
    assert link.silent_s(12.6) == pytest.approx(2.7 / STALLS_EXCUSED_UP_TO)  # not 2.7
    assert link.stalls.total_s == pytest.approx(2.6)
    # The next poll's own account of the same gap is not counted twice (only its last 10 ms).
    link.stalls.ran(10.0, 12.61)
    assert link.stalls.total_s == pytest.approx(2.61)
    # Ordinary gaps between a poll and the check stay listening time.
    link.last_heard, link._listened_at = 20.0, 21.0
    assert link.silent_s(21.0 + LISTEN_SLACK_S / 2) == pytest.approx(1.0 + LISTEN_SLACK_S / 2)
