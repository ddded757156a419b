"""Every agent state, every message, every order: the agent never raises and never applies half.

A real ``WorkerAgent`` (one rank, so a plan is local copies and the vote's all-reduce is its
own vector) runs without its thread: the test calls the loop's own steps (``_handle``,
``_tick``), the serving hooks, and a decision record that other (imaginary) ranks may write
first. Hypothesis picks the sequence: protocol messages that fit the flow (Welcome, CommInit,
Plan for the current epoch, VoteNow, AbortPlan...) mixed with arbitrary well-typed ones,
serving steps, agent ticks, and another rank deciding. After every action: nothing raised,
live rows hold what the live maps say, and a plan was applied only where its record says
``commit``, at its commit step.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import msgspec
import numpy as np
import pytest
import torch
from conftest import MemoryRecord, make_model, rows_match_maps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_service import protocol
from eplb_service.placement import PlacementShape
from eplb_service.testing.protocol_fuzz import message_strategy
from eplb_service.worker_agent.agent import SILENCE_HEARTBEATS, WorkerAgent, silence_limit_s
from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.serving_hooks import LoadSnapshot
from eplb_service.worker_agent.transport import Transport

SHAPE = PlacementShape(num_layers=2, num_logical=3, num_physical=4, num_ranks=1)
FAST = protocol.AgentConfig(
    report_interval_steps=2,
    heartbeat_interval_s=0.01,
    fence_steps=2,
    fence_timeout_s=0.001,
    transport_timeout_s=1.0,
    decision_timeout_s=0.5,
)


class LocalTransport(Transport):
    """One rank: connecting always works, the all-reduce returns this rank's own vector."""

    name = "local"

    def __init__(self) -> None:
        self._generation, self._connected = -1, False

    def connect(self, comm, rank, timeout_s):
        self._generation, self._connected = comm.generation, True

    def store_keys(self, comm):
        return []

    def exchange(self, ops, pace_s=0.0):
        raise AssertionError("a one-rank plan has no remote ops")

    def copy_local(self, dst, src):
        dst.copy_(src)

    def max_reduce(self, values):
        self._poll()
        return np.asarray(values, dtype=np.int64).copy()

    def synchronize(self):
        pass

    def abort(self):
        self._connected = False

    @property
    def connected(self):
        return self._connected

    @property
    def generation(self):
        return self._generation


class SyncDecider:
    """The decider without its thread: proposals are answered at once."""

    def __init__(self) -> None:
        self.proposals = 0

    def start(self):
        return self

    def stop(self):
        pass

    def submit(self, ticket, record, proposal):
        self.proposals += 1
        ticket.resolve(record.propose(ticket.plan_id, proposal))


class Socket:
    def __init__(self) -> None:
        self.sent: list[protocol.Message] = []

    def send(self, frame, flags=0):
        self.sent.append(protocol.decode(frame))

    def poll(self, timeout_ms, flags=0):
        return 0

    def close(self, linger=0):
        pass


