"""The faults that once broke "applied on every rank at the same step or on none", replayed.

Each scenario runs simulated serving ranks (real processes, real serving all-to-alls, the
exact output check on every step, real agents) against a real coordinator, injects one
fault the way an unlucky or hostile production setting would, and checks the promise:
0 output mismatches, every plan committed at one step everywhere or nowhere, identical maps,
no dead or reset agent thread, and a coordinator whose view matches the ranks'.
Timings are scaled down (fence 1 s where production has 5 s) so each scenario takes
seconds; the relations between the timeouts are production's.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from coordinator_thread import CoordinatorThread
from fault_proxy import FaultProxy
from sim_cluster import SimCluster, assert_all_or_none, daemon, record_in_ledger, wait_status

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.sim.workload import SimModelConfig

WORLD = 4
# Scenarios about control messages and step clocks, not about what a plan moves: a 2-layer
# model (instead of 4) halves the serving step and keeps the faults and the checks the same.
SHALLOW = SimModelConfig(num_layers=2)


def sim_config(endpoint: str, **changes) -> CoordinatorConfig:
    agent = dict(fence_timeout_s=1.0, transport_timeout_s=6.0, heartbeat_interval_s=0.3)
    agent.update(changes.pop("agent", {}))
    base = dict(
        world_size=WORLD,
        endpoint=endpoint,
        rebalance_interval_steps=60,
        min_window_steps=30,
        load_half_life_steps=60.0,
        liveness_timeout_s=3.0,
        staging_timeout_s=10.0,
        voting_timeout_s=10.0,
        agent=protocol.AgentConfig(**agent),
    )
    base.update(changes)
    return CoordinatorConfig(**base)


def votes_to(rank: int, held_s: float, times: int):
    """A proxy rule: hold the first ``times`` VoteNow to ``rank`` back by ``held_s``."""
    held = []

    def hold(direction: str, identity: bytes, frame: bytes) -> float:
        if direction != "down" or not identity.startswith(f"rank-{rank}-".encode()) or len(held) >= times:
            return 0.0
        try:
            message = protocol.decode(frame)
        except protocol.ProtocolError:
            return 0.0
        if isinstance(message, protocol.VoteNow):
            held.append(message.plan_id)
            return held_s
        return 0.0

    return hold, held


def outcomes(coordinator) -> list[tuple[str, str]]:
    return [(o.phase, o.reason) for o in coordinator.outcomes]


# -- 1. a control message held back past the fence ------------------------------------------


@pytest.mark.parametrize("held_s", [2.5, 4.0])
def test_a_vote_request_held_back_past_the_fence_never_splits_the_commit(tmp_path, held_s):
    """Before: the late rank committed alone (the others had given up at the fence), ~79,000
    mismatches; at the longer delay the coordinator even recorded the plan as aborted.

    The hold outlasts the others' fence (F steps, then 1 s) unless serving is very slow; then
    the late rank votes in time and the plan commits everywhere: either way, one outcome."""
    back, front = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/proxy.sock"
    hold, held = votes_to(rank=2, held_s=held_s, times=2)
    proxy = FaultProxy(front, back, hold=hold).start()
    coord = CoordinatorThread(sim_config(back)).start()
    try:
        # both held votes are decided by about step 160 and plans commit every ~70 steps after:
        # 450 steps leave room for the held plans and at least two more
        results = SimCluster(WORLD, front, steps=450, seed=5, model=SHALLOW).start().collect()
    finally:
        proxy.stop()
        coord.stop()
    c = coord.coordinator
    assert held, "the fault was not injected"  # one or two votes reached rank 2 late (a slow run has fewer plans)
    assert_all_or_none(results, WORLD)
    assert c.counts["diverged"] == 0 and c.halted_reason is None, outcomes(c)
    held_plans = [o for o in c.outcomes if o.plan_id in held]
    assert held_plans, outcomes(c)
    for o in held_plans:  # the coordinator's outcome is every rank's
        applied = {r: any(plan_id == o.plan_id for plan_id, _ in results[r]["commits"]) for r in results}
        assert o.phase in ("aborted", "committed") and all(applied[r] == (o.phase == "committed") for r in results), (
            o.phase,
            applied,
        )
    assert c.counts["committed"] >= 1, outcomes(c)
    assert all(r["epoch"] == c.epoch for r in results.values()), (c.epoch, [r["epoch"] for r in results.values()])


# -- 2. a rank frozen in the vote; the coordinator killed after a decided vote, engine idle ---


def test_a_rank_frozen_during_the_vote_then_resumed_kills_no_agent(tmp_path):
    """Before: its re-registration rebuilt the side communicator, every agent dropped its
    plan while the commit ticket stayed armed, and 7-8 of 8 agent threads died."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    # 150 fence steps: a long window between the vote and the commit step to freeze in
    coord = CoordinatorThread(sim_config(endpoint, agent={"fence_steps": 150})).start()
    # a plan cycle is ~210 steps here (150 fence steps): 700 steps hold the frozen plan and two more
    cluster = SimCluster(WORLD, endpoint, steps=700, seed=2, model=SHALLOW).start()
    try:
        wait_status(endpoint, lambda s: (s["plan_in_flight"] or {}).get("phase") == "voting", 120, "a vote")
        registry = coord.coordinator.registry
        session = registry.agents[3].session
        os.kill(cluster.pid(3), signal.SIGSTOP)
        # past the liveness timeout (3 s): the coordinator declares rank 3 dead
        wait_status(
            endpoint, lambda s: 3 not in registry.agents or not registry.agents[3].alive, 30, "rank 3 declared dead"
        )
        os.kill(cluster.pid(3), signal.SIGCONT)
        wait_status(
            endpoint,
            lambda s: 3 in registry.agents and registry.agents[3].session != session,
            30,
            "rank 3 declared dead and registered again",
        )
        results = cluster.collect()
    finally:
        cluster.stop()
        coord.stop()
    c = coord.coordinator
    assert_all_or_none(results, WORLD)
    assert c.counts["diverged"] == 0 and c.halted_reason is None, outcomes(c)
    assert c.counts["committed"] >= 2, f"plans must run again after the freeze: {outcomes(c)}"
    assert all(r["epoch"] == c.epoch for r in results.values())


