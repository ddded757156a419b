"""A deployment that runs for weeks must not accumulate anything: here, rendezvous-store keys.

Two real agents (threads of this process) with real gloo side communicators, rank 0's real
rendezvous store, real deciders and serving threads; the coordinator is this test, speaking
the protocol over an in-memory socket. Every plan leaves a decision record and every side
communicator generation its rendezvous keys; rank 0 must delete them once a vote proves
every rank past them, so the store's key count stays flat however many plans commit.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time

import numpy as np
import torch.distributed as dist
import zmq
from conftest import make_model, rows_match_maps

from eplb_service import protocol
from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.decision import StoreDecisionRecord
from eplb_service.worker_agent.rendezvous import host_once
from eplb_service.worker_agent.store_janitor import StoreJanitor
from eplb_service.worker_agent.transport_gloo import GlooTransport, gloo_store_keys

SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)
CONFIG = protocol.AgentConfig(
    report_interval_steps=50,
    heartbeat_interval_s=100.0,  # no coordinator heartbeats here: never "silent"
    fence_steps=3,
    fence_timeout_s=5.0,
    transport_timeout_s=20.0,
    decision_timeout_s=20.0,
)
ENDPOINT = "ipc:///nonexistent/long-running.sock"


class Pipe:
    """The agent's DEALER socket, in memory: the test puts frames in, reads what was sent."""

    def __init__(self) -> None:
        self.inbound: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.sent: list[protocol.Message] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent.append(protocol.decode(frame))

    def poll(self, timeout_ms: int, flags: int = 0) -> int:
        if self.inbound.empty():
            time.sleep(min(timeout_ms, 5) / 1000)
        return 0 if self.inbound.empty() else 1

    def recv(self, flags: int = 0) -> bytes:
        try:
            return self.inbound.get_nowait()
        except queue.Empty:
            raise zmq.Again() from None

    def close(self, linger: int = 0) -> None:
        pass


class Deployment:
    """Two ranks serving (a thread each) with their agents, and the coordinator's side of the protocol."""

    def __init__(self) -> None:
        self.models = [make_model(r, SHAPE) for r in range(2)]
        self.pipes = [Pipe() for _ in range(2)]
        self.agents = []
        for model, pipe in zip(self.models, self.pipes):
            agent = WorkerAgent(model, ENDPOINT, GlooTransport(), hello_interval_s=0.05)
            agent.link.sock = pipe  # type: ignore[assignment]
            agent.link.open = lambda link=agent.link: setattr(link, "last_heard", time.monotonic())  # type: ignore[method-assign]
            self.agents.append(agent)
        self._stop = threading.Event()
        self.serving = [threading.Thread(target=self._serve, args=(a,), daemon=True) for a in self.agents]
        self.generation = 0
        self.store: tuple[str, int] = ("", 0)
        self.plan_ids = iter(range(5000, 10**6))

    def _serve(self, agent: WorkerAgent) -> None:
        while not self._stop.is_set():
            agent.hooks.before_step()
            agent.hooks.after_step(None)
            time.sleep(0.001)

    def start(self) -> "Deployment":
        for agent, thread in zip(self.agents, self.serving):
            agent.start()
            thread.start()
        hellos = [self.wait_for(r, protocol.Hello) for r in range(2)]
        self.store = (hellos[0].store_host, hellos[0].store_port)
        for r in range(2):
            self.deliver(
                r, protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=r, config=CONFIG, session=7)
            )
        self.new_generation()
        return self

    def stop(self) -> None:
        self._stop.set()
        for agent in self.agents:
            agent.stop()
        for thread in self.serving:
            thread.join(5)

    def deliver(self, rank: int, message: protocol.Message) -> None:
        self.pipes[rank].inbound.put(protocol.encode(message))

    def broadcast(self, message: protocol.Message) -> None:
        for r in range(2):
            self.deliver(r, message)

    def wait_for(self, rank: int, kind: type, timeout_s: float = 20.0, **fields):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in list(self.pipes[rank].sent):
                if isinstance(message, kind) and all(getattr(message, k) == v for k, v in fields.items()):
                    return message
            time.sleep(0.002)
        raise AssertionError(f"rank {rank} sent no {kind.__name__} {fields} within {timeout_s}s")

    def new_generation(self) -> None:
        self.generation += 1
        host, port = self.store
        self.broadcast(
            protocol.CommInit(
                generation=self.generation, store_host=host, store_port=port, world_size=2, nonce="longrun"
            )
        )
        deadline = time.monotonic() + 20
        while not all(a.side_ready and a.transport.generation == self.generation for a in self.agents):
            assert time.monotonic() < deadline, "side communicator not built"
            time.sleep(0.005)

    def commit_one(self) -> None:
        """One plan: a layer's row rotated by one slot, so experts cross between the ranks."""
        agent = self.agents[0]
        layer = self.generation % 2
        rows = agent.phy2log_host[[layer]].copy()
        rows[0] = np.roll(rows[0], 1)
        plan = protocol.Plan(
            plan_id=next(self.plan_ids),
            base_epoch=agent.hooks.epoch,
            layers=[layer],
            phy2log=protocol.NDArray.from_numpy(rows),
        )
        self.broadcast(plan)
        for r in range(2):
            self.wait_for(r, protocol.Staged, plan_id=plan.plan_id)
        self.broadcast(protocol.VoteNow(plan_id=plan.plan_id))
        for r in range(2):
            self.wait_for(r, protocol.Committed, plan_id=plan.plan_id)

    def store_keys(self) -> int:
        janitor = self.agents[0].janitor
        if janitor is not None:  # let the deletes queued so far land
            deadline = time.monotonic() + 5
            while not janitor._jobs.empty() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)
        return host_once(ENDPOINT, 2).store.num_keys()