class Harness:
    def __init__(self, transport: Transport | None = None) -> None:
        self.model = make_model(0, SHAPE)
        transport = transport if transport is not None else LocalTransport()
        self.agent = agent = WorkerAgent(self.model, "ipc:///nonexistent/agent-states.sock", transport)
        agent.link.sock = Socket()
        agent.decider = SyncDecider()
        agent._store = ("127.0.0.1", 1)
        agent.link.open = lambda: setattr(agent.link, "last_heard", 10**12)  # no real socket; never "silent"
        agent.link.last_heard = 10**12
        self.record = MemoryRecord()
        agent.side.record_factory = lambda host, port, timeout_s: self.record
        self.plan_ids = itertools.count(1000)
        self.generations = itertools.count(1)
        self.applied: list[tuple[int, int]] = []

    # -- messages that fit the flow ------------------------------------------------------

    def comm(self) -> protocol.CommInit:
        return protocol.CommInit(generation=next(self.generations), store_host="127.0.0.1", store_port=1, world_size=1)

    def welcome(self) -> None:
        """The coordinator's Welcome (session 7) with a side communicator to build."""
        self.deliver(
            protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7, comm=self.comm()
            )
        )

    def plan(self) -> protocol.Plan:
        rows = self.model.phy2log.numpy()[[1]].copy()
        rows[0] = np.roll(rows[0], 1)
        return protocol.Plan(
            plan_id=next(self.plan_ids),
            base_epoch=self.agent.hooks.epoch,
            layers=[1],
            phy2log=protocol.NDArray.from_numpy(rows),
        )

    def current_plan_id(self) -> int:
        agent = self.agent
        if agent._ticket is not None:
            return agent._ticket.plan_id
        return agent._plan.plan_id if agent._plan is not None else 0

    # -- actions -------------------------------------------------------------------------

    def deliver(self, message: protocol.Message) -> None:
        agent = self.agent
        agent._handle(message)
        if agent.side.connecting is not None:
            agent.side.connecting.join(5)
        agent._check_connect()

    def tick(self) -> None:
        self.agent._tick(poll_ms=0)

    def step(self) -> None:
        hooks = self.agent.hooks
        before = hooks.epoch
        ticket = hooks.ticket
        hooks.before_step()
        if hooks.epoch != before:
            decision = self.record.decisions.get(ticket.plan_id)
            assert decision is not None and decision.commit, f"plan {ticket.plan_id} applied without a commit record"
            assert decision.commit_step == hooks.steps_done, (decision, hooks.steps_done)
            self.applied.append((ticket.plan_id, hooks.steps_done))
        hooks.after_step(None)

    def serve(self, steps: int, check: bool = True) -> None:
        """``steps`` serving steps, each followed by one agent tick and, unless ``check`` is off,
        the harness's invariants (:meth:`check`)."""
        for _ in range(steps):
            self.step()
            self.tick()
            if check:
                self.check()

    def other_rank_decides(self, commit: bool) -> None:
        plan_id = self.current_plan_id()
        if plan_id:
            self.record.decisions.setdefault(
                plan_id,
                Decision.commit_at(self.agent.hooks.steps_done + 2, 1)
                if commit
                else Decision.abort(1, "another rank gave up"),
            )

    def check(self) -> None:
        agent, model = self.agent, self.model
        assert rows_match_maps(model), "a live row holds another expert than the live map says"
        assert agent.hooks.epoch == len(self.applied)
        if agent._ticket is None and agent.hooks.ticket is None:
            assert np.array_equal(agent.phy2log_host, model.phy2log.numpy()), "the agent's host copy lags the maps"


def flow_messages(h: Harness):
    return st.one_of(
        st.builds(
            lambda c: protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7, comm=h.comm() if c else None
            ),
            st.booleans(),
        ),
        st.builds(lambda: h.comm()),
        st.builds(lambda: h.plan()),
        st.builds(lambda: protocol.VoteNow(plan_id=h.current_plan_id())),
        st.builds(lambda: protocol.AbortPlan(plan_id=h.current_plan_id(), reason="test")),
        st.just(protocol.CoordinatorStopping(reason="test")),
        st.builds(lambda s: protocol.HeartbeatAck(session=s), st.sampled_from([7, 8])),
        st.builds(
            lambda code: protocol.Reject(reason="test", code=code),
            st.sampled_from(["unknown_agent", "stale_session", "rank_taken", "bad_message"]),
        ),
    )


def any_message():
    """Arbitrary messages as the agent can receive them: only what decodes (the decoder refuses
    the rest at the edge); a Welcome keeps the fast timings (a 10^300 s fence would only wait)."""

    def decodable(message) -> bool:
        try:
            protocol.decode(protocol.encode(message))
        except (protocol.ProtocolError, OverflowError, ValueError):
            return False
        return True

    def tame(message):
        if isinstance(message, protocol.Welcome):
            return msgspec.structs.replace(message, config=FAST)
        return message

    return message_strategy().filter(decodable).map(tame)


# Built once: a strategy is validated on its first draw, and validating the message strategy
# again on every draw made up most of this test's time.
ANY_MESSAGE = any_message()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_any_sequence_of_messages_steps_and_decisions_keeps_the_agent_sound(data):
    h = Harness()
    h.welcome()
    actions = collections.Counter()
    flow = flow_messages(h)
    for _ in range(data.draw(st.integers(5, 60), label="length")):
        kind = data.draw(
            st.sampled_from(["flow", "flow", "flow", "any", "step", "step", "tick", "decide"]), label="action"
        )
        actions[kind] += 1
        if kind == "flow":
            h.deliver(data.draw(flow, label="message"))
        elif kind == "any":
            h.deliver(data.draw(ANY_MESSAGE, label="random message"))
        elif kind == "step":
            h.step()
        elif kind == "tick":
            h.tick()
        else:
            h.other_rank_decides(data.draw(st.booleans(), label="commit"))
        h.check()
    h.serve(8)  # drain: the serving thread finishes any ticket, the agent reports it


