"""The agent loop's rules that hand mutation of ``worker_agent/agent.py`` let through.

Each test drives a real ``WorkerAgent`` without its thread (``test_agent_states.Harness``: one
rank, a memory decision record, a socket that keeps what is sent) and names the rule it holds.
"""

from __future__ import annotations

import time

import msgspec
import pytest
from test_agent_states import FAST, Harness, sent_of

from eplb_service import protocol


def staged_plan(h: Harness) -> protocol.Plan:
    """A welcomed agent holding one staged plan (no vote yet)."""
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    assert [m.plan_id for m in sent_of(h, protocol.Staged)] == [plan.plan_id]
    return plan


def test_a_second_plan_while_one_is_staged_is_failed_busy_and_the_first_is_kept():
    """One plan at a time: a second ``Plan`` (another batch the coordinator sent early, or one
    of a coordinator that restarted) must not replace the staged one, whose vote may come next."""
    h = Harness()
    first = staged_plan(h)
    second = h.plan()
    h.deliver(second)
    failed = sent_of(h, protocol.Failed)
    assert [(m.plan_id, m.code) for m in failed] == [(second.plan_id, "busy")]
    assert str(first.plan_id) in failed[0].reason, failed[0].reason
    assert h.agent._plan is first and h.agent.stats["staged"] == 1
    h.deliver(protocol.VoteNow(plan_id=first.plan_id))
    h.serve(4)
    assert h.applied == [(first.plan_id, FAST.fence_steps)]


def test_an_abort_plan_for_another_plan_leaves_the_staged_plan_alone():
    """``AbortPlan`` copies of an earlier plan keep coming to ranks the coordinator has no
    outcome from; one must never drop the plan this rank holds now."""
    h = Harness()
    plan = staged_plan(h)
    h.deliver(protocol.AbortPlan(plan_id=plan.plan_id - 1, reason="an earlier plan", code="staging_timeout"))
    assert h.agent._plan is plan and not sent_of(h, protocol.Aborted)
    h.deliver(protocol.AbortPlan(plan_id=plan.plan_id, reason="this plan", code="staging_timeout"))
    assert h.agent._plan is None
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "aborted_by_coordinator")]


def staging_reads(h: Harness, *messages: protocol.Message) -> None:
    """While the next plan stages, the pipeline's pump reads ``messages`` (one per poll, in order)."""
    agent = h.agent
    incoming = [[m] for m in reversed(messages)]
    agent.link.receive = lambda poll_ms: incoming.pop() if incoming else []
    original = agent._stage

    def stage(p, rows):
        for _ in messages:
            agent._pump_while_staging(p.plan_id)  # what the pipeline does between chunks
        return original(p, rows)

    agent._stage = stage


def test_an_abort_plan_read_during_staging_ends_that_staging_at_once():
    """The coordinator gave the plan up (a peer failed, the staging timed out): the rank stops its
    exchange at the next chunk and says ``Aborted``, instead of staging to the end for nothing."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    staging_reads(h, protocol.AbortPlan(plan_id=plan.plan_id, reason="a peer failed", code="staging_failed"))
    h.deliver(plan)
    assert h.agent._plan is None and h.agent.stats["staged"] == 0 and not sent_of(h, protocol.Staged)
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "aborted_by_coordinator")]


def test_an_abort_plan_of_an_earlier_plan_read_during_staging_does_not_end_it():
    """Only the plan being staged is given up: a late ``AbortPlan`` copy of the previous plan,
    read between chunks, must let this one stage and answer ``Staged``."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    staging_reads(h, protocol.AbortPlan(plan_id=plan.plan_id - 1, reason="the previous plan", code="voting_timeout"))
    h.deliver(plan)
    assert h.agent._plan is plan and h.agent.stats["staged"] == 1
    assert [m.plan_id for m in sent_of(h, protocol.Staged)] == [plan.plan_id] and not sent_of(h, protocol.Aborted)


def test_an_answer_said_again_after_registering_again_carries_the_new_session(monkeypatch):
    """The coordinator refuses a message naming a session it did not give (``stale_session``): a
    ``Staged`` re-sent for a ``Plan`` copy after this agent registered again must name the new one."""
    import eplb_service.worker_agent.agent as agent_module

    monkeypatch.setattr(agent_module, "ANSWER_AGAIN_S", 0.0)
    h = Harness()
    plan = staged_plan(h)
    h.deliver(protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=8))
    h.deliver(plan)  # the coordinator missed the Staged
    assert [(m.plan_id, m.session) for m in sent_of(h, protocol.Staged)] == [(plan.plan_id, 7), (plan.plan_id, 8)]


