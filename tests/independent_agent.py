"""A minimal EPLB agent written from ``proto/PROTOCOL.md`` alone: pyzmq, msgpack (msgspec), numpy.

It imports nothing of ``eplb_service``: messages are plain dicts whose ``"type"`` names the
message, encoded as one msgpack frame each, so a mistake in the protocol document shows up
here as a coordinator that refuses or ignores this agent. It models a serving rank without a
GPU: a step clock that ticks every ``step_s`` from a start time the ranks share (so the ranks
step in lockstep, as serving keeps them), a load that is known per logical expert, and expert
"weights" that need no moving (``Staged`` right away, nothing received).

The side channel (rendezvous store, vote, decision record) is agent-to-agent: the coordinator
only relays rank 0's store address. PROTOCOL.md says what it must guarantee, not its wire
format, so this agent brings its own: rank 0 hosts a tiny first-writer-wins key store on a
ZeroMQ REP socket, and the "all-reduce" is every rank writing its contribution there and
reading all of them. Agents of this kind therefore form a deployment of their own; they cannot
vote with the reference agent (see PROTOCOL.md, "Writing an agent from this file").
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import zmq

PROTOCOL_VERSION = 6
PROBE_EVERY, PROBE_RADIUS = 32, 3
HEARTBEATS_BEFORE_REOPEN = 4


def encode(kind: str, **fields: object) -> bytes:
    """One message: a msgpack map whose ``type`` is the struct name (PROTOCOL.md, first paragraph)."""
    return msgspec.msgpack.encode({"type": kind, **fields})


def to_wire(array: np.ndarray) -> dict:
    """``NDArray {dtype, shape, data}``: little-endian raw bytes."""
    a = np.ascontiguousarray(array)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.astype(a.dtype.newbyteorder("<")).tobytes()}


def from_wire(array: dict) -> np.ndarray:
    dtype = np.dtype(array["dtype"]).newbyteorder("<")
    return np.frombuffer(array["data"], dtype=dtype).reshape(array["shape"]).astype(dtype.newbyteorder("="))


def ask(endpoint: str, frame: bytes, identity: bytes = b"client", timeout_s: float = 5.0) -> dict:
    """Send one frame from a fresh DEALER and return the first reply (a status client, or a
    sender of malformed frames on purpose)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity + b"-" + secrets.token_hex(4).encode())
    try:
        sock.connect(endpoint)
        sock.send(frame)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s}s")
        return msgspec.msgpack.decode(sock.recv())
    finally:
        sock.close(0)


# -- the side channel this kind of agent brings (not part of the coordinator protocol) --------


