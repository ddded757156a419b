"""What a rank's own process sends on its new socket before that socket's ``Welcome`` reached it.

An agent that reopens its socket (the coordinator was silent past its limit: a stalled
coordinator, a lossy link) sends its ``Hello`` naming its session ``S1`` and, until the
``Welcome`` naming the new session ``S2`` arrives, everything else still under ``S1``: the
serving thread's ``Committed`` or ``Aborted`` at the commit step, a ``Voted``. The coordinator
reads them after the ``Hello`` on that same connection, so they are the same process's messages
of a session it carried over to this record.
"""

from __future__ import annotations

from plan_harness import beat, harness, hello_again, start_plan
from test_missed_welcome import hello, own_process, welcomed

from eplb_service import protocol


def test_a_commit_sent_under_the_old_session_before_the_welcome_is_booked_on_the_new_connection():
    """The coordinator stalled through a plan's commit step: rank 1 reopened, and its ``Committed``
    (under ``S1``) came right behind its ``Hello`` on the new socket. Before: refused as
    ``stale_session`` (its ``stall_s`` lost, the agent told to register again)."""
    c, sent = harness()
    s1 = own_process(c).session
    plan = start_plan(c)
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(
            r.identity, protocol.Voted(rank=rank, plan_id=plan.plan_id, commit_step=40, ok=True, session=r.session)
        )
    s2 = welcomed(hello(c, b"rank-1-a2", resume_session=s1)).session
    sent.clear()
    c._handle(
        b"rank-1-a2",
        protocol.Committed(rank=1, plan_id=plan.plan_id, commit_step=40, epoch=1, stall_s=0.25, session=s1),
    )
    assert not [m for who, m in sent if isinstance(m, protocol.Reject)], sent
    assert plan.committed.get(1) == (40, 0.25), plan.committed
    record = c.registry.agents[1]
    assert record.identity == b"rank-1-a2" and record.session == s2 and record.epoch == 1
    assert not record.session_heard  # S1 says nothing of whether the agent learned S2
    r0 = c.registry.agents[0]
    c._handle(
        r0.identity,
        protocol.Committed(rank=0, plan_id=plan.plan_id, commit_step=40, epoch=1, stall_s=0.0, session=r0.session),
    )
    assert [(o.phase, o.commit_step) for o in c.plans.outcomes] == [("committed", 40)], c.plans.outcomes
    beat(c, 1, step=41, epoch=1)  # and under S2 once its Welcome came
    assert c.registry.agents[1].session_heard and c.epoch == 1


def test_the_old_session_is_taken_only_from_the_connection_that_carried_it_over():
    """The earlier session proves nothing on another connection, nor from a process the record
    did not carry over (a new process in the rank): still ``stale_session``/``unknown_agent``."""
    c, sent = harness()
    s1 = own_process(c).session
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))
    sent.clear()
    c._handle(b"rank-1-a1-old", protocol.Heartbeat(rank=1, step=5, epoch=0, session=s1))
    assert [m.code for who, m in sent if isinstance(m, protocol.Reject)] == ["unknown_agent"]
    c2, sent2 = harness()
    s1 = c2.registry.agents[1].session  # the harness's Hellos name no pid: a resumed Hello is not carried
    c2._handle(b"rank-1-b2", hello_again(c2, 1, step=0, resume_session=s1, node="n", pid=7))
    sent2.clear()
    c2._handle(b"rank-1-b2", protocol.Heartbeat(rank=1, step=5, epoch=0, session=s1))
    assert [m.code for who, m in sent2 if isinstance(m, protocol.Reject)] == ["stale_session"], sent2


def test_a_vote_sent_under_the_first_session_after_two_reopens_is_booked():
    """Rank 1 reopened twice mid-vote and missed the first reopen's ``Welcome`` (``Claim.REOPENED``):
    it still names ``S1``, and its ``Voted`` comes under ``S1`` on the third connection. Before:
    ``stale_session``, and the decision was learnt from rank 0 alone."""
    c, sent = harness()
    s1 = own_process(c).session
    plan = start_plan(c)
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))  # this Welcome is lost
    welcomed(hello(c, b"rank-1-a3", resume_session=s1))
    sent.clear()
    c._handle(b"rank-1-a3", protocol.Voted(rank=1, plan_id=plan.plan_id, commit_step=40, ok=True, session=s1))
    assert not [m for who, m in sent if isinstance(m, protocol.Reject)], sent
    assert plan.decision == (40, True) and c.registry.agents[1].identity == b"rank-1-a3"