def test_coordinator_killed_after_a_decided_vote_while_the_engine_is_idle(tmp_path):
    """Before: ranks ended at epoch 2, the restarted coordinator at epoch 1, and no plan ran again."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    args = (
        "--rebalance-interval-steps",
        "60",
        "--report-interval-steps",
        "5",
        "--fence-timeout-s",
        "1",
        "--fence-steps",
        "40",
    )
    first = daemon(endpoint, WORLD, *args, log_path=str(tmp_path / "first.log"))
    # every rank stops stepping at step 130 for 6 s: the vote of the first plan (about step 75)
    # is decided, its commit step is not reached before the engine goes idle
    cluster = SimCluster(WORLD, endpoint, steps=450, seed=2, model=SHALLOW, idle_at_step=100, idle_s=6.0).start()
    second = None
    try:
        wait_status(endpoint, lambda s: (s["plan_in_flight"] or {}).get("phase") == "voting", 120, "a vote")
        time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = daemon(endpoint, WORLD, *args, log_path=str(tmp_path / "second.log"))
        results = cluster.collect()
        status = fetch_status(endpoint)
    finally:
        cluster.stop()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
    assert_all_or_none(results, WORLD)
    assert status["halted"] is None, status["halted"]
    assert all(r["epoch"] == status["epoch"] for r in results.values()), (
        status["epoch"],
        [r["epoch"] for r in results.values()],
    )
    assert status["plans"]["committed"] >= 1, f"no plan ran after the restart: {status['plans']}"
    assert results[0]["epoch"] >= 2, "the decided plan and at least one later plan must have committed"


def test_every_voted_and_committed_of_a_plan_lost_while_the_engine_is_idle(tmp_path, caplog):
    """The record says commit; every ``Voted``/``Committed`` of that plan is lost and serving stands
    idle short of S past twice ``voting_timeout_s``. Before: the coordinator booked the plan aborted
    ("maps untouched on every rank"); when the ranks committed at S, their heartbeats named an epoch
    it did not hold and every rank was declared dead and had to register again. Then: the plan
    stayed in flight, outcome unknown (a WARNING, an ``AbortPlan`` to every rank), until the
    heartbeats at the new epoch booked it committed. Now every heartbeat names the decision its
    rank read, so the coordinator knows the record says commit at S while the engine is idle,
    asks nobody to abort, and books the commit once the heartbeats show the new epoch."""
    back, front = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/proxy.sock"
    lost: set[int] = set()

    def hold(direction: str, identity: bytes, frame: bytes) -> float:
        if direction != "up":
            return 0.0
        try:
            message = protocol.decode(frame)
        except protocol.ProtocolError:
            return 0.0
        if isinstance(message, (protocol.Voted, protocol.Committed)) and (not lost or message.plan_id in lost):
            lost.add(message.plan_id)
            return 3600.0  # never delivered while the test runs
        return 0.0

    caplog.set_level(logging.INFO)
    proxy = FaultProxy(front, back, hold=hold).start()
    cfg = sim_config(back, voting_timeout_s=1.0, rebalance_interval_steps=60, agent={"fence_steps": 40})
    coord = CoordinatorThread(cfg).start()
    try:
        # the first vote is near step 75, its S near 115: every rank stands still at step 100 for 4 s
        results = (
            SimCluster(WORLD, front, steps=260, seed=2, model=SHALLOW, idle_at_step=100, idle_s=4.0).start().collect()
        )
    finally:
        proxy.stop()
        coord.stop()
    c = coord.coordinator
    assert len(lost) == 1, lost
    assert_all_or_none(results, WORLD)
    (plan_id,) = lost
    applied = [any(p == plan_id for p, _ in results[r]["commits"]) for r in results]
    assert all(applied), applied
    booked = [o for o in c.outcomes if o.plan_id == plan_id]
    assert [o.phase for o in booked] == ["committed"], outcomes(c)
    assert c.halted_reason is None and c.counts["diverged"] == 0, outcomes(c)
    assert all(r["epoch"] == c.epoch for r in results.values()), (c.epoch, [r["epoch"] for r in results.values()])
    resynced = [r.getMessage() for r in caplog.records if "which this coordinator has not seen" in r.getMessage()]
    assert not resynced, resynced
    unknown = [r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage()]
    assert not unknown, unknown
    assert not c.plans.resent["AbortPlan"], c.plans.resent  # the decision was known: nobody asked to abort
    # no Committed arrived, yet the epoch watch knows the commit step every rank applied the plan at
    epoch = [p for p, _ in results[0]["commits"]].index(plan_id) + 1
    assert c.epoch_watch.commit_steps[epoch][0] == dict(results[0]["commits"])[plan_id], c.epoch_watch.commit_steps


# -- 3. forged identities -------------------------------------------------------------------------


def test_forged_identities_cannot_cut_a_rank_off_or_move_the_epoch(tmp_path):
    """Before: a client reusing an agent's identity cut it off for good, a forged Heartbeat
    halted rebalancing as "diverged", a forged Hello moved the epoch to 1001."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(sim_config(endpoint)).start()
    # long enough to outlast the forging and the liveness timeout below (~6 s) with room to spare
    cluster = SimCluster(WORLD, endpoint, steps=600, seed=3).start()
    ctx = zmq.Context()
    try:
        wait_status(endpoint, lambda s: s["epoch"] is not None, 60, "registration")
        c = coord.coordinator
        victim = c.registry.agents[1]
        identity, session = victim.identity, victim.session

        def forger(ident: bytes | None = None) -> zmq.Socket:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if ident:
                sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(endpoint)
            return sock

        # (a) the agent's own identity: the connection is refused, the agent's route stays
        stolen = forger(identity)
        stolen.send(protocol.encode(protocol.Heartbeat(rank=1, step=10**6, epoch=0, session=session)))
        # (b) a Heartbeat naming rank 1 from another connection, even with the right session
        other = forger(b"rank-1-forged")
        other.send(protocol.encode(protocol.Heartbeat(rank=1, step=10**6, epoch=7, session=session)))
        # (c) a Hello for the held rank, 1000 epochs ahead
        hello = protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=1,
            model=c.model,
            phy2log=protocol.NDArray.from_numpy(c.placements[c.epoch]),
            epoch=c.epoch + 1000,
            step=0,
            transport="gloo",
        )
        other.send(protocol.encode(hello))
        assert other.poll(5000)
        replies = [protocol.decode(other.recv())]
        while other.poll(500):
            replies.append(protocol.decode(other.recv()))
        assert {r.code for r in replies if isinstance(r, protocol.Reject)} >= {"unknown_agent", "rank_taken"}, replies
        time.sleep(3.0 + 1.0)  # past the liveness timeout: the real agent must still be heard
        assert c.registry.agents[1].identity == identity and c.registry.agents[1].alive
        assert c.epoch < 1000 and c.halted_reason is None
        results = cluster.collect()
    finally:
        ctx.destroy(0)
        cluster.stop()
        coord.stop()
    assert_all_or_none(results, WORLD)
    assert c.counts["committed"] >= 2 and c.counts["diverged"] == 0, outcomes(c)
    assert c.metrics.messages_rejected.labels("rank_taken")._value.get() == 1
    assert c.metrics.messages_rejected.labels("unknown_agent")._value.get() >= 1


