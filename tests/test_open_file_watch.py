"""``OpenFileWatch`` and ``fit_open_file_limit`` on given descriptor counts and limits (no daemon).

The daemon test (``test_host_resources``) runs out of descriptors for real and sees the error;
what it cannot see is when: the error must come at 90% of the limit, while connections still
work, and an episode must end once the count falls back, so that the next one is reported.
"""

from __future__ import annotations

import logging
import resource

import pytest

from eplb_service.coordinator import open_files
from eplb_service.coordinator.open_files import OpenFileBudget, OpenFileLimitError, OpenFileWatch
from eplb_service.logutil import rank_logger


def test_the_watch_warns_at_90_percent_once_per_episode_and_says_when_it_is_over(monkeypatch, caplog):
    counts = iter([89, 90, 95, 85, 79, 90])
    monkeypatch.setattr(open_files, "open_fds", lambda limit=None: next(counts))
    watch = OpenFileWatch(OpenFileBudget(soft=100, raised_from=None, needed=50), rank_logger("fd-test", "coordinator"))
    seen = []
    with caplog.at_level(logging.INFO, logger="fd-test"):
        for tick in range(6):
            watch.tick(now=tick * open_files.CHECK_EVERY_S)
            seen.append(watch.near_limit)
    assert seen == [False, True, True, True, False, True]
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records] == [
        ("ERROR", "[coordinator] 90 of 100 open files in use"),
        ("INFO", "[coordinator] 79 of 100 open files in use"),
        ("ERROR", "[coordinator] 90 of 100 open files in use"),
    ]


def test_a_soft_limit_that_cannot_be_raised_is_refused_though_the_hard_one_would_do(monkeypatch):
    """Where ``setrlimit`` is refused (a sandbox), the soft limit is the one in force: 40
    descriptors cannot hold 64 ranks, whatever the hard limit allows."""

    def refuse(*args):
        raise ValueError("not permitted here")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (40, 100_000))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with pytest.raises(OpenFileLimitError, match=r"ulimit -n\) 40 \(hard limit 100000\) is too low for --dp 64"):
        open_files.fit_open_file_limit(64, in_use=10)
    budget = open_files.fit_open_file_limit(20, in_use=10)  # 40 >= 10 + 20 + 8: kept, not raised
    assert (budget.soft, budget.raised_from) == (40, None)