def test_store_keys_stay_bounded_over_many_commits_and_rebuilds():
    deployment = Deployment().start()
    try:
        counts = []
        for i in range(30):
            if i % 3 == 2:
                deployment.new_generation()  # e.g. after an aborted batch: a new rendezvous
            deployment.commit_one()
            counts.append(deployment.store_keys())
        for model in deployment.models:
            assert rows_match_maps(model)
        assert deployment.models[0].phy2log.tolist() == deployment.models[1].phy2log.tolist()
    finally:
        deployment.stop()
    # Before: every plan left its record and every generation its 2 gloo keys (30 plans,
    # 11 generations: 52 more keys at the end than after the first plan).
    # What may stay: the last two plans' records and the last two generations' keys.
    assert max(counts) <= counts[0] + 4, counts
    assert counts[-1] <= counts[0] + 4, counts


def test_the_keys_gloo_reports_are_the_keys_gloo_writes():
    """``store_keys`` is what the janitor deletes: it must match what torch's gloo really writes."""
    server = dist.TCPStore("127.0.0.1", 0, 3, True, timeout=datetime.timedelta(seconds=20), wait_for_workers=False)
    comm = protocol.CommInit(generation=4, store_host="127.0.0.1", store_port=server.port, world_size=3, nonce="k")
    transports = [GlooTransport() for _ in range(3)]
    threads = [threading.Thread(target=t.connect, args=(comm, r, 20.0)) for r, t in enumerate(transports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert all(t.connected for t in transports)
        if hasattr(server, "list_keys"):
            written = sorted(k for k in server.list_keys() if k.startswith(comm.key_prefix))
            assert written == sorted(transports[0].store_keys(comm))
        assert sorted(gloo_store_keys(comm)) == [f"eplb/k/gen4/0/{r}" for r in range(3)]
        assert all(server.delete_key(k) for k in transports[0].store_keys(comm))
    finally:
        for t in transports:
            t.abort()


class DictStore:
    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)

    def delete_key(self, key: str) -> bool:
        if key in self.keys:
            self.keys.remove(key)
            return True
        return False


def test_the_janitor_deletes_only_what_came_before_the_proven_vote():
    def comm(gen: int, port: int = 99) -> protocol.CommInit:
        return protocol.CommInit(generation=gen, store_host="h", store_port=port, world_size=2, nonce="n")

    def record(plan_id: int) -> str:
        return StoreDecisionRecord.KEY.format(plan_id=plan_id)

    store = DictStore([record(p) for p in (1, 2, 3)] + [f"g{g}" for g in (1, 2, 3)] + ["elsewhere"])
    janitor = StoreJanitor(store, store_port=99)
    for gen in (1, 2):
        janitor.saw_generation(comm(gen), [f"g{gen}"])
    janitor.saw_generation(comm(1, port=5), ["elsewhere"])  # another store's generation: not ours
    janitor.saw_generation(comm(1), ["g1"])  # a copy: seen already
    for plan_id in (1, 2, 3):
        janitor.saw_plan(plan_id)
    janitor.saw_generation(comm(3), ["g3"])  # arrives after the vote on generation 2 started
    assert janitor.everyone_past(2, comm(2)) == 2  # plan 1's record and generation 1's key
    janitor.join(5)
    assert store.keys == {record(2), record(3), "g2", "g3", "elsewhere"}
    assert janitor.everyone_past(3, comm(3)) == 2
    janitor.join(5)
    assert store.keys == {record(3), "g3", "elsewhere"}
    assert janitor.deleted_keys == 4
    assert janitor.everyone_past(77, None) == 0  # a plan it never saw: nothing to say
