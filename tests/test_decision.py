"""The decision record and its decider thread, as units (no agent, no serving loop).

Every other test of the commit path answers proposals through a stand-in (``SyncDecider``, an
in-memory record), so the rules that live here would break unseen there: the record keeps the
first proposal for every client, its content reads back whole whatever an abort's reason says,
and the decider resolves a ticket with the record's answer, never with what it proposed itself.
"""

from __future__ import annotations

import datetime
import re
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from conftest import MemoryRecord, free_port

from eplb_service.worker_agent.decision import Decider, Decision, DecisionUnavailable, StoreDecisionRecord
from eplb_service.worker_agent.serving_hooks import CommitTicket


def ticket_for(plan_id: int) -> CommitTicket:
    """The serving hooks' own commit ticket (decided once, by the first answer), for ``plan_id``:
    only its plan id is read of the commit it would apply, so no model is built."""
    return CommitTicket(action=SimpleNamespace(plan_id=plan_id))  # type: ignore[arg-type]


class UnreachableRecord:
    """A record whose host is gone: every proposal fails, and is counted."""

    address = "gone:1"

    def __init__(self) -> None:
        self.proposals = 0

    def propose(self, plan_id: int, proposal: Decision) -> Decision:
        self.proposals += 1
        raise DecisionUnavailable("decision record at gone:1 unreachable: test")


def test_an_abort_whose_reason_holds_the_separator_reads_back_whole():
    """Reasons carry free text (a transport's error, the coordinator's reason): a ``|`` in it must
    not make the record unreadable, or every rank would retry it until ``UndecidedCommit``."""
    for decision in (
        Decision.abort(3, "vote_failed: gloo: peer 1|2 reset | again", "vote_failed"),
        Decision.abort(0, "", "fence_timeout"),
        Decision.commit_at(12345, 2),
    ):
        assert Decision.decode(decision.encode()) == decision


def test_a_record_that_holds_something_else_is_named_not_guessed():
    with pytest.raises(DecisionUnavailable, match=re.escape("holds b'maybe|1|0||', expected 'commit|S|rank||'")):
        Decision.decode(b"maybe|1|0||")


@pytest.fixture
def store_port():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    yield port
    del server


def test_the_store_record_keeps_the_first_proposal_for_every_client(store_port):
    """Two ranks' clients of one store: the second proposal, and the first rank's own later one,
    read the first back (a plain ``set`` would let the last writer win and split the ranks)."""
    rank0 = StoreDecisionRecord("127.0.0.1", store_port)
    rank1 = StoreDecisionRecord("127.0.0.1", store_port)
    commit = Decision.commit_at(40, 1)
    assert rank1.propose(9, commit) == commit
    assert rank0.propose(9, Decision.abort(0, "fence_timeout: waited", "fence_timeout")) == commit
    assert rank1.propose(9, Decision.abort(1, "aborted by the coordinator", "aborted_by_coordinator")) == commit
    abort = Decision.abort(0, "vote_failed: a rank was not ready", "vote_failed")
    assert rank0.propose(10, abort) == abort  # another plan has a record of its own
    assert rank1.propose(10, Decision.commit_at(50, 1)) == abort


def test_the_decider_resolves_the_ticket_with_the_record_s_answer_not_its_own_proposal():
    """Another rank wrote ``commit`` first: this rank's ``abort`` (a fence timeout) loses, and its
    ticket must say ``commit`` like every other rank's."""
    record = MemoryRecord()
    record.decisions[5] = Decision.commit_at(77, 1)
    decider = Decider(0).start()
    try:
        ticket = ticket_for(5)
        decider.submit(ticket, record, Decision.abort(0, "fence_timeout: waited", "fence_timeout"))
        assert ticket.decided.wait(2.0)
        assert ticket.decision == Decision.commit_at(77, 1)
    finally:
        decider.stop()


def test_a_proposal_queued_for_a_decided_ticket_never_reaches_the_record():
    """A decided ticket's queued proposal (an abort asked for after the record answered) is skipped:
    sent, it could re-create a record rank 0 deleted, and against a record that is gone it would
    be retried for ever, holding back every later ticket's proposal behind it."""
    gone, record = UnreachableRecord(), MemoryRecord()
    decider = Decider(0, retry_max_s=0.05).start()
    try:
        decided = ticket_for(1)
        decided.resolve(Decision.commit_at(30, 1))
        decider.submit(decided, gone, Decision.abort(0, "aborted by the coordinator", "aborted_by_coordinator"))
        later = ticket_for(2)
        decider.submit(later, record, Decision.commit_at(60, 0))
        assert later.decided.wait(2.0), "a later ticket waited behind a decided one's proposal"
        assert later.decision == Decision.commit_at(60, 0)
        assert gone.proposals == 0 and decided.decision == Decision.commit_at(30, 1)
    finally:
        decider.stop()


def test_the_decider_retries_an_unreachable_record_until_it_answers():
    """The record's host may come back (a link that broke): the ticket is decided by its answer then."""

    class Flaky(MemoryRecord):
        def propose(self, plan_id: int, proposal: Decision) -> Decision:
            if self.proposals < 3:
                self.proposals += 1
                raise DecisionUnavailable("decision record at memory unreachable: test")
            return super().propose(plan_id, proposal)

    record = Flaky()
    decider = Decider(0, retry_max_s=0.02).start()
    try:
        ticket = ticket_for(8)
        decider.submit(ticket, record, Decision.commit_at(90, 0))
        assert ticket.decided.wait(2.0)
        assert ticket.decision == Decision.commit_at(90, 0) and record.proposals == 4
        assert decider.unreachable_since is None and "unreachable" in decider.last_error
    finally:
        decider.stop()