class StopAfter:
    """``agent._stop`` for a thread-less ``_run``: set once ``ticks`` loop turns have run."""

    def __init__(self, ticks: int) -> None:
        self.ticks, self.waits = ticks, []

    def is_set(self) -> bool:
        return self.ticks <= 0

    def wait(self, timeout_s: float) -> bool:
        self.waits.append(timeout_s)
        return self.is_set()

    def set(self) -> None:
        self.ticks = 0


def test_a_loop_that_raises_resets_the_agent_drops_the_plan_and_registers_again():
    """Supervised loop: a failure turns into a clean reset (the plan not voted answered
    ``Aborted internal_error``, the transport torn down, a fresh registration), never a rank
    left holding a plan and a half-used transport while it goes on heartbeating."""
    h = Harness()
    plan = staged_plan(h)
    agent = h.agent
    stop = StopAfter(1)
    real_tick = agent._tick

    def tick(poll_ms: int) -> None:
        stop.ticks -= 1
        raise RuntimeError("boom")

    agent._stop = stop  # type: ignore[assignment]
    agent._tick = tick  # type: ignore[method-assign]
    agent._run()
    agent._tick = real_tick  # type: ignore[method-assign]
    assert agent.stats["internal_errors"] == 1
    aborted = sent_of(h, protocol.Aborted)
    assert [(m.plan_id, m.code) for m in aborted] == [(plan.plan_id, "internal_error")]
    assert "boom" in aborted[0].reason
    assert agent._plan is None and not agent.transport.connected and not agent.welcomed


def test_the_loop_failure_back_off_starts_afresh_after_a_tick_that_worked():
    """The back-off is for failures in a row: an isolated failure days after the last one waits
    the shortest time, not the longest the earlier ones had reached."""
    h = Harness()
    agent = h.agent
    outcomes = ["fail", "fail", "ok", "fail"]
    stop = StopAfter(len(outcomes))

    def tick(poll_ms: int) -> None:
        stop.ticks -= 1
        if outcomes.pop(0) == "fail":
            raise RuntimeError("boom")

    agent._stop = stop  # type: ignore[assignment]
    agent._tick = tick  # type: ignore[method-assign]
    agent._run()
    assert stop.waits == pytest.approx([0.1, 0.2, 0.1])


def test_a_rank_taken_reject_keeps_a_welcomed_agent_registered_and_heartbeating():
    """``rank_taken`` answers a ``Hello`` another connection's agent holds the rank for (a copy,
    a reconnect race): it says nothing about this agent's own registration, whose heartbeats
    must go on or the coordinator declares it dead and aborts the plan in flight."""
    h = Harness()
    h.welcome()
    h.deliver(protocol.Reject(reason="rank 0 is registered by another connection", code="rank_taken"))
    assert h.agent.welcomed and h.agent.stats["rank_taken"] == 1
    h.agent.link.sock.sent.clear()
    h.agent._next_heartbeat = 0.0
    h.tick()
    assert [m.session for m in sent_of(h, protocol.Heartbeat)] == [7] and not sent_of(h, protocol.Hello)


def test_a_stopping_agent_says_goodbye_under_its_session_and_only_when_registered():
    """``Goodbye`` frees the rank at once; without it the coordinator waits out the liveness
    timeout, with a plan in flight held for a rank that is gone."""
    h = Harness()
    h.welcome()
    h.agent._shutdown()
    assert [(m.rank, m.session) for m in sent_of(h, protocol.Goodbye)] == [(0, 7)]
    quiet = Harness()  # never welcomed: the coordinator knows no session to end
    quiet.agent._shutdown()
    assert not sent_of(quiet, protocol.Goodbye)


def test_a_stopping_agent_drops_its_plan_and_tears_down_its_transport():
    """A stopped agent holds no communicator: a peer still in an exchange with it must see the
    group go (and abort), not wait on a rank that will never take part again."""
    h = Harness()
    plan = staged_plan(h)
    assert h.agent.transport.connected
    h.agent._shutdown()
    assert not h.agent.transport.connected
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "agent_stopping")]


