"""Side-communicator generations (``coordinator.side_comm``) and the ``CommInit`` copies the
coordinator sends while a rendezvous lasts."""

from __future__ import annotations

from plan_harness import harness, hello_again

from eplb_service import protocol
from eplb_service.coordinator.side_comm import SideComm

STORE = ("127.0.0.1", 1)


def test_copies_go_only_while_the_rendezvous_lasts_and_a_new_generation_only_after_twice_it():
    """A copy past the transport timeout would start a rank alone in a rendezvous its peers left;
    a new generation before twice that (plus 2 s) finds ranks still in their failing attempt."""
    comm = SideComm(world_size=2, transport_timeout_s=5.0)
    comm.next(STORE)
    sent_at = comm.sent_at
    assert not comm.resend_due(sent_at + 0.4) and comm.resend_due(sent_at + 0.6)
    assert not comm.resend_due(sent_at + 0.9)  # every 0.5 s at most
    assert comm.resend_due(sent_at + 4.9)
    assert not comm.resend_due(sent_at + 5.5)  # the others gave up on this generation
    assert not comm.retry_due(sent_at + 6.0) and not comm.retry_due(sent_at + 11.9)
    assert comm.retry_due(sent_at + 12.1)


def test_ranks_that_changed_void_the_generation_sent():
    comm = SideComm(world_size=2, transport_timeout_s=5.0)
    first = comm.next(STORE)
    assert comm.current_was_sent
    comm.invalidate()
    assert not comm.current_was_sent and not comm.resend_due(comm.sent_at + 1.0)
    assert comm.next(STORE).generation == first.generation + 1


def test_a_comm_init_copy_goes_only_to_the_ranks_that_have_not_built_it():
    c, sent = harness()
    generation = c.side_comm.next(c.registry.agents[0].store).generation
    c.registry.agents[0].comm_generation = generation  # rank 0's heartbeat says it built it
    c._resend_comm_init(c.side_comm.sent_at + 0.6)
    assert [(who, m.generation) for who, m in sent if isinstance(m, protocol.CommInit)] == [
        (c.registry.agents[1].identity, generation)
    ]


def test_a_new_process_taking_a_rank_with_no_plan_in_flight_gets_a_new_generation_at_once():
    """A Hello naming the rank's session from another pid is a new process: its side communicator
    is gone. With no plan in flight to abort (whose abort rebuilds it), the registration must void
    the generation and build the next, or the deployment waits for the retry (62 s by default)."""
    c, sent = harness()
    generation = c.side_comm.generation
    held = c.registry.agents[1]
    c._handle(b"rank-1-new", hello_again(c, 1, step=0, resume_session=held.session, node="n", pid=7))
    assert c.plans.plan is None and c.side_comm.generation == generation + 1
    to = {who for who, m in sent if isinstance(m, protocol.CommInit) and m.generation == generation + 1}
    assert to == {c.registry.agents[0].identity, b"rank-1-new"}, to
    assert not c.comm_ready()