def test_the_happy_path_commits_through_the_record():
    """The same harness, scripted: Welcome, Plan, VoteNow, steps: committed at S once."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    assert any(isinstance(m, protocol.Staged) for m in h.agent.link.sock.sent)
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    decision = h.record.decisions[plan.plan_id]
    assert decision.commit and decision.commit_step == FAST.fence_steps
    h.serve(4)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)]
    sent = [type(m).__name__ for m in h.agent.link.sock.sent]
    assert "Voted" in sent and "Committed" in sent
    assert torch.equal(h.model.phy2log[1], torch.from_numpy(plan.phy2log.to_numpy()[0]))


def test_a_serving_thread_that_reached_the_fence_before_it_saw_the_entry_makes_the_vote_abort():
    """The serving thread sees the armed ticket only once its entry step is set; in the few
    bytecodes between reading ``steps_done`` as the entry ``e`` and setting it, it may run on to
    ``e + F`` (the GIL switches every 5 ms, a step can be shorter). It may be inside step ``e + F``
    undecided then, so a commit at ``S = e + F`` could land after it on this rank and at ``S`` on
    every other: this rank must vote ``fail`` and the record say ``abort``."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    hooks = h.agent.hooks
    entry = hooks.steps_done
    promised = hooks.ticket_fence_steps

    def serving_thread_runs_ahead(ticket):
        fence = promised(ticket)
        hooks.steps_done = entry + fence  # the steps it ran while the entry was not yet visible
        return fence

    hooks.ticket_fence_steps = serving_thread_runs_ahead
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    decision = h.record.decisions[plan.plan_id]
    assert not decision.commit and decision.code == "vote_failed", decision
    del hooks.ticket_fence_steps
    h.serve(3)
    assert h.applied == [] and hooks.epoch == 0


def test_a_new_side_communicator_during_the_vote_keeps_the_ticket_and_commits():
    """The death of issue 13: a CommInit arriving after the vote dropped the plan under an armed ticket."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    h.deliver(h.comm())  # e.g. a rank re-registered and the coordinator rebuilt the communicator
    h.deliver(protocol.CoordinatorStopping(reason="restart"))
    h.serve(4)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)]
    assert h.agent.stats["internal_errors"] == 0


def test_config_overrides_survive_a_new_welcome_and_name_a_bad_field():
    """What a host tuning its own agent (the GPU harness) relies on: ``override_config`` sets
    the fields now and a later Welcome with the coordinator's values does not undo them."""
    h = Harness()
    welcome = protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7)
    h.deliver(welcome)
    config = h.agent.override_config(throttle_bytes_per_s=5e9, fence_steps=5)
    assert config is h.agent.config
    assert (config.throttle_bytes_per_s, config.fence_steps, h.agent.hooks.fence_steps) == (5e9, 5, 5)
    h.deliver(msgspec.structs.replace(welcome, session=8))
    config = h.agent.config
    assert (config.throttle_bytes_per_s, config.fence_steps, h.agent.hooks.fence_steps) == (5e9, 5, 5)
    assert config.report_interval_steps == FAST.report_interval_steps
    try:
        h.agent.override_config(throttle_gbps=1.0)
    except ValueError as exc:
        assert "throttle_gbps" in str(exc)
    else:
        raise AssertionError("an unknown AgentConfig field was accepted")


def test_busy_from_plan_receipt_until_its_commit():
    h = Harness()
    h.welcome()
    assert not h.agent.busy
    plan = h.plan()
    h.deliver(plan)
    assert h.agent.busy
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    assert h.agent.busy
    h.serve(4, check=False)
    assert h.applied and not h.agent.busy