def test_a_message_naming_another_rank_is_refused_from_a_registered_connection(tmp_path):
    """Heartbeats are filed under the connection's rank and session, never the one a message names."""
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    harness = HandlerHarness()
    c = harness.coordinator
    rank0 = c.registry.agents[0]
    before = c.metrics.messages_rejected.labels("session")._value.get()
    c._handle(rank0.identity, protocol.Heartbeat(rank=1, step=10**6, epoch=5, session=rank0.session))
    c._handle(rank0.identity, protocol.Heartbeat(rank=0, step=10**6, epoch=5, session=rank0.session + 1))
    assert c.metrics.messages_rejected.labels("session")._value.get() == before + 2
    assert c.registry.agents[1].step == 0 and c.registry.agents[0].step == 0 and c.halted_reason is None


@pytest.mark.parametrize("rank, changed", [(1, {"pid": 4242}), (0, {"store_port": 2})])
def test_a_rank_registering_again_mid_staging_gets_one_new_side_communicator_not_two(rank, changed):
    """Before: the abort of the staging batch sent generation g+1 and the registration g+2 right
    behind it. Every rank attempted both rendezvous in turn, so one lost copy of g+1 (or a rank
    still in an older build) left its peers waiting out the transport timeout in g+1 while it
    sat alone in g+2: both failed, and rebalancing waited for the coordinator's retry (62 s).

    The Hello names the rank's session but is not its process (another pid; rank 0 at another
    store): its staged rows and side communicator are gone, so the plan aborts and one new
    generation is built. The same process resuming keeps both (``tests/test_plan_across_reopen.py``)."""
    from eplb_service.coordinator.plan_state import Phase, PlanRun
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    harness = HandlerHarness()
    c = harness.coordinator
    sent: list[tuple[bytes, protocol.Message]] = []
    send = c.send
    c.send = lambda identity, message: (sent.append((identity, message)), send(identity, message))
    generation = c.side_comm.generation
    c.plans.plan = PlanRun(
        plan_id=7,
        base_epoch=c.epoch,
        layers=[0],
        rows=c.placements[c.epoch][[0]].copy(),
        world_size=2,
        staging_timeout_s=10.0,
        voting_timeout_s=10.0,
        started_at=time.monotonic(),
    )
    held = c.registry.agents[rank]
    fields = dict(store_host="127.0.0.1", store_port=1) if rank == 0 else {}
    fields.update(changed)
    hello = protocol.Hello(
        protocol_version=protocol.PROTOCOL_VERSION,
        rank=rank,
        model=c.model,
        phy2log=protocol.NDArray.from_numpy(held.phy2log),
        epoch=c.epoch,
        step=0,
        transport="gloo",
        resume_session=held.session,
        **fields,
    )
    reopened = f"rank-{rank}-reopened".encode()
    c._handle(reopened, hello)  # mid-staging, a Hello with the rank's session from another process
    assert c.outcomes and c.outcomes[-1].phase == Phase.ABORTED.value, outcomes(c)
    assert c.outcomes[-1].code == "agent_lost", outcomes(c)
    generations = sorted({m.generation for _, m in sent if isinstance(m, protocol.CommInit)})
    assert generations == [generation + 1], f"side-communicator generations sent: {generations}"
    assert c.side_comm.generation == generation + 1 and c.current_comm() is not None
    to_rank = {identity for identity, m in sent if isinstance(m, protocol.CommInit)}
    assert to_rank == {c.registry.agents[1 - rank].identity, reopened}, to_rank


