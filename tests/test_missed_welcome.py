"""A rank's own process that missed a ``Welcome`` gets its rank back at its next ``Hello``.

Every registration hands out a new session, and only the ``Welcome`` tells the agent which. An
agent that reopened its socket (``resume_session=S1``) was registered under a new session ``S2``;
with that ``Welcome`` lost, its next reopen named ``S1`` again, which was no longer the holder's,
and so was refused as ``rank_taken`` until the record it could not reach was declared dead (the
liveness timeout), no plan running meanwhile. So was a first ``Hello`` whose ``Welcome`` was lost,
asked again from a new socket. Now the holder's own process (same node and pid) takes the rank
back at once while nothing was heard under the holder's session (so it cannot know it), and keeps
a plan in flight when it names one of its own earlier sessions. Another process is still refused
while the holder lives, and a stale ``Hello`` of the process (sent before it learned the holder's
session, which it has used since) takes nothing.
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
from plan_harness import beat, commit_plan, harness, hello_again, start_plan

from eplb_service import protocol

NODE, PID = "host-b", 4321


def own_process(c, rank: int = 1):
    """``rank``'s record as registered by a real process (the harness's Hellos name no pid)."""
    record = c.registry.agents[rank]
    record.node, record.pid = NODE, PID
    return record


def hello(c, identity: bytes, resume_session: int, rank: int = 1, **fields) -> list[protocol.Message]:
    """A ``Hello`` of ``rank`` from ``identity``; returns what the coordinator answered it."""
    sent: list[tuple[bytes, protocol.Message]] = []
    before = c.send
    c.send = lambda who, message: sent.append((who, message))
    try:
        fields = {"node": NODE, "pid": PID, **fields}
        held = c.registry.agents.get(rank)
        step = held.step if held is not None else 0
        c._handle(identity, hello_again(c, rank, step=step, resume_session=resume_session, **fields))
    finally:
        c.send = before
    return [m for who, m in sent if who == identity]


def welcomed(replies: list[protocol.Message]) -> protocol.Welcome:
    welcomes = [m for m in replies if isinstance(m, protocol.Welcome)]
    assert len(welcomes) == 1, replies
    return welcomes[0]


def rejected(replies: list[protocol.Message]) -> protocol.Reject:
    rejects = [m for m in replies if isinstance(m, protocol.Reject)]
    assert len(rejects) == 1, replies
    return rejects[0]


def test_a_resumed_process_whose_welcome_was_lost_gets_its_rank_back_at_its_next_reopen():
    """Ordering (1). Before: ``Reject(rank_taken)`` at the second reopen, until the liveness timeout."""
    c, _ = harness()
    first = own_process(c)
    s1 = first.session
    beat(c, 1, step=10, epoch=0)  # the agent holds S1 and uses it
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))  # registered under S2: this Welcome is lost
    assert c.registry.agents[1].session != s1
    reply = welcomed(hello(c, b"rank-1-a3", resume_session=s1))  # the agent still names S1
    record = c.registry.agents[1]
    assert record.identity == b"rank-1-a3" and record.alive and reply.session == record.session
    beat(c, 1, step=11, epoch=0)  # its messages under the new session are taken
    assert c.registry.agents[1].step == 11 and c.registry.complete


def test_a_first_hello_whose_welcome_was_lost_gets_the_rank_from_a_new_socket():
    """Ordering (2): the process never got any ``Welcome``, so it says ``resume_session=0`` again."""
    c, _ = harness()
    c.router.lose_agent(c.registry.agents[1], time.monotonic())
    welcomed(hello(c, b"rank-1-a1", resume_session=0))  # registered: this Welcome is lost
    reply = welcomed(hello(c, b"rank-1-a2", resume_session=0))
    record = c.registry.agents[1]
    assert record.identity == b"rank-1-a2" and reply.session == record.session and c.registry.complete


def test_a_plan_in_its_vote_goes_on_when_the_rank_reopens_twice_and_misses_the_first_welcome():
    """Ordering (1) mid-vote: the process kept its staged rows, so the plan commits as it does
    after one reopen (``test_plan_across_reopen``). Before: the rank was locked out and the plan
    lost it."""
    c, sent = harness()
    generation = c.side_comm.generation
    s1 = own_process(c).session
    plan = start_plan(c)
    assert plan.phase.value == "voting"
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))
    welcomed(hello(c, b"rank-1-a3", resume_session=s1))
    assert c.plans.plan is plan and not plan.lost and not c.plans.outcomes, c.plans.outcomes
    sent.clear()
    c.plans.tick(time.monotonic())  # the VoteNow that went to the lost sockets, again on the new one
    assert [m.plan_id for who, m in sent if who == b"rank-1-a3" and isinstance(m, protocol.VoteNow)] == [plan.plan_id]
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(
            r.identity, protocol.Voted(rank=rank, plan_id=plan.plan_id, commit_step=40, ok=True, session=r.session)
        )
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(
            r.identity,
            protocol.Committed(
                rank=rank, plan_id=plan.plan_id, commit_step=40, epoch=1, stall_s=0.0, session=r.session
            ),
        )
    assert [(o.phase, o.commit_step) for o in c.plans.outcomes] == [("committed", 40)], c.plans.outcomes
    assert c.epoch == 1 and c.side_comm.generation == generation


def test_another_process_is_refused_while_the_holder_lives_and_the_holder_s_own_is_not():
    """A Hello of another pid, or of the same pid on another node, is a second process in the rank:
    ``rank_taken``, whatever session it names, even while the holder was never heard. So is one of
    the holder's node and pid naming none of the sessions that process proved here: node and pid
    are no secret (a refusal names them). The holder's own process, asking after them with its
    session, gets the rank (before: ``rank_taken`` too)."""
    c, _ = harness()
    s1 = own_process(c).session
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))  # its Welcome lost: nothing heard under S2
    for identity, fields in ((b"rank-1-other-pid", {"pid": PID + 1}), (b"rank-1-other-node", {"node": "host-c"})):
        for resume in (0, s1):
            assert rejected(hello(c, identity, resume_session=resume, **fields)).code == "rank_taken"
            assert c.registry.agents[1].identity == b"rank-1-a2"
    for resume in (0, 12345):
        assert rejected(hello(c, b"rank-1-forged", resume_session=resume)).code == "rank_taken"
        assert c.registry.agents[1].identity == b"rank-1-a2"
    welcomed(hello(c, b"rank-1-a3", resume_session=s1))
    assert c.registry.agents[1].identity == b"rank-1-a3"


def test_an_agent_that_names_no_pid_is_proven_by_an_earlier_session_of_the_holder():
    """An agent with no pid (``pid`` 0: a client of the protocol that does not say it) missed the
    ``Welcome`` of a reopen: it names ``S1``, an earlier session of the holder's that only its own
    process learned (sessions are random), so it takes the rank back at once and keeps a plan in
    flight. Before: ``rank_taken`` until the liveness timeout, as pid 0 proved nothing. Without
    such a session (0, a made-up one, the holder's node differing) it still proves nothing; once
    the holder's session was used, a copy naming ``S1`` is stale."""
    c, _ = harness()
    record = c.registry.agents[1]
    record.node, record.pid = NODE, 0
    s1 = record.session
    plan = start_plan(c)
    welcomed(hello(c, b"rank-1-a2", resume_session=s1, pid=0))  # its Welcome is lost
    for identity, resume, fields in (
        (b"rank-1-x0", 0, {}),
        (b"rank-1-x1", 12345, {}),
        (b"rank-1-x2", s1, {"node": "host-c"}),
        (b"rank-1-x3", s1, {"pid": PID}),
    ):
        assert rejected(hello(c, identity, resume_session=resume, **{"pid": 0, **fields})).code == "rank_taken", (
            identity
        )
        assert c.registry.agents[1].identity == b"rank-1-a2"
    s3 = welcomed(hello(c, b"rank-1-a3", resume_session=s1, pid=0)).session
    assert c.registry.agents[1].identity == b"rank-1-a3" and c.plans.plan is plan and not plan.lost
    beat(c, 1, step=11, epoch=0)  # it got S3 and uses it
    assert rejected(hello(c, b"rank-1-a2-late", resume_session=s1, pid=0)).code == "rank_taken"
    assert c.registry.agents[1].identity == b"rank-1-a3" and c.registry.agents[1].session == s3


def test_a_stale_hello_of_the_process_takes_nothing_once_it_used_its_new_session():
    """Copies of the process's earlier ``Hello`` arriving late (a link that delays or duplicates,
    or two connections read out of order after a coordinator stall), sent before it learned the
    holder's session: once a message under that session came, they are refused, and the rank stays
    on its live connection. The part that fails before the fix is the first ``Hello`` from ``a3``."""
    c, _ = harness()
    s1 = own_process(c).session
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))
    s3 = welcomed(hello(c, b"rank-1-a3", resume_session=s1)).session
    beat(c, 1, step=11, epoch=0)  # the agent got S3 and uses it
    for identity, resume in ((b"rank-1-a2", s1), (b"rank-1-a3-before", s1), (b"rank-1-a1", 0)):
        assert rejected(hello(c, identity, resume_session=resume)).code == "rank_taken", identity
        record = c.registry.agents[1]
        assert record.identity == b"rank-1-a3" and record.session == s3
    assert welcomed(hello(c, b"rank-1-a3", resume_session=s1)).session == s3  # its own retry: the same session


