"""Faults that last write a bounded number of lines: the first occurrence, then counts (``log_throttle``).

Real coordinator and agents (threads, ``log_volume``), fast intervals. Before the throttle an
agent whose load reports were malformed made both ends write one line per report (~570 a
minute each at 100 steps/s), and a coordinator down made every agent write one line per
reopen (12 a minute).
"""

from __future__ import annotations

import logging

from log_volume import run

from eplb_service import protocol

FAST = protocol.AgentConfig(report_interval_steps=5, heartbeat_interval_s=0.2)


def messages(result, tag: str, level: int, text: str) -> list[str]:
    """The run's lines of ``tag`` at ``level`` containing ``text`` (a malformed agent's start at its first report)."""
    return [
        r.getMessage()
        for r in result["counter"].records
        if r.eplb_tag == tag and r.levelno == level and text in r.getMessage()
    ]


def test_malformed_load_reports_are_logged_once_on_each_end_however_many_there_are():
    result = run("malformed_reports", 3.0, FAST, step_s=0.005)
    coordinator = messages(result, "coordinator", logging.WARNING, "sent a bad load report")
    agent = messages(result, "rank 0", logging.ERROR, "refused a message of this agent as malformed")
    assert (
        len(coordinator) == 1
        and "rank 0 sent a bad load report: load report shape (2, 7), expected (2, 8)" in (coordinator[0])
    ), coordinator
    assert len(agent) == 1 and "dropped (bad_shape)" in agent[0], agent
    assert result["during"].get("coordinator", 0) <= 2 and result["during"].get("rank 0", 0) <= 2, result["during"]


def test_a_coordinator_down_is_one_line_per_agent_then_one_when_it_answers_again():
    """Down 7 s, so each agent reopens at least twice and the second is counted, not logged. Its
    silence runs from its first unanswered ``Hello`` (0.5 s after ``CoordinatorStopping``), and the
    limit doubles per reopen from 1.8 s (heartbeats every 0.2 s): reopens about 2.3 s and 4.1 s after
    the stop, a third at 7.7 s. Down 5 s, the second reopen fell 0.9 s before the new coordinator
    answered, and a loaded CI host answered first (1 occurrence, nothing to count)."""
    result = run("coordinator_down", 7.0, FAST, step_s=0.01)
    for rank in (0, 1):
        silent = messages(result, f"rank {rank}", logging.WARNING, "nothing from the coordinator")
        back = messages(result, f"rank {rank}", logging.INFO, "heard from the coordinator again")
        assert len(silent) == 1, silent
        assert len(back) == 1 and "occurrences over" in back[0] and "of them not logged" in back[0], back