def test_every_rank_resuming_its_session_keeps_the_side_communicator_it_has():
    """A coordinator that stalled past the agents' silence limit (SIGSTOP, an overloaded host):
    every agent reopened its socket and resumed its session, same process, its side communicator
    intact. Before: each resumption voided the generation, so the first sent g+1 (to the other
    rank's dead socket too) and the second g+2; one rank sat in g+1 while the other waited in
    g+2, both timed out, and rebalancing stalled until the coordinator's retry (62 s; seen on
    real vLLM under eplb-sidecar after SIGSTOP/SIGCONT of the coordinator)."""
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    harness = HandlerHarness()
    c = harness.coordinator
    generation = c.side_comm.generation
    assert c.current_comm() is not None
    for record in c.registry.agents.values():
        record.comm_generation = generation  # both built it (their heartbeats say so)
    assert c.comm_ready()
    sent: list[tuple[bytes, protocol.Message]] = []
    send = c.send
    c.send = lambda identity, message: (sent.append((identity, message)), send(identity, message))
    for rank in (1, 0):
        held = c.registry.agents[rank]
        hello = protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=rank,
            model=c.model,
            phy2log=protocol.NDArray.from_numpy(held.phy2log),
            epoch=c.epoch,
            step=0,
            transport="gloo",
            store_host="127.0.0.1" if rank == 0 else "",
            store_port=1 if rank == 0 else 0,
            resume_session=held.session,
        )
        c._handle(f"rank-{rank}-reopened".encode(), hello)
        assert c.registry.agents[rank].identity == f"rank-{rank}-reopened".encode()
    generations = sorted({m.generation for _, m in sent if isinstance(m, protocol.CommInit)})
    assert generations == [], f"side-communicator generations sent: {generations}"
    assert c.side_comm.generation == generation and c.comm_ready()
    # A resumed agent that did lose its communicator says so in its next heartbeat: not ready,
    # and the coordinator's retry builds a new generation.
    c.registry.agents[1].comm_generation = -1
    assert not c.comm_ready()