class LateRecord(SyncDecider):
    """The decision record answers late (a slow link to rank 0's store): proposals are held
    until the serving thread asks at its fence, or until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def submit(self, ticket, record, proposal):
        self.proposals += 1
        self.held.append((ticket, record, proposal))
        if proposal.code == "fence_timeout":
            self.release()

    def release(self) -> None:
        for ticket, record, proposal in self.held:
            ticket.resolve(record.propose(ticket.plan_id, proposal))
        self.held.clear()


def test_a_welcome_with_a_longer_fence_mid_vote_keeps_the_fence_the_vote_promised():
    """Before: a coordinator restarted with a larger ``--fence-steps`` re-registered the rank
    mid-vote, and the rank's fence moved with it (2 -> 300 steps) while the commit step of the
    record stayed ``entry + 2``. With the record's answer a few steps late, the rank served
    past the commit step undecided and then skipped the plan ("missed_commit_step") that
    every other rank applied at step 2: a split commit."""
    h = Harness()
    welcome = protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7)
    h.deliver(msgspec.structs.replace(welcome, comm=h.comm()))
    plan = h.plan()
    h.deliver(plan)
    h.agent.decider = late = LateRecord()
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))  # armed at step 0; proposes commit at 0 + 2
    assert late.held and h.agent.hooks.ticket is not None
    h.record.decisions[plan.plan_id] = Decision.commit_at(FAST.fence_steps, 1)  # the peers decided first
    h.deliver(
        msgspec.structs.replace(welcome, session=8, config=msgspec.structs.replace(FAST, fence_steps=300))
    )  # the restarted coordinator's config
    assert h.agent.hooks.fence_steps == 300
    h.serve(2 * FAST.fence_steps)
    late.release()
    h.serve(2)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)], (h.applied, h.agent.stats)


def test_a_late_copy_of_an_older_side_communicator_keeps_the_newer_one_and_the_staged_plan():
    """Before: a CommInit of generation 2 reordered behind generation 3 (the documented
    "reordered" fault) dropped the staged plan and tore down generation 3 to join a
    rendezvous the peers had left; a second copy of an attempted one dropped the plan too."""
    h = Harness()
    h.welcome()
    second, third = h.comm(), h.comm()
    h.deliver(third)  # generation 2's copy is late
    plan = h.plan()
    h.deliver(plan)
    assert h.agent._plan is not None and h.agent.transport.generation == third.generation
    for late in (second, third, second):
        h.deliver(late)
        h.tick()
    assert h.agent._plan is not None and h.agent._plan.plan_id == plan.plan_id
    assert h.agent.transport.generation == third.generation and h.agent.side_ready
    assert not any(isinstance(m, protocol.Aborted) for m in h.agent.link.sock.sent)


def test_a_hello_sent_right_after_the_serving_thread_commits_pairs_the_epoch_with_its_placement():
    """Before: the serving thread bumps ``hooks.epoch`` at the commit boundary, and the agent
    folds the plan's rows into its host copy of the placement only when it next reports the
    ticket, at the end of its tick. A ``Hello`` built between the two (the top of the next tick,
    e.g. registering with a coordinator restarted after the vote) carried the new epoch with
    the old placement: a restarted coordinator adopted that wrong placement for the epoch and
    refused every other rank's right one as a conflict."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    h.deliver(protocol.Reject(reason="coordinator restarted", code="unknown_agent"))  # register again
    h.agent._next_hello = 0.0
    while not h.applied:  # the serving thread reaches S and commits; the agent has not ticked since
        h.step()
    h.agent.link.sock.sent.clear()
    h.tick()  # the Hello goes out first in the tick, before the ticket is reported
    hellos = [m for m in h.agent.link.sock.sent if isinstance(m, protocol.Hello)]
    assert hellos, h.agent.link.sock.sent
    hello = hellos[0]
    assert hello.epoch == 1
    assert np.array_equal(hello.phy2log.to_numpy(), h.model.phy2log.numpy()), "Hello pairs epoch 1 with epoch 0's maps"
    h.tick()
    h.check()


def test_an_agent_stopping_mid_vote_leaves_its_decider_answering_the_armed_ticket(monkeypatch):
    """Before: the agent thread's exit stopped the decider right after asking for ``abort``,
    and a stopped decider dropped proposals it had not got an answer for yet. If the record
    had just failed to answer (a blip on the link to rank 0's store), the armed ticket was
    never decided on this rank: its serving thread waited out the fence and the decision
    bound and raised ``UndecidedCommit`` (the worker stops) while the record was reachable
    again and said ``commit`` for every other rank."""
    from types import SimpleNamespace

    from eplb_service.worker_agent import agent as agent_module
    from eplb_service.worker_agent.decision import Decider, DecisionUnavailable

    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)

    class Blip:
        address = "blip"

        def __init__(self, record: MemoryRecord) -> None:
            self.record, self.down = record, True
            self.failed = threading.Event()

        def propose(self, plan_id, proposal):
            if self.down:
                self.failed.set()
                raise DecisionUnavailable("link to rank 0's store reset")
            return self.record.propose(plan_id, proposal)

    blip = Blip(h.record)
    h.agent.side.record = blip
    h.agent.decider = Decider(0).start()
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))  # proposes commit; the record does not answer
    assert blip.failed.wait(5) and not h.agent.hooks.ticket.is_decided
    monkeypatch.setattr(
        agent_module, "host_once", lambda endpoint, world: SimpleNamespace(host="h", port=1, store=None)
    )
    h.agent._stop.set()
    h.agent._run()  # the agent thread's exit path: abandon the plan (propose abort), stop the decider
    blip.down = False  # the record answers again
    h.agent.hooks.decision_timeout_s = 10.0
    for _ in range(FAST.fence_steps + 1):
        h.step()  # UndecidedCommit here before the fix
    assert h.applied == [(plan.plan_id, FAST.fence_steps)]