class KeyStore:
    """Rank 0's store: ``cas`` writes a key only while it is empty and answers what it holds."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = zmq.Context.instance().socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self._keys: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="independent-store", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            op, key, value = msgspec.msgpack.decode(self._sock.recv())
            if op == "cas" and key not in self._keys:
                self._keys[key] = value
            self._sock.send(msgspec.msgpack.encode(self._keys.get(key)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)


class StoreClient:
    def __init__(self, host: str, port: int) -> None:
        self._sock = zmq.Context.instance().socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, 5000)
        self._sock.connect(f"tcp://{host}:{port}")

    def cas(self, key: str, value: str) -> str:
        self._sock.send(msgspec.msgpack.encode(("cas", key, value)))
        return msgspec.msgpack.decode(self._sock.recv())

    def get(self, key: str) -> str | None:
        self._sock.send(msgspec.msgpack.encode(("get", key, "")))
        return msgspec.msgpack.decode(self._sock.recv())

    def close(self) -> None:
        self._sock.close(0)


# -- the serving rank this agent stands in for ---------------------------------------------------


class StepClock:
    """Steps end every ``step_s`` after ``t0`` (shared by the ranks); a fence freezes the count."""

    def __init__(self, t0: float, step_s: float) -> None:
        self.t0, self.step_s = t0, step_s
        self.frozen_at: int | None = None
        self._frozen_since = 0.0
        self.end_times: dict[int, float] = {}
        self._seen = 0

    def steps_done(self, now: float) -> int:
        if self.frozen_at is not None:
            return self.frozen_at
        done = max(0, int((now - self.t0) / self.step_s))
        for k in range(self._seen, done):
            self.end_times[k] = self.t0 + (k + 1) * self.step_s
        for old in [k for k in self.end_times if k < done - 512]:
            del self.end_times[old]
        self._seen = max(self._seen, done)
        return done

    def freeze(self, step: int, now: float) -> None:
        if self.frozen_at is None:
            self.frozen_at, self._frozen_since = step, now

    def release(self, now: float) -> None:
        if self.frozen_at is not None:
            self.t0 += now - self._frozen_since
            self.frozen_at = None

    def probes(self, done: int) -> tuple[list[int], list[list[float]]]:
        """Probe steps ``k`` (multiples of 32) whose steps ``k-3 .. k+3`` have all ended and are kept."""
        steps, rows = [], []
        for k in range(PROBE_EVERY, done - PROBE_RADIUS - 1, PROBE_EVERY):
            window = range(k - PROBE_RADIUS, k + PROBE_RADIUS + 1)
            if all(j in self.end_times for j in window):
                steps.append(k)
                rows.append([self.end_times[j] for j in window])
        return steps[-8:], rows[-8:]


@dataclass
class Vote:
    plan_id: int
    layers: list[int]
    rows: np.ndarray
    entry_step: int
    fence_step: int
    decision: tuple[int, bool] | None = None
    reported: bool = False


@dataclass
class IndependentAgent:
    """One rank. ``run()`` in a thread; ``stop()`` says Goodbye and closes."""

    endpoint: str
    rank: int
    world_size: int
    logical_load: np.ndarray
    """``[L, N_log]`` tokens per step routed to each logical expert (by this rank)."""
    phy2log: np.ndarray
    """``[L, P]`` the placement this rank starts from."""
    t0: float
    step_s: float
    store: KeyStore | None = None
    """Rank 0 only: the store it hosts and names in its Hello."""
    bytes_per_expert: int = 1024
    deployment: str = "independent"
    """Sent in every Hello; every rank of one deployment sends the same one."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("independent_agent"))

    def __post_init__(self) -> None:
        self.clock = StepClock(self.t0, self.step_s)
        self.epoch = 0
        self.session = 0
        self.welcomed = False
        self.config: dict = {"report_interval_steps": 10, "heartbeat_interval_s": 1.0, "fence_steps": 8}
        self.config["fence_timeout_s"] = 5.0
        self.comm: dict | None = None
        self.built_generation = -1
        self.store_client: StoreClient | None = None
        self.plan: dict | None = None
        self.vote: Vote | None = None
        self.answers: dict[int, tuple[str, dict]] = {}
        """Plan id -> the answer this rank gave that Plan: a copy of it gets the same answer."""
        self.voted: set[int] = set()
        """Plan ids whose VoteNow this rank acted on: copies are ignored."""
        self.decided: dict[int, tuple[int, bool]] = {}
        """Plan id -> (commit step, ok): the record's content of each plan this rank voted on."""
        self.seen = collections.Counter[str]()
        self.rejects: list[dict] = []
        self.committed: list[tuple[int, int, int]] = []
        """``(plan_id, commit_step, epoch)`` of every plan this rank applied."""
        self._stop = threading.Event()
        self._sock: zmq.Socket | None = None
        self._report_begin = 0
        self._next_hello = self._next_beat = 0.0
        self._last_ack = time.monotonic()

    # -- socket ------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"rank-{self.rank}-{secrets.token_hex(6)}".encode())
        self._sock.connect(self.endpoint)
        self.welcomed, self._next_hello, self._last_ack = False, 0.0, time.monotonic()

    def send(self, kind: str, **fields: object) -> None:
        assert self._sock is not None
        self._sock.send(encode(kind, **fields))

    def _agent_send(self, kind: str, **fields: object) -> None:
        """A registered agent's message: names its rank and carries its session."""
        self.send(kind, rank=self.rank, session=self.session, **fields)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        self._open()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if not self.welcomed and now >= self._next_hello:
                    self._hello(now)
                assert self._sock is not None
                while self._sock.poll(2):
                    self._handle(msgspec.msgpack.decode(self._sock.recv()), time.monotonic())
                self._serve(time.monotonic())
        finally:
            if self.welcomed:
                self._agent_send("Goodbye", reason="stopping")
            assert self._sock is not None
            self._sock.close(200)
            if self.store_client is not None:
                self.store_client.close()

    def stop(self) -> None:
        self._stop.set()

    def _hello(self, now: float) -> None:
        self.send(
            "Hello",
            protocol_version=PROTOCOL_VERSION,
            rank=self.rank,
            model={
                "num_layers": self.phy2log.shape[0],
                "num_logical": self.logical_load.shape[1],
                "num_physical": self.phy2log.shape[1],
                "num_ranks": self.world_size,
                "bytes_per_expert": self.bytes_per_expert,
            },
            phy2log=to_wire(self.phy2log.astype(np.int64)),
            epoch=self.epoch,
            step=self.clock.steps_done(now),
            transport="independent",
            node=socket.gethostname(),
            pid=os.getpid(),
            store_host=self.store.host if self.store else "",
            store_port=self.store.port if self.store else 0,
            resume_session=self.session,
            deployment=self.deployment,
        )
        self._next_hello = now + 1.0

    def _serve(self, now: float) -> None:
        """What the serving thread and the agent thread do between messages."""
        self._fence(now)
        done = self.clock.steps_done(now)
        if self.vote is not None:
            self._advance_vote(done)
        if not self.welcomed:
            return
        if done - self._report_begin >= self.config["report_interval_steps"]:
            self._report_load(self._report_begin, done)
            self._report_begin = done
        if now >= self._next_beat:
            self._beat(now, done)
        if now - self._last_ack > HEARTBEATS_BEFORE_REOPEN * self.config["heartbeat_interval_s"]:
            self.log.warning("rank %d: no HeartbeatAck for %d intervals; reopening", self.rank, 4)
            self._open()

    def _report_load(self, begin: int, end: int) -> None:
        """Tokens routed to each physical slot: an expert's load split evenly over its replicas."""
        layers = np.arange(self.phy2log.shape[0])[:, None]
        replicas = np.zeros_like(self.logical_load)
        np.add.at(replicas, (np.broadcast_to(layers, self.phy2log.shape), self.phy2log), 1)
        per_slot = self.logical_load[layers, self.phy2log] / replicas[layers, self.phy2log]
        counts = np.rint(per_slot * (end - begin)).astype(np.int64)
        self._agent_send("LoadReport", epoch=self.epoch, step_begin=begin, step_end=end, slot_load=to_wire(counts))

    def _beat(self, now: float, done: int) -> None:
        steps, times = self.clock.probes(done)
        self._agent_send(
            "Heartbeat",
            step=done,
            epoch=self.epoch,
            comm_generation=self.built_generation,
            clock={
                "probe_steps": steps,
                "times": times,
                "radius": PROBE_RADIUS,
                "wall_minus_mono": time.time() - time.monotonic(),
            },
        )
        self._next_beat = now + self.config["heartbeat_interval_s"]

    # -- messages from the coordinator ---------------------------------------------------------------

    def _handle(self, message: dict, now: float) -> None:
        kind = message["type"]
        self.seen[kind] += 1
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            self.log.warning("rank %d: ignored %s", self.rank, kind)
            return
        handler(message, now)

    def _on_Welcome(self, message: dict, now: float) -> None:
        self.config.update(message["config"])
        self.welcomed, self.session, self._last_ack = True, message["session"], now
        if message.get("comm") is not None:
            self._on_CommInit(message["comm"], now)

    def _on_Reject(self, message: dict, now: float) -> None:
        self.rejects.append(message)
        code = message.get("code", "refused")
        self.log.warning("rank %d: rejected (%s): %s", self.rank, code, message["reason"])
        if code in ("unknown_agent", "stale_session"):
            self.welcomed = False
        elif code == "refused":
            self.welcomed, self._next_hello = False, now + 30.0
        elif code == "rank_taken":
            self._next_hello = now + 1.0

    def _on_HeartbeatAck(self, message: dict, now: float) -> None:
        if message["session"] == self.session:
            self._last_ack = now
        else:
            self.welcomed = False

    def _on_CommInit(self, message: dict, now: float) -> None:
        """Build the side channel of this generation (once per generation; a plan in flight is given up)."""
        if message["generation"] <= self.built_generation:
            return
        if self.vote is not None and self.vote.decision is None:
            self._propose("abort")
        elif self.plan is not None and self.vote is None:
            self._drop_plan("comm_rebuilt", "side channel rebuilt")
        self.comm = message
        if self.store_client is None:
            self.store_client = StoreClient(message["store_host"], message["store_port"])
        self.built_generation = message["generation"]

    def _answer(self, plan_id: int, kind: str, **fields: object) -> None:
        self.answers[plan_id] = (kind, fields)
        self._agent_send(kind, plan_id=plan_id, **fields)

    def _on_Plan(self, message: dict, now: float) -> None:
        plan_id = message["plan_id"]
        if plan_id in self.answers:  # a copy: the coordinator has not heard the answer
            kind, fields = self.answers[plan_id]
            self._agent_send(kind, plan_id=plan_id, **fields)
            return
        if self.plan is not None or self.vote is not None:
            busy = (self.plan or {}).get("plan_id")
            self._answer(plan_id, "Failed", reason=f"busy with plan {busy}", code="busy")
            return
        if message["base_epoch"] != self.epoch:
            reason = f"plan for base epoch {message['base_epoch']}, this rank is at {self.epoch}"
            self._answer(plan_id, "Failed", reason=reason, code="invalid_plan")
            return
        rows = from_wire(message["phy2log"])
        if rows.shape != (len(message["layers"]), self.phy2log.shape[1]):
            reason = f"rows of shape {rows.shape} for layers {message['layers']}"
            self._answer(plan_id, "Failed", reason=reason, code="invalid_plan")
            return
        self.plan = {**message, "rows": rows}
        # Nothing to move: a real agent streams the rows it lacks here, then says Staged.
        self._answer(plan_id, "Staged", bytes_received=0, duration_s=0.0)

    def _on_VoteNow(self, message: dict, now: float) -> None:
        if message["plan_id"] in self.voted:  # a copy: the coordinator has no Voted yet
            vote = self.vote
            if vote is not None and vote.plan_id == message["plan_id"] and vote.reported and vote.decision:
                commit_step, ok = vote.decision
                self._agent_send("Voted", plan_id=vote.plan_id, commit_step=max(commit_step, 0), ok=ok)
            return
        self.voted.add(message["plan_id"])
        plan = self.plan
        if plan is None or plan["plan_id"] != message["plan_id"]:
            reason = "not staged"
            self._agent_send("Aborted", plan_id=message["plan_id"], reason=reason, code="not_staged")
            return
        entry = self.clock.steps_done(now)
        fence = entry + self.config["fence_steps"]
        self.vote = Vote(plan["plan_id"], list(plan["layers"]), plan["rows"], entry, fence)
        self._contribute(f"{fence},1,{plan['plan_id']}")

    def _on_AbortPlan(self, message: dict, now: float) -> None:
        if self.vote is not None and self.vote.plan_id == message["plan_id"]:
            if self.vote.decision is None:
                self._propose("abort")
        elif self.plan is not None and self.plan["plan_id"] == message["plan_id"]:
            self._drop_plan("aborted_by_coordinator", f"aborted by the coordinator: {message['reason']}")
            return
        decided = self.decided.get(message["plan_id"])
        if decided is not None:  # the coordinator has no outcome from this rank: the record's content
            self._agent_send("Voted", plan_id=message["plan_id"], commit_step=max(decided[0], 0), ok=decided[1])

    def _on_CoordinatorStopping(self, message: dict, now: float) -> None:
        if self.plan is not None and self.vote is None:
            self._drop_plan("coordinator_stopping", "coordinator stopping")
        self.welcomed, self._next_hello = False, now + 1.0

    def _drop_plan(self, code: str, reason: str) -> None:
        plan, self.plan = self.plan, None
        if plan is not None:
            self._answer(plan["plan_id"], "Aborted", reason=reason, code=code)

    # -- the vote and the commit (on the side channel) ------------------------------------------------

    def _key(self, what: str) -> str:
        assert self.comm is not None
        return f"independent/{self.comm['nonce']}/gen{self.comm['generation']}/{what}"

    def _contribute(self, value: str) -> None:
        assert self.store_client is not None and self.vote is not None
        self.store_client.cas(self._key(f"vote/{self.vote.plan_id}/{self.rank}"), value)

    def _propose(self, proposal: str) -> None:
        """First writer wins; every rank reads the same answer."""
        assert self.store_client is not None and self.vote is not None
        answer = self.store_client.cas(f"independent/decision/{self.vote.plan_id}", proposal)
        kind, _, step = answer.partition(" ")
        self.vote.decision = (int(step) if kind == "commit" else -1, kind == "commit")

    def _advance_vote(self, done: int) -> None:
        vote = self.vote
        assert vote is not None and self.store_client is not None
        if vote.decision is None:
            values = [self.store_client.get(self._key(f"vote/{vote.plan_id}/{r}")) for r in range(self.world_size)]
            if all(v is not None for v in values):
                parts = [v.split(",") for v in values if v is not None]
                ok = all(p[1] == "1" and int(p[2]) == vote.plan_id for p in parts)
                commit_step = max(int(p[0]) for p in parts)
                self._propose(f"commit {commit_step}" if ok else "abort")
            else:
                decided = self.store_client.get(f"independent/decision/{vote.plan_id}")
                if decided is not None:  # a peer gave up (fence timeout, AbortPlan): the record says so
                    self._propose(decided)
        if vote.decision is None:
            return
        commit_step, ok = vote.decision
        if not vote.reported:
            vote.reported = True
            self.decided[vote.plan_id] = vote.decision  # said again to an AbortPlan, also once served
            self._agent_send("Voted", plan_id=vote.plan_id, commit_step=max(commit_step, 0), ok=ok)
        if not ok:
            self.vote = self.plan = None
            self._agent_send("Aborted", plan_id=vote.plan_id, reason="the decision record says abort", code="other")
        elif done >= commit_step:
            # At the boundary before step S: apply the rows (here: the map) and the new epoch.
            self.phy2log[vote.layers] = vote.rows
            self.epoch += 1
            self._report_begin = done  # load counted from here on is under the new placement
            self.committed.append((vote.plan_id, commit_step, self.epoch))
            self.vote = self.plan = None
            self._agent_send("Committed", plan_id=vote.plan_id, commit_step=commit_step, epoch=self.epoch, stall_s=0.0)

    def _fence(self, now: float) -> None:
        """No step ``e + F`` starts before the decision is known: freeze the count there, and past
        ``fence_timeout_s`` propose ``abort`` (the record's first proposal still decides)."""
        vote = self.vote
        if vote is None or vote.decision is not None:
            self.clock.release(now)
            return
        if self.clock.steps_done(now) >= vote.fence_step:
            self.clock.freeze(vote.fence_step, now)
            if now - self.clock._frozen_since > self.config["fence_timeout_s"]:
                self._propose("abort")