def test_a_staging_that_fails_answers_failed_and_leaves_the_agent_free_for_the_next_plan():
    """A failed exchange ends the plan on this rank: ``Failed staging_failed``, the transport torn
    down, and no plan kept (kept, every later ``Plan`` was refused ``busy`` until a new side
    communicator dropped it: a failed staging never reaches the staged timeout that frees one)."""
    from eplb_service.worker_agent.transport import TransportError

    h = Harness()
    h.welcome()
    agent = h.agent
    original = agent._stage

    def fail_once(p, rows):
        agent._stage = original
        raise TransportError("peer 1 closed the connection")

    agent._stage = fail_once
    broken = h.plan()
    h.deliver(broken)
    failed = sent_of(h, protocol.Failed)
    assert [(m.plan_id, m.code) for m in failed] == [(broken.plan_id, "staging_failed")]
    assert "peer 1 closed" in failed[0].reason and not agent.busy and not agent.transport.connected
    h.deliver(h.comm())  # the coordinator builds the side communicator again
    after = h.plan()
    h.deliver(after)
    assert [m.plan_id for m in sent_of(h, protocol.Staged)] == [after.plan_id]


def test_a_staged_plan_with_no_vote_within_the_staged_timeout_is_dropped():
    """The coordinator may lose a plan (restart, a lost ``VoteNow`` and ``AbortPlan``): a staged
    plan waits ``staged_timeout_s`` for its vote, then is dropped (``Aborted no_vote``) so that
    the staging memory is freed and the rank takes plans again."""
    h = Harness()
    plan = staged_plan(h)
    agent = h.agent
    h.tick()
    assert agent._plan is plan, "dropped before its timeout"
    agent._staged_at -= agent.staged_timeout_s + 1
    h.tick()
    assert agent._plan is None and not agent.busy
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "no_vote")]


def test_heartbeats_name_the_plan_while_it_stages_and_none_once_it_is_staged():
    """``staging_plan`` holds the coordinator's ``Plan`` copies back while this rank works on the
    plan; once staged it must say 0, so that a ``Staged`` lost on the way draws a copy (answered
    with that ``Staged`` again) instead of a plan waiting for its staging timeout."""
    h = Harness()
    h.welcome()
    agent = h.agent
    agent.link.receive = lambda poll_ms: []
    original = agent._stage

    def stage(p, rows):
        agent._next_heartbeat = 0.0
        agent._pump_while_staging(p.plan_id)
        return original(p, rows)

    agent._stage = stage
    plan = h.plan()
    h.deliver(plan)
    agent._next_heartbeat = 0.0
    h.tick()
    assert [m.staging_plan for m in sent_of(h, protocol.Heartbeat)] == [plan.plan_id, 0]


def test_coordinator_stopping_drops_the_staged_plan_and_registers_again_later():
    """A stopping coordinator aborted its plan: the rank drops its copy (``Aborted
    coordinator_stopping``) at once, so that the next coordinator's first plan is not refused
    ``busy`` for the staged timeout, and says ``Hello`` again after ``hello_interval_s``."""
    h = Harness()
    plan = staged_plan(h)
    agent = h.agent
    h.deliver(protocol.CoordinatorStopping(reason="coordinator shutting down"))
    assert agent._plan is None and not agent.busy and not agent.welcomed
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "coordinator_stopping")]
    agent.link.sock.sent.clear()
    h.tick()
    assert not sent_of(h, protocol.Hello) and not sent_of(h, protocol.Heartbeat)
    agent._next_hello = 0.0
    h.tick()
    assert [m.resume_session for m in sent_of(h, protocol.Hello)] == [7]