def test_reporting_an_aborted_ticket_never_tears_down_a_side_communicator_being_built():
    """Before: reporting a ticket the record aborted tore the side communicator down when its
    generation was still the ticket's, a check and an act on the agent thread while a
    ``CommInit`` that arrived mid-vote was being built on the helper thread. A build that
    finished between the two (here: right after the check read the old generation) was
    aborted at once, on this rank only: its peers held the new generation and this rank
    answered the next plan ``not_connected``."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.other_rank_decides(commit=False)  # another rank gave up first: the record says abort
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    transport = h.agent.transport
    release = threading.Event()
    connect = transport.connect

    def slow_connect(comm, rank, timeout_s):  # the rendezvous of the new generation takes a while
        release.wait(10)
        connect(comm, rank, timeout_s)

    transport.connect = slow_connect
    newer = h.comm()
    h.agent._handle(newer)  # a rank re-registered mid-vote: the build starts on the helper thread
    assert h.agent.side.connecting.is_alive()
    ticket = h.agent.hooks.ticket
    h.step()  # the serving thread finishes the ticket: aborted
    assert ticket.finished.is_set() and ticket.outcome == "aborted"
    cls = type(transport)

    class WindowAtTheCheck(cls):  # the build completes right after the check reads the generation
        @property
        def generation(self):
            value = cls.generation.fget(self)
            if h.agent.voter.ticket is None and not release.is_set():  # report() took the finished ticket
                release.set()
                h.agent.side.connecting.join(10)
            return value

    transport.__class__ = WindowAtTheCheck
    h.tick()  # reports the aborted ticket
    transport.__class__ = cls
    release.set()
    h.agent.side.connecting.join(10)
    assert any(isinstance(m, protocol.Aborted) for m in h.agent.link.sock.sent)
    assert transport.generation == newer.generation
    assert h.agent.side_ready, "the freshly built side communicator was torn down"


class PairedTransport(LocalTransport):
    """Two agents' vote all-reduce: each contributes its vector; both get the elementwise MAX."""

    def __init__(self, pair: dict) -> None:
        super().__init__()
        self.pair = pair

    def max_reduce(self, values):
        self.pair.setdefault("vectors", []).append(np.asarray(values, dtype=np.int64).copy())
        self.pair["barrier"].wait()
        return np.maximum(*self.pair["vectors"])


def test_ranks_voting_with_different_fences_commit_at_one_step_every_fence_covers():
    """Before: every rank proposed ``S = max(entry) + F`` with its own fence ``F``. With fences
    that differ between ranks (a coordinator restarted with another ``--fence-steps`` whose
    Welcome reached one rank before its VoteNow and the other after), the rank with the short
    fence could win the record with an ``S`` before the other rank's fence: that rank served
    past ``S`` undecided (its decision a few steps late) and skipped the plan
    (``missed_commit_step``) that the first rank applied: a split commit."""
    pair = {"barrier": threading.Barrier(2, timeout=10)}
    short, long = Harness(PairedTransport(pair)), Harness(PairedTransport(pair))
    long.record = short.record  # one decision record for the deployment
    for h in (short, long):
        h.deliver(
            protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7, comm=h.comm())
        )
    long.agent.override_config(fence_steps=40)
    plan = short.plan()
    assert long.plan().plan_id == plan.plan_id  # the same plan id and rows on both "ranks"
    for h in (short, long):
        h.deliver(plan)
    long.agent.decider = late = LateRecord()  # its proposals reach the record late
    voting = threading.Thread(target=short.deliver, args=(protocol.VoteNow(plan_id=plan.plan_id),))
    voting.start()  # proposes first (its decider answers at once)
    long.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    voting.join(10)
    decision = short.record.decisions[plan.plan_id]
    for _ in range(FAST.fence_steps + 2):  # the long-fence rank serves on, its answer not back yet
        for h in (short, long):
            h.step()
            h.tick()
    late.release()
    for _ in range(60):
        for h in (short, long):
            h.step()
            h.tick()
    assert short.applied == long.applied == [(plan.plan_id, decision.commit_step)], (
        short.applied,
        long.applied,
        decision,
    )


def test_a_repeated_welcome_carrying_the_communicator_joins_it_without_a_second_welcomed_line(caplog):
    """A Hello retried before its Welcome arrived (a coordinator slow to answer just after a
    restart) is answered twice, the second time with the side communicator once every rank is
    registered. The agent joins it; it was welcomed once, and says so once (seen on real vLLM:
    "welcomed by the coordinator" twice, as if the rank had registered twice)."""
    h = Harness()
    caplog.set_level("INFO", logger="eplb_service.worker_agent.agent")
    h.deliver(protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7))
    assert not h.agent.side_ready
    h.welcome()  # the same session, now with the communicator
    assert h.agent.side_ready
    welcomed = [r for r in caplog.records if "welcomed by the coordinator" in r.getMessage()]
    assert len(welcomed) == 1, [r.getMessage() for r in welcomed]