def test_a_process_back_after_a_lost_welcome_keeps_its_verified_step_clock():
    """Ordering (1) with the step clocks verified: the process counts the same steps, so its verdict
    stands (before the fix for this, the step-clock guard knew only the latest session, S2, and a
    ``Hello`` naming S1 made rank 1's clock unverified: plans waited ``step_clock_grace_s``)."""
    from test_step_clock_resume import clock, offsets

    c, _ = harness()
    s1 = own_process(c).session
    for rank in (0, 1):
        beat(c, rank, step=100, epoch=0, clock=clock(32, 2))
    assert offsets(c) == [0, 0]
    welcomed(hello(c, b"rank-1-a2", resume_session=s1))
    welcomed(hello(c, b"rank-1-a3", resume_session=s1))
    assert offsets(c) == [0, 0] and c.clock_allows_planning(time.monotonic())


LIVENESS_S = 10.0


def test_a_real_agent_that_misses_a_welcome_between_two_reopens_is_back_within_seconds(tmp_path):
    """End to end (real sockets, real agents): rank 1's link goes deaf (everything the coordinator
    sends it lost) on its first socket and on its second, so the ``Welcome`` of its resumed
    registration is lost; its third socket gets through. Before: its ``Hello`` was ``rank_taken``
    until the second socket's record was declared dead, ``LIVENESS_S`` (10 s here) after that
    socket's last ``Hello``: measured 9.8 s, the agent on its 10th socket by then (7 ``rank_taken``).
    Now it is welcomed at once (0.01-0.02 s measured)."""
    from conftest import make_model
    from coordinator_thread import CoordinatorThread
    from fault_proxy import FaultProxy

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.placement import PlacementShape
    from eplb_service.worker_agent.agent import WorkerAgent
    from eplb_service.worker_agent.transport_gloo import GlooTransport

    back, front = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/proxy.sock"
    sockets: list[bytes] = []  # rank 1's socket identities, in the order they first sent
    first_sent: dict[bytes, float] = {}
    heartbeats: list[bytes] = []  # up to the coordinator: it heard the agent under its session
    deaf = {"on": False}

    def hold(direction: str, identity: bytes, frame: bytes) -> float:
        if not identity.startswith(b"rank-1-"):
            return 0.0
        if identity not in first_sent:
            first_sent[identity] = time.monotonic()
            sockets.append(identity)
        if direction == "up" and isinstance(protocol.decode(frame), protocol.Heartbeat):
            heartbeats.append(identity)
        lost = direction == "down" and deaf["on"] and sockets.index(identity) < 2
        return 3600.0 if lost else 0.0  # held past the test: lost

    shape = PlacementShape(2, 6, 8, 2)
    cfg = CoordinatorConfig(
        world_size=2,
        endpoint=back,
        liveness_timeout_s=LIVENESS_S,
        agent=protocol.AgentConfig(heartbeat_interval_s=0.1),
    )
    proxy = FaultProxy(front, back, hold=hold).start()
    coord = CoordinatorThread(cfg).start()
    agents = [WorkerAgent(make_model(r, shape), ep, GlooTransport()).start() for r, ep in ((0, back), (1, front))]
    try:
        registry = coord.coordinator.registry

        def wait(predicate, timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            while not predicate():
                assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
                time.sleep(0.02)

        wait(lambda: registry.complete and all(a.welcomed for a in agents), 20, "both ranks registered")
        wait(lambda: bool(heartbeats), 5, "rank 1's first heartbeat")
        deaf["on"] = True
        wait(lambda: len(sockets) >= 3, 20, "rank 1's second reopen")
        reopened_at = first_sent[sockets[2]]
        wait(
            lambda: getattr(registry.agents.get(1), "identity", None) == sockets[2] and agents[1].welcomed,
            2 * LIVENESS_S,
            "rank 1 registered on its third socket",
        )
        back_after_s = time.monotonic() - reopened_at
        print(f"rank 1 back {back_after_s:.2f}s after its second reopen (liveness {LIVENESS_S}s)")
    finally:
        for a in agents:
            a.stop()
        coord.stop()
        proxy.stop()
    assert back_after_s < 2.0, f"rank 1 was back {back_after_s:.1f}s after its reopen (liveness {LIVENESS_S}s)"
    assert agents[1].stats["rank_taken"] == 0 and agents[1].stats["socket_reopened"] == 2, dict(agents[1].stats)


def test_an_agent_refused_as_rank_taken_keeps_its_socket_while_its_hellos_are_answered(tmp_path):
    """The gaps between an unwelcomed agent's ``Hello`` messages (a back-off up to 5 s) are not
    the coordinator's silence: every one was answered. Before: counted from the last frame heard,
    they exceeded the silence limit (1.4 s with heartbeats every 0.1 s), and the agent reopened its
    socket every limit while it waited for its rank (3 reopens in this test's 7 s)."""
    from conftest import make_model
    from test_bad_input import FakeCoordinator

    from eplb_service.placement import PlacementShape
    from eplb_service.worker_agent.agent import WorkerAgent
    from eplb_service.worker_agent.transport_gloo import GlooTransport

    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    agent = WorkerAgent(make_model(1, PlacementShape(2, 6, 8, 2)), endpoint, GlooTransport()).start()
    identities: set[bytes] = set()
    try:
        identity, _ = fake.recv(protocol.Hello)
        config = protocol.AgentConfig(heartbeat_interval_s=0.1)
        fake.send(identity, protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=1, config=config))
        fake.recv(protocol.Heartbeat)
        fake.send(identity, protocol.Reject(reason="declared dead", code="unknown_agent"))
        deadline = time.monotonic() + 7.0
        while time.monotonic() < deadline:
            if fake.sock.poll(50):
                identity, frame = fake.sock.recv_multipart()
                if isinstance(protocol.decode(frame), protocol.Hello):
                    identities.add(identity)
                    fake.send(identity, protocol.Reject(reason="rank 1 is held by a live agent", code="rank_taken"))
    finally:
        agent.stop()
        fake.close()
    assert agent.stats["rank_taken"] >= 3 and len(identities) == 1, (len(identities), dict(agent.stats))
    assert agent.stats["socket_reopened"] == 0, dict(agent.stats)