def test_the_coordinator_says_once_when_a_generation_is_built_on_every_rank(caplog):
    """Before: only each agent logged its own ``generation N ready``; at 64+ ranks an operator had
    to count worker lines to know the deployment could rebalance again after a rank came back."""
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    generation = c.side_comm.generation
    built = f"side communicator generation {generation} built on all 2 ranks"
    with caplog.at_level(logging.INFO, logger=c.log.logger.name):
        c.registry.agents[0].comm_generation = generation
        c._log_comm_built(time.monotonic())  # one rank of two: nothing yet
        assert built not in caplog.text
        c.registry.agents[1].comm_generation = generation
        for _ in range(3):  # every tick after: still one line
            c._log_comm_built(time.monotonic())
        assert caplog.text.count(built) == 1, caplog.text
        c.rebuild_comm()  # a rank came back: the next generation gets its own line
        for record in c.registry.agents.values():
            record.comm_generation = generation + 1
        c._log_comm_built(time.monotonic())
    assert caplog.text.count(f"generation {generation + 1} built on all 2 ranks") == 1, caplog.text


# -- 4. memory -------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_large_frames_leaves_the_coordinator_small(tmp_path):
    """Before: 60 MB frames (under the 64 MiB cap) took the coordinator to 2.4 GiB RSS."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    proc = daemon(endpoint, 2)
    ctx = zmq.Context()
    try:
        wait_status(endpoint, lambda s: True, 30, "the coordinator")
        before = rss_mib(proc.pid)
        big, near = b"\x00" * (60 << 20), b"\x00" * (protocol.UNSHAPED_MAX_MESSAGE_BYTES - 16)
        socks = []
        for _ in range(8):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.SNDTIMEO, 0)
            sock.connect(endpoint)
            socks.append(sock)
        deadline = time.monotonic() + 8.0
        sent = 0
        while time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                try:
                    sock.send(big if i % 2 == 0 else near, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            peak = rss_mib(proc.pid)
            time.sleep(0.01)
        after = rss_mib(proc.pid)
        status = fetch_status(endpoint, timeout_s=5)
    finally:
        ctx.destroy(0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    print(f"flood: {sent} frames; coordinator RSS {before:.0f} MiB before, peak {peak:.0f}, after {after:.0f}")
    assert sent > 50
    assert status["world_size"] == 2  # still answering
    assert after - before < 200 and peak - before < 400, f"RSS {before:.0f} -> peak {peak:.0f} -> {after:.0f} MiB"


def test_frame_limit_is_fitted_to_the_model(tmp_path):
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator  # registers 2 ranks of a 2-layer, 8-slot model
    assert c.max_message_bytes == protocol.max_message_bytes(2, 8) < protocol.UNSHAPED_MAX_MESSAGE_BYTES
    report = protocol.encode(
        protocol.LoadReport(
            rank=0,
            epoch=0,
            step_begin=0,
            step_end=10,
            slot_load=protocol.NDArray.from_numpy(np.zeros((60, 544), dtype=np.int64)),
            session=1,
        )
    )
    assert len(report) < protocol.max_message_bytes(60, 544)
    with pytest.raises(protocol.ProtocolError, match="exceeds the limit"):
        protocol.decode(b"\x00" * (c.max_message_bytes + 1), c.max_message_bytes)


# -- 5. recording on a disk that refuses writes -------------------------------------------------


def test_recording_to_an_unwritable_path_turns_recording_off_and_planning_goes_on(tmp_path):
    """Before: the tick loop died silently (an unawaited task), /livez flapped, plans and
    liveness expiry stopped, and SIGTERM exited 1 with a traceback."""
    import urllib.request

    endpoint = f"ipc://{tmp_path}/c.sock"
    blocker = tmp_path / "traces"
    blocker.mkdir()  # writable at start (the coordinator checks), gone before the first flush
    log = tmp_path / "coordinator.log"
    proc = daemon(
        endpoint,
        WORLD,
        "--rebalance-interval-steps",
        "60",
        "--report-interval-steps",
        "5",
        "--fence-timeout-s",
        "1",
        "--record",
        str(blocker / "trace.npz"),
        "--metrics-port",
        "0",
        log_path=str(log),
    )
    wait_status(endpoint, lambda s: True, 60, "the coordinator up")  # it checked --record's directory
    blocker.rmdir()
    blocker.write_text("a file where the trace's directory was")
    cluster = SimCluster(WORLD, endpoint, steps=500, seed=4).start()
    try:
        wait_status(endpoint, lambda s: s["plans"]["committed"] >= 1, 120, "a commit")
        deadline = time.monotonic() + 30
        while "recording is off" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first flush with a closed window (every 5 s) fails
        committed_at_failure = fetch_status(endpoint)["plans"]["committed"]
        wait_status(
            endpoint,
            lambda s: s["plans"]["committed"] > committed_at_failure,
            60,
            "a commit after the recording failure",
        )
        results = cluster.collect()
        status = fetch_status(endpoint)
        text = log.read_text()
        port = int(text.split("metrics ")[1].split(",")[0])
        livez = urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5).status
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        cluster.stop()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert "recording load windows to" in text and "failed" in text and "recording is off" in text
    assert "Traceback" not in text.split("recording is off")[-1], "a traceback after the recording failure"
    assert livez == 200
    assert "eplb_recording_errors_total 1.0" in metrics and "eplb_recording_enabled 0.0" in metrics
    assert_all_or_none(results, WORLD)
    assert status["plans"]["committed"] >= 2, status["plans"]


# -- 6. a socket directory someone else prepared ----------------------------------------------


def test_a_socket_directory_of_another_user_is_refused(tmp_path):
    from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory, check_private_dir

    directory = tmp_path / "eplb"
    directory.mkdir(mode=0o700)
    check_private_dir(str(directory))
    with pytest.raises(UnsafeSocketDirectory, match=f"owned by uid {os.geteuid()}, not by this user \\(uid 12345\\)"):
        check_private_dir(str(directory), uid=12345)
    directory.chmod(0o755)
    with pytest.raises(UnsafeSocketDirectory, match="mode 0755, expected 0700"):
        check_private_dir(str(directory))
    link = tmp_path / "link"
    link.symlink_to(directory)
    with pytest.raises(UnsafeSocketDirectory, match="symlink"):
        check_private_dir(str(link))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_squatted_socket_directory_stops_the_coordinator_and_status(tmp_path):
    """Before: the directory was chmodded but still theirs; `status` as root talked to their server."""
    squatted = tmp_path / "squatted"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    endpoint = f"ipc://{squatted}/coordinator.sock"
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "is owned by uid 65534, not by this user (uid 0)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "owned by uid 65534" in out.stderr and "Traceback" not in out.stderr


# -- 7. a rank whose step clock is off by one ---------------------------------------------------


def test_a_rank_counting_one_extra_step_halts_rebalancing_before_any_commit(tmp_path):
    """Before: every commit tore for one forward pass (7-10 mismatches per rank, 147 on the
    offset rank), with no warning anywhere."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(sim_config(endpoint)).start()
    try:
        # unhalted, 300 steps would commit about four plans (one every ~70 steps)
        results = (
            SimCluster(WORLD, endpoint, steps=300, seed=1, model=SHALLOW, per_rank={2: {"extra_steps": 1}})
            .start()
            .collect()
        )
    finally:
        coord.stop()
    c = coord.coordinator
    record_in_ledger(results, WORLD)
    assert c.halted_reason is not None and "rank 2 counts +1 step(s) against rank 0" in c.halted_reason, c.halted_reason
    assert c.counts["committed"] == 0, outcomes(c)
    assert sum(r["mismatches"] for r in results.values()) == 0
    assert all(r["epoch"] == 0 for r in results.values())
    assert c.metrics.step_clock_offset.labels("2")._value.get() == 1


