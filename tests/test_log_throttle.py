"""LogThrottle on a fake clock: first line kept, one line per interval after, counts, recovery."""

from __future__ import annotations

import logging

import pytest

from eplb_service.log_throttle import LogThrottle
from eplb_service.logutil import rank_logger


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(caplog):
    caplog.set_level(logging.DEBUG, logger="throttle-test")
    clock = Clock()
    return LogThrottle(rank_logger("throttle-test", 3), interval_s=30.0, clock=clock), clock, caplog


def lines(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "throttle-test"]


def test_first_occurrence_at_its_level_then_one_line_per_interval_with_the_count(setup):
    throttle, clock, caplog = setup
    assert throttle.report("bad", logging.ERROR, "bad report %d", 0)
    for i in range(1, 30):  # one a second for 29 s: all left out
        clock.now += 1
        assert not throttle.report("bad", logging.ERROR, "bad report %d", i)
    clock.now += 1  # 30 s after the first line
    assert throttle.report("bad", logging.ERROR, "bad report %d", 30)
    assert lines(caplog) == [
        ("ERROR", "[rank 3] bad report 0"),
        ("ERROR", "[rank 3] bad report 30 (29 more like this not logged in the last 30s; 31 since it began 30s ago)"),
    ]


def test_keys_are_independent_so_no_first_occurrence_is_hidden(setup):
    throttle, clock, caplog = setup
    throttle.report(("bad", 1), logging.WARNING, "rank %d bad", 1)
    throttle.report(("bad", 2), logging.WARNING, "rank %d bad", 2)
    throttle.report(("bad", 1), logging.WARNING, "rank %d bad", 1)
    assert lines(caplog) == [("WARNING", "[rank 3] rank 1 bad"), ("WARNING", "[rank 3] rank 2 bad")]


def test_clear_says_how_long_and_how_many_then_the_next_one_is_a_first_again(setup):
    throttle, clock, caplog = setup
    assert not throttle.clear("down", "back")  # never active: nothing written
    throttle.report("down", logging.WARNING, "silent")
    for _ in range(5):
        clock.now += 5
        throttle.report("down", logging.WARNING, "silent")
    clock.now += 2
    assert throttle.clear("down", "back after %s", "a pause")
    assert not throttle.active("down")
    throttle.report("down", logging.WARNING, "silent")
    assert lines(caplog) == [
        ("WARNING", "[rank 3] silent"),
        ("INFO", "[rank 3] back after a pause (after 6 occurrences over 27s, 5 of them not logged)"),
        ("WARNING", "[rank 3] silent"),
    ]


def test_tick_summarises_what_was_left_out_once_occurrences_stop_then_forgets_the_key(setup):
    throttle, clock, caplog = setup
    throttle.report("bad", logging.ERROR, "bad %d", 1)
    clock.now += 1
    throttle.report("bad", logging.ERROR, "bad %d", 2)
    clock.now += 10
    throttle.tick()  # within the interval: nothing yet
    clock.now += 20
    throttle.tick()
    clock.now += 29
    throttle.tick()  # quiet, nothing left out, but not yet a whole interval since the last occurrence
    assert throttle.active("bad")
    clock.now += 30
    throttle.tick()
    assert not throttle.active("bad")
    throttle.report("bad", logging.ERROR, "bad %d", 3)
    assert lines(caplog) == [
        ("ERROR", "[rank 3] bad 1"),
        ("ERROR", "[rank 3] bad 2 (1 more like this not logged in the last 31s; 2 since it began 31s ago)"),
        ("ERROR", "[rank 3] bad 3"),
    ]


def test_a_message_with_percent_signs_in_its_arguments_stays_one_line(setup):
    throttle, clock, caplog = setup
    throttle.report("k", logging.WARNING, "reason: %s", "100% wrong")
    clock.now += 1
    throttle.report("k", logging.WARNING, "reason: %s", "100% wrong")
    clock.now += 30
    throttle.report("k", logging.WARNING, "reason: %s", "100% wrong")
    assert lines(caplog)[-1][1].startswith("[rank 3] reason: 100% wrong (1 more like this")


def test_a_bad_interval_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"interval_s=0: expected a positive"):
        LogThrottle(logging.getLogger("x"), interval_s=0)


def test_settle_writes_only_the_count_left_out(setup):
    throttle, clock, caplog = setup
    throttle.report("once", logging.WARNING, "once")
    throttle.settle("once")  # nothing left out: the caller's own line says it is over
    throttle.report("many", logging.WARNING, "many")
    clock.now += 1
    throttle.report("many", logging.WARNING, "many")
    throttle.settle("many")
    assert not throttle.active("once") and not throttle.active("many")
    assert lines(caplog) == [
        ("WARNING", "[rank 3] once"),
        ("WARNING", "[rank 3] many"),
        ("WARNING", "[rank 3] many (1 more like this not logged in the last 1s; 2 since it began 1s ago; over now)"),
    ]


def test_settle_where_settles_every_matching_key_and_no_other(setup):
    throttle, clock, caplog = setup
    for key in (("session", 1), ("hello_refused", 1, "refused"), ("session", 2), ("framing", b"rank-1")):
        throttle.report(key, logging.WARNING, "%s", key)
    throttle.settle_where(lambda key: key[1:2] == (1,))  # rank 1's conditions, by key shape
    assert not throttle.active(("session", 1)) and not throttle.active(("hello_refused", 1, "refused"))
    assert throttle.active(("session", 2)) and throttle.active(("framing", b"rank-1"))


def test_a_condition_that_goes_on_stays_at_one_line_per_interval(setup):
    """After its first summary line a lasting condition must not fall back to a line per occurrence:
    the interval counts from the last line written, not from the first one."""
    throttle, clock, caplog = setup
    written = 0
    for _ in range(120):  # one a second for two minutes, a 30 s interval
        written += throttle.report("bad", logging.WARNING, "bad report")
        clock.now += 1
    assert written == len(lines(caplog)) == 4  # the first, then at 30, 60 and 90 s
    assert lines(caplog)[-1] == (
        "WARNING",
        "[rank 3] bad report (29 more like this not logged in the last 30s; 91 since it began 90s ago)",
    )