def test_the_first_rank_back_after_every_rank_was_lost_is_not_taken_for_a_restarted_worker():
    """A process of the deployment that never learned a session (its ``Welcome`` lost, so it says
    ``resume_session=0``, as a new process does) is the first back after every rank was declared
    dead (a partition): it seeds the book with its placement and epoch, and it is not a worker
    restarted alone, since no other rank was there to restart against. Taken for one, the rank 1
    that really did restart meanwhile (initial maps, epoch 0, while rank 0 serves epoch 1) was
    judged against no continuing rank at all: no halt named the split, and rebalancing stopped
    without a word (the epochs never agree again)."""
    c, _ = harness()
    commit_plan(c, step=50)
    hello_of_rank_1 = hello_again(c, 1, step=0, node=NODE, pid=PID)  # a new process: initial maps, epoch 0
    back = hello_again(c, 0, step=60, store_host="127.0.0.1", store_port=1)
    served = c.placements[1].copy()
    for record in list(c.registry.alive):
        c.router.lose_agent(record, time.monotonic())
    # The harness's ranks name no node or pid, nor does this Hello: a process the deployment knows.
    back = msgspec.structs.replace(back, epoch=1, phy2log=protocol.NDArray.from_numpy(served))
    c._handle(b"rank-0-back", back)
    assert c.deployments == 1 and c.registry.agents[0].alive  # the same deployment, rank 0 registered
    assert np.array_equal(c.placements[1], served) and c.epoch == 1
    c._handle(b"rank-1-new", hello_of_rank_1)
    assert c.registry.complete and [r.epoch for r in c.registry.alive] == [1, 0]
    c.watch(time.monotonic())
    assert c.halted_reason is not None and "rank 1 restarted alone" in c.halted_reason, c.halted_reason