# -- 8. vLLM restarted under a coordinator that outlives it -------------------------------------


def test_a_vllm_restart_under_a_running_coordinator_is_a_new_deployment(tmp_path):
    """Before: the coordinator (a daemon, a k8s sidecar container) kept the old deployment's
    commit steps, and the restarted ranks (epoch 0, step 0) read as past epoch 1's commit step
    with the old maps: "placements diverged", rebalancing halted for good, the alert fired."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    world = 2  # what is tested is the coordinator's memory of the first deployment, not its size
    coord = CoordinatorThread(sim_config(endpoint, world_size=world)).start()
    try:
        first = SimCluster(world, endpoint, steps=300, seed=1, model=SHALLOW).start().collect()
        c = coord.coordinator
        committed_first = c.counts["committed"]
        assert committed_first >= 1 and c.epoch >= 1, outcomes(c)
        second = SimCluster(world, endpoint, steps=300, seed=2, model=SHALLOW).start().collect()
    finally:
        coord.stop()
    for results in (first, second):
        assert_all_or_none(results, world)
    assert c.counts["diverged"] == 0 and c.halted_reason is None, outcomes(c)
    assert c.counts["committed"] > committed_first, f"the restarted deployment must be rebalanced: {outcomes(c)}"
    assert all(r["commits"] for r in second.values()), "every rank of the new deployment committed"
    assert all(r["epoch"] == c.epoch for r in second.values()), (c.epoch, [r["epoch"] for r in second.values()])
    assert c.deployments == 2