def test_a_plan_read_after_the_coordinator_lost_this_agent_is_not_staged_to_the_end():
    """A ``Plan`` queued behind ``CoordinatorStopping`` (or a ``Reject unknown_agent``) belongs to a
    coordinator that no longer waits for this rank: staging stops at the first chunk (``Aborted
    coordinator_lost``) instead of holding the exchange open for peers that left it."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    staging_reads(h, protocol.HeartbeatAck(session=7))
    h.deliver(protocol.CoordinatorStopping(reason="coordinator shutting down"))
    h.deliver(plan)
    assert h.agent._plan is None and h.agent.stats["staged"] == 0 and not sent_of(h, protocol.Staged)
    assert [(m.plan_id, m.code) for m in sent_of(h, protocol.Aborted)] == [(plan.plan_id, "coordinator_lost")]


def test_messages_read_before_a_reset_are_not_acted_on_after_it():
    """A reset reopens the socket and registers afresh: what the old connection delivered and the
    failed tick left unhandled (a ``Welcome``, a ``Plan``) is dropped, never taken as an answer on
    the new connection the coordinator has not welcomed."""
    h = Harness()
    agent = h.agent
    agent._inbox.extend(
        [
            protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7, comm=h.comm()),
            h.plan(),
        ]
    )
    agent._reset("internal error: RuntimeError: boom")
    h.tick()
    assert not agent.welcomed and agent._plan is None and agent.stats["staged"] == 0
    assert [m.resume_session for m in sent_of(h, protocol.Hello)] == [0]


def test_a_heartbeat_answered_for_another_session_makes_the_agent_register_again():
    """The coordinator holds another session for this rank (it registered it again, this agent's
    Welcome lost): everything this agent sends under its own is refused, so it says ``Hello``."""
    h = Harness()
    h.welcome()
    h.deliver(protocol.HeartbeatAck(session=7))
    assert h.agent.welcomed
    h.deliver(protocol.HeartbeatAck(session=8))
    assert not h.agent.welcomed
    h.agent.link.sock.sent.clear()
    h.tick()
    assert [m.resume_session for m in sent_of(h, protocol.Hello)] == [7] and not sent_of(h, protocol.Heartbeat)


def test_a_refused_agent_asks_again_only_every_refused_retry_s():
    """A refusal (version, shape, world size) is for the operator to fix: the agent stops
    heartbeating and says ``Hello`` again after ``refused_retry_s``, not at its fast Hello pace."""
    h = Harness()
    h.welcome()
    agent = h.agent
    h.deliver(protocol.Reject(reason="this coordinator serves 2 ranks, not 1", code="refused"))
    assert not agent.welcomed and agent.stats["refused"] == 1
    agent.link.sock.sent.clear()
    h.tick()
    assert not sent_of(h, protocol.Hello) and not sent_of(h, protocol.Heartbeat)
    assert agent._next_hello >= time.monotonic() + agent.refused_retry_s - 1.0


def test_heartbeats_go_out_once_per_interval_not_on_every_loop_turn():
    """The loop turns every few ms; a heartbeat per turn would be hundreds a second per rank."""
    h = Harness()
    slow = msgspec.structs.replace(FAST, heartbeat_interval_s=60.0)
    h.deliver(protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=slow, session=7))
    for _ in range(3):
        h.tick()
    assert len(sent_of(h, protocol.Heartbeat)) == 1


def test_a_welcome_resets_the_hello_back_off_for_the_next_registration():
    """Unanswered ``Hello`` messages back off (to 5 s); once one is answered, a later ``Hello``
    the coordinator asks for (``Reject unknown_agent`` after it restarted) is not held back by
    the back-off the earlier silence built up."""
    h = Harness()
    agent = h.agent
    for _ in range(4):  # four Hellos, no answer: the back-off doubled each time
        agent._next_hello = 0.0
        h.tick()
    assert agent._hello_backoff_s >= 4 * agent.hello_interval_s
    h.welcome()
    h.deliver(protocol.Reject(reason="unknown agent", code="unknown_agent"))
    agent.link.sock.sent.clear()
    now = time.monotonic()
    h.tick()
    assert len(sent_of(h, protocol.Hello)) == 1
    assert agent._next_hello <= now + agent.hello_interval_s + 0.5


def test_a_staging_aborted_with_transfers_queued_tears_the_transport_down_and_one_without_keeps_it():
    """Transfers queued and never waited for would be matched by the peers' next exchange: an
    abort in the middle of a batch tears the communicator down (it is built again before the
    next plan); one between batches keeps it, the common case needing no rebuild."""
    from test_agent_states import LocalTransport

    class Queued(LocalTransport):
        busy = True

    for transport, torn_down in ((Queued(), True), (LocalTransport(), False)):
        h = Harness(transport)
        h.welcome()
        plan = h.plan()
        staging_reads(h, protocol.AbortPlan(plan_id=plan.plan_id, reason="a peer failed", code="staging_failed"))
        h.deliver(plan)
        assert h.agent._plan is None and sent_of(h, protocol.Aborted)
        assert h.agent.transport.connected is not torn_down, type(transport).__name__
