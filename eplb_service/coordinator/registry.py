"""Who is connected: agents by rank, their ZeroMQ identities, and their liveness."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from eplb_service import protocol
from eplb_service.loop_stalls import LoopStalls

COMMITS_KEPT = 16
"""Plans whose ``Committed`` is remembered per rank, to tell a duplicated copy from a new commit."""
SESSIONS_KEPT = 8
"""Earlier sessions of a rank's process kept on its record: an agent names its newest, and misses
more than one ``Welcome`` in a row only while its link loses nearly everything."""


@dataclass
class AgentRecord:
    rank: int
    identity: bytes
    node: str
    pid: int
    epoch: int
    step: int
    phy2log: np.ndarray
    last_seen: float = field(default_factory=time.monotonic)
    comm_generation: int = -1
    alive: bool = True
    session: int = 0
    """Handed out in ``Welcome``; the rank's messages must carry it."""
    session_heard: bool = False
    """A message carrying ``session`` came from ``identity``: its agent got the ``Welcome``, and names
    this session in any later ``Hello`` (``admission.claim`` tells a stale Hello by it)."""
    earlier_sessions: tuple[int, ...] = ()
    """Sessions of the same process's earlier registrations of the rank that this record carries on
    (newest last, at most ``SESSIONS_KEPT``): its agent names one of them if it missed this one's
    ``Welcome``, and still holds what it staged under them."""
    store: tuple[str, int] | None = None
    """Rank 0: where its rendezvous store is reached."""
    internal_errors: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    """The agent's own counters from its latest heartbeat (``protocol.AGENT_COUNTERS``)."""
    load_reported_to: int = 0
    """``step_end`` of the rank's latest load report, or its step when it registered (before its first)."""
    committed_plans: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=COMMITS_KEPT))
    """Plan ids of the rank's latest ``Committed`` messages: an agent sends one per plan, so another
    naming one of them is a link's copy (its stall is not observed again)."""
    restarted: bool = False
    """A process never registered anywhere (its Hello resumes no session) that took its rank in a
    deployment whose ranks had all been registered: a worker restarted alone. It serves the maps it
    started with, whatever the others committed since."""
    heartbeat_step: int = -1
    """Step of the newest heartbeat taken in this registration (-1: none yet); see :meth:`take_heartbeat`."""

    def speaks_for(self, session: int) -> bool:
        """Whether a message under ``session`` from this record's own connection is the rank's.

        Its session, or one of the same process's earlier sessions this record carried over: the
        agent names the session it knows until this registration's ``Welcome`` reaches it, and its
        serving thread reports a commit step (``Committed``, ``Voted``, ``Aborted``) whenever it
        passes one. Behind a ``Hello`` that resumed across a coordinator stall those came on the new
        connection under the old session, and were refused as stale: a commit's report lost, and
        the agent told to register again. On another connection no session of the record counts."""
        return session == self.session or session in self.earlier_sessions

    def take_heartbeat(self, beat: protocol.Heartbeat) -> bool:
        """File what ``beat`` says of the rank; returns False for a stale one, whose snapshot is not taken.

        Within one registration a rank's step only grows (a new process registers anew, and its
        ``Hello`` sets the step), so a heartbeat of a lower step than one already taken is older
        than what is held: a link that duplicates or reorders delivered it late. Taken, it set the
        recorded step back (the planning interval was counted from it, and the status showed it),
        the side-communicator generation back (the deployment read as not ready, and ``CommInit``
        went again to a rank that had built it), and the exported agent counters down (Prometheus
        reads a counter that goes down as a reset, and ``rate()`` jumps by its whole value). The
        counters only grow within a process, so they are merged by maximum, also at the same step
        (an idle engine's heartbeats all carry one step, and a copy may still be the older)."""
        self.step = max(self.step, beat.step)
        counters = self.counters.copy()
        for name, value in beat.counters.items():
            if value > counters.get(name, 0):
                counters[name] = value
        self.counters = counters
        self.internal_errors = max(self.internal_errors, beat.internal_errors)
        if beat.step < self.heartbeat_step:
            return False
        self.heartbeat_step = beat.step
        self.comm_generation = beat.comm_generation
        return True


class Registry:
    """Agents of one deployment; ``complete`` once every rank is registered and alive."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.agents: dict[int, AgentRecord] = {}
        self._by_identity: dict[bytes, int] = {}
        self.ever_complete = False
        """Every rank was registered at once in this deployment: a new process registering after
        that is a restarted worker, not one of the deployment's first processes arriving."""
        self.deployment: str | None = None
        """The deployment id (``Hello.deployment``, ``""``: unknown) of the first rank registered
        while no rank was alive; None before any registered. While a rank is alive, only Hellos of
        this id are admitted (see :meth:`live_deployment`)."""

    def live_deployment(self) -> str | None:
        """The deployment id a Hello must carry to be admitted: the registered one while any rank is
        alive, else None (any id may start the next deployment)."""
        return self.deployment if self.alive else None

    def register(self, record: AgentRecord) -> AgentRecord | None:
        """Add or replace the agent of ``record.rank``; returns the record it replaced."""
        old = self.agents.get(record.rank)
        if old is not None:
            self._by_identity.pop(old.identity, None)
        self.agents[record.rank] = record
        self._by_identity[record.identity] = record.rank
        return old

    def by_identity(self, identity: bytes) -> AgentRecord | None:
        rank = self._by_identity.get(identity)
        return None if rank is None else self.agents.get(rank)

    def remove(self, rank: int) -> None:
        record = self.agents.pop(rank, None)
        if record is not None:
            self._by_identity.pop(record.identity, None)

    def expire(self, now: float, timeout_s: float, stalls: LoopStalls | None = None) -> list[AgentRecord]:
        """Mark agents silent for longer than ``timeout_s`` dead; returns the newly dead.

        Silence is counted only while the coordinator's loop ran (``stalls`` taken out): a
        coordinator not scheduled for seconds read nothing then, and its ranks, often stalled
        with it on one host, sent nothing; on waking it declared every rank dead at once. Up to
        ``loop_stalls.STALLS_EXCUSED_UP_TO`` timeouts of wall time: past that the rank is dead anyway."""
        dead = []
        for record in self.agents.values():
            wall = now - record.last_seen
            silent = wall if stalls is None else stalls.silence_s(record.last_seen, now)
            if record.alive and silent > timeout_s:
                record.alive = False
                dead.append(record)
        return dead

    @property
    def alive(self) -> list[AgentRecord]:
        return [r for r in self.agents.values() if r.alive]

    @property
    def complete(self) -> bool:
        return len(self.alive) == self.world_size

    def min_step(self) -> int:
        return min((r.step for r in self.alive), default=0)

    def comm_ready(self, generation: int) -> bool:
        return self.complete and all(r.comm_generation == generation for r in self.agents.values())