def test_a_copy_of_a_plan_is_answered_again_with_the_first_answer(monkeypatch):
    """The coordinator sends a ``Plan`` again to a rank it has no answer from. Before, an agent
    ignored every copy of a plan it had seen, so a lost ``Staged`` or ``Failed`` held the plan
    until the staging timeout aborted it; now the copy gets the same answer (staged once)."""
    import eplb_service.worker_agent.agent as agent_module

    monkeypatch.setattr(agent_module, "ANSWER_AGAIN_S", 0.0)
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.deliver(plan)  # the coordinator missed the Staged and sent the Plan again
    answers = [m for m in h.agent.link.sock.sent if isinstance(m, (protocol.Staged, protocol.Failed))]
    assert [(type(m).__name__, m.plan_id) for m in answers] == [("Staged", plan.plan_id)] * 2
    assert h.agent.stats["staged"] == 1, "a copy must not stage the plan again"
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    h.serve(4)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)]
    stale = msgspec.structs.replace(h.plan(), plan_id=plan.plan_id + 1, base_epoch=0)  # epoch 1 now: refused
    h.deliver(stale)
    h.deliver(stale)
    failed = [m for m in h.agent.link.sock.sent if isinstance(m, protocol.Failed)]
    assert [(m.plan_id, m.code) for m in failed] == [(stale.plan_id, failed[0].code)] * 2
    monkeypatch.setattr(agent_module, "ANSWER_AGAIN_S", 60.0)
    h.deliver(stale)  # copies queued while the rank was busy arrive together: one answer per interval
    assert len([m for m in h.agent.link.sock.sent if isinstance(m, protocol.Failed)]) == 2


def test_a_copy_of_vote_now_says_the_decision_again_and_a_plan_after_its_abort_is_not_staged():
    """The coordinator sends ``VoteNow`` again to a rank it has no outcome from. Before, the copy
    was ignored, so a lost ``Voted`` was never said again; now a decided vote answers it with the
    same ``Voted`` (never a second vote). And a ``Plan`` held back past its ``AbortPlan`` was staged
    (the abort was forgotten when the plan started); now it is answered ``Aborted``."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    vote = protocol.VoteNow(plan_id=plan.plan_id)
    h.deliver(vote)
    h.deliver(vote)  # a copy before the decision is known: nothing to say yet
    h.tick()
    voted = [m for m in h.agent.link.sock.sent if isinstance(m, protocol.Voted)]
    assert [(m.plan_id, m.ok) for m in voted] == [(plan.plan_id, True)]
    h.deliver(vote)  # the coordinator missed that Voted
    voted = [m for m in h.agent.link.sock.sent if isinstance(m, protocol.Voted)]
    assert [(m.plan_id, m.commit_step, m.ok) for m in voted] == [(plan.plan_id, voted[0].commit_step, True)] * 2
    assert h.agent.stats["votes"] == 1, "a copy must never vote again"
    h.serve(4, check=False)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)]
    late = h.plan()
    h.deliver(protocol.AbortPlan(plan_id=late.plan_id, reason="staging timed out", code="staging_timeout"))
    h.deliver(late)  # held back on the link past its AbortPlan
    assert h.agent._plan is None and h.agent.stats["staged"] == 1
    aborted = [m for m in h.agent.link.sock.sent if isinstance(m, protocol.Aborted)]
    assert [(m.plan_id, m.code) for m in aborted] == [(late.plan_id, "aborted_by_coordinator")]


def test_a_new_comm_init_during_staging_ends_the_exchange_at_once():
    """The coordinator sends a new side-communicator generation only after the plan in flight ended.
    Before, a rank still in that plan's exchange (its ``AbortPlan`` lost) read only ``AbortPlan``
    while staging, so it stayed until its transport timeout with the ``CommInit`` queued, and its
    peers' rendezvous of the new generation could time out waiting for it; now the new
    ``CommInit`` ends the staging at the next poll (the plan answered ``Aborted``)."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    agent = h.agent
    incoming = [[h.comm()]]
    agent.link.receive = lambda poll_ms: incoming.pop() if incoming else []
    original = agent._stage

    def stage(p, rows):
        agent._pump_while_staging(p.plan_id)  # what the pipeline does between chunks
        return original(p, rows)

    agent._stage = stage
    h.deliver(plan)
    assert agent._plan is None and agent.stats["staged"] == 0
    aborted = [m for m in agent.link.sock.sent if isinstance(m, protocol.Aborted)]
    assert [(m.plan_id, m.code) for m in aborted] == [(plan.plan_id, "aborted_by_coordinator")]
    h.tick()  # the queued CommInit is then built
    assert agent.side_ready and agent.transport.generation == 2


def test_an_abort_plan_is_answered_with_the_record_content_also_after_the_commit():
    """The coordinator books a vote's outcome only on evidence of the record's content, and asks a
    silent rank with ``AbortPlan`` copies. Before, a rank whose vote was decided ignored them (its
    ``Voted`` and ``Committed`` lost, the coordinator could not learn that the record said
    commit); now each is answered with the ``Voted``, during the ticket and after it finished."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    h.tick()
    abort = protocol.AbortPlan(plan_id=plan.plan_id, reason="vote timed out", code="voting_timeout")
    h.deliver(abort)  # in the vote: the proposal loses to "commit", and the rank says so
    h.serve(4, check=False)
    assert h.applied == [(plan.plan_id, FAST.fence_steps)] and h.agent._ticket is None
    h.deliver(abort)  # a copy after the commit: still the record's content
    voted = [(m.plan_id, m.commit_step, m.ok) for m in h.agent.link.sock.sent if isinstance(m, protocol.Voted)]
    assert voted == [(plan.plan_id, FAST.fence_steps, True)] * 3


def sent_of(h: Harness, kind: type) -> list:
    return [m for m in h.agent.link.sock.sent if isinstance(m, kind)]


def test_the_silence_limit_doubles_per_reopen_up_to_a_minute_and_never_below_its_base():
    base = silence_limit_s(0.1, 0)
    assert base == pytest.approx(SILENCE_HEARTBEATS * 0.1 + 1.0)
    assert [silence_limit_s(0.1, n) for n in range(4)] == pytest.approx([base, 2 * base, 4 * base, 8 * base])
    assert silence_limit_s(0.1, 6) == 60.0 and silence_limit_s(0.1, 10**6) == 60.0
    slow = silence_limit_s(20.0, 0)  # heartbeats every 20 s: the base is over the cap, and stays
    assert slow == 81.0 and silence_limit_s(20.0, 5) == 81.0


def test_a_reopen_doubles_the_next_silence_limit_until_the_coordinator_is_heard_again():
    """A reopen that heard nothing since backs the next one off; one frame from the coordinator
    brings the limit back to its base, so a later dead connection is found in seconds, not a minute."""
    h = Harness()
    h.welcome()
    agent = h.agent
    silence = {"s": 1.5 * silence_limit_s(FAST.heartbeat_interval_s, 0)}
    agent.link.silent_s = lambda now, since=None: silence["s"]
    welcome = protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=FAST, session=7)

    agent._check_silence(time.monotonic())
    assert agent.stats["socket_reopened"] == 1
    h.deliver(welcome)
    agent._check_silence(time.monotonic())  # the limit doubled: 1.5 x base is not past it
    assert agent.stats["socket_reopened"] == 1
    agent.link.receive = lambda poll_ms: [protocol.HeartbeatAck(session=7)]
    agent._receive(0)
    agent._check_silence(time.monotonic())  # heard: back to the base limit
    assert agent.stats["socket_reopened"] == 2


def test_a_reopened_agent_says_hello_at_once_resuming_its_session():
    """A new socket is a new connection to the coordinator: the agent is not registered there
    until its ``Hello`` (resuming its session, so it keeps its rank, plan and communicator) is
    welcomed. No heartbeat goes out on it before."""
    h = Harness()
    h.welcome()
    agent = h.agent
    agent._reopen()
    agent.link.sock.sent.clear()
    h.tick()
    hellos = sent_of(h, protocol.Hello)
    assert [m.resume_session for m in hellos] == [7], agent.link.sock.sent
    assert not sent_of(h, protocol.Heartbeat)


def test_a_reset_before_the_vote_drops_the_plan_tears_down_the_transport_and_registers_again():
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    agent = h.agent
    assert agent._plan is not None and agent.side_ready
    agent._reset("internal error: RuntimeError: boom")
    aborted = sent_of(h, protocol.Aborted)
    assert [(m.plan_id, m.code) for m in aborted] == [(plan.plan_id, "internal_error")]
    assert agent._plan is None and not agent.busy
    assert not agent.transport.connected, "a transport possibly mid-exchange must be torn down"
    agent.link.sock.sent.clear()
    h.tick()
    assert [m.resume_session for m in sent_of(h, protocol.Hello)] == [7]


def test_a_reset_in_the_vote_asks_for_abort_in_the_record():
    """In the vote only the record decides: the reset proposes ``abort`` there (it cannot drop
    the plan), so the ranks waiting on the record are answered instead of waiting out their fence."""
    h = Harness()
    h.welcome()
    plan = h.plan()
    h.deliver(plan)
    h.agent.decider = late = LateRecord()
    h.deliver(protocol.VoteNow(plan_id=plan.plan_id))
    assert h.agent._ticket is not None and len(late.held) == 1
    h.agent._reset("internal error: RuntimeError: boom")
    proposals = [(t.plan_id, p.commit, p.code) for t, _, p in late.held]
    assert proposals[1:] == [(plan.plan_id, False, "internal_error")], proposals


def test_a_late_copy_of_an_older_generation_during_staging_does_not_end_the_exchange():
    """Only a generation this rank will act on ends a staging in progress; a reordered copy of an
    older one (the coordinator sent it before the current one) is ignored, and the plan stages."""
    h = Harness()
    h.welcome()
    second, third = h.comm(), h.comm()
    h.deliver(third)
    agent = h.agent
    incoming = [[second], [third]]
    agent.link.receive = lambda poll_ms: incoming.pop() if incoming else []
    original = agent._stage

    def stage(p, rows):
        agent._pump_while_staging(p.plan_id)  # reads the current generation's copy
        agent._pump_while_staging(p.plan_id)  # then the older one's
        return original(p, rows)

    agent._stage = stage
    plan = h.plan()
    h.deliver(plan)
    assert not incoming and agent.stats["staged"] == 1
    assert [m.plan_id for m in sent_of(h, protocol.Staged)] == [plan.plan_id] and not sent_of(h, protocol.Aborted)


def test_a_load_report_carries_its_window_s_epoch_and_steps_not_the_current_ones():
    """A window counted before a commit is reported after it: the coordinator maps its slots with
    the placement of the epoch it was counted under, over the steps it covered."""
    h = Harness()
    h.welcome()
    agent = h.agent
    agent.hooks.epoch, agent.hooks.steps_done = 4, 30
    counts = np.arange(SHAPE.num_layers * SHAPE.num_physical, dtype=np.int64).reshape(SHAPE.num_layers, -1)
    snap = LoadSnapshot(buffer_index=0, epoch=3, step_begin=20, step_end=24, event=None)
    report = agent._load_report(snap, counts)
    assert (report.epoch, report.step_begin, report.step_end, report.session) == (3, 20, 24, 7)
    assert np.array_equal(report.slot_load.to_numpy(), counts)


def test_load_windows_closed_while_unregistered_are_not_sent():
    """Before its ``Welcome`` the coordinator does not know this agent: a report would only draw
    a ``Reject``; the window is dropped."""
    h = Harness()
    agent = h.agent
    agent._welcomed = False
    agent.hooks.take_load_windows = lambda: [
        (LoadSnapshot(0, 0, 0, 2, None), np.zeros((SHAPE.num_layers, SHAPE.num_physical), dtype=np.int64))
    ]
    agent._flush_load_reports()
    assert not sent_of(h, protocol.LoadReport)


def test_a_comm_init_for_another_world_size_is_ignored_naming_both_sizes(caplog):
    h = Harness()
    h.welcome()
    wrong = protocol.CommInit(generation=9, store_host="127.0.0.1", store_port=1, world_size=2)
    with caplog.at_level("ERROR"):
        h.deliver(wrong)
    assert h.agent.transport.generation == 1 and h.agent.stats["bad_messages"] == 1
    assert "ignored a CommInit for 2 ranks" in caplog.text and "this deployment has 1 ranks" in caplog.text


def test_repeated_loop_failures_back_off_at_most_five_seconds():
    """A fault that fails every tick must not turn into a thread sleeping for hours."""
    h = Harness()
    agent = h.agent
    waits: list[float] = []

    class Stop:
        def is_set(self) -> bool:
            return len(waits) >= 12

        def wait(self, timeout_s: float) -> bool:
            waits.append(timeout_s)
            return self.is_set()

        def set(self) -> None:
            pass

    def fail(poll_ms: int) -> None:
        raise RuntimeError("boom")

    agent._stop = Stop()  # type: ignore[assignment]
    agent._tick = fail  # type: ignore[method-assign]
    agent._run()
    assert waits[0] == pytest.approx(0.1) and waits[1] == pytest.approx(0.2)
    assert max(waits) == 5.0 and waits[-1] == 5.0
    assert agent.stats["internal_errors"] == 12
