"""Who may register as a rank: the checks on a ``Hello``, as pure functions.

A Hello is refused when it cannot belong to this deployment (identity, protocol version,
rank, world size, deployment id, model shape, rank 0's store, a placement that is not one), and a rank
that a live agent holds is only handed to that same agent on a new socket: it proves it with its
session, or, having missed the ``Welcome`` that named the holder's session, with its node and pid
(see :func:`claim`). ``registration`` acts on the verdict: the bookkeeping and the sending.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from eplb_service import protocol
from eplb_service.coordinator.registry import AgentRecord
from eplb_service.placement import PlacementError, PlacementShape, validate_phy2log


class Claim(enum.Enum):
    """What a Hello means for the rank it names."""

    NEW = "new"
    """The rank is free (or its holder is dead): register."""
    REPEATED = "repeated"
    """The holder's own connection said Hello again (retried or duplicated): same place, same session."""
    RESUMED = "resumed"
    """The holder on a new socket, proving its session: it takes its rank back."""
    REOPENED = "reopened"
    """The holder's own process on a new socket that never learned the holder's session (its
    ``Welcome`` was lost, and nothing came under that session since): it takes its rank back."""
    STALE = "stale"
    """An older ``Hello`` of the holder's own process, sent before it learned the session it has
    used since (a link that delays or duplicates): refuse, the rank stays where it is."""
    TAKEN = "taken"
    """Another live agent holds the rank: refuse until it leaves or is declared dead."""


@dataclass(frozen=True)
class HelloProblem:
    """Why a Hello cannot belong to this deployment."""

    reason: str
    """Names both values (the agent's and the coordinator's); the Reject carries it."""
    key: Hashable
    """What the mismatch is, for the log throttle: ``(rank, what)`` for a fault of one rank, and
    ``(what, value)`` for a deployment-wide one (another protocol version, world size or model),
    which every rank of a mis-pointed deployment repeats: one line for all of them, where a line
    per rank buried the coordinator's log under hundreds of copies of one cause. Keyed by
    ``what``, a new mismatch is logged at once even while another one's lines are throttled."""
    code: str = "refused"
    """The ``Reject`` code: ``refused`` (the agent asks again every ``REFUSED_RETRY_S``) for what
    only the operator can fix; ``rank_taken`` (it asks again within seconds) for what ends by
    itself, as live ranks of a restarted deployment going silent."""


def version_problem(version: int) -> HelloProblem:
    """A Hello of protocol ``version``, not the coordinator's: the one refusal every version's
    Hello gets, whether or not its other fields are this version's."""
    return HelloProblem(
        f"protocol version {version} does not match the coordinator's {protocol.PROTOCOL_VERSION}; agents and "
        f"coordinator must be of one eplb-service protocol version",
        ("protocol_version", version),
    )


def deployment_label(deployment: str) -> str:
    """A deployment id as log lines and the status table show it (``""`` is unknown)."""
    return repr(deployment) if deployment else "(unknown)"


def deployment_problem(hello: protocol.Hello, deployment: str) -> HelloProblem | None:
    """A Hello of another deployment id than ``deployment``, the id of the ranks alive now.

    Unknown (``""``) is an id like any other here: an agent that sends none cannot join ranks
    that sent one, nor the reverse, since nothing says they are one deployment. Keyed by both
    ids: every rank of a mis-pointed deployment repeats it, one line says it for all of them.

    Refused as ``rank_taken``, which the agent retries within seconds, not ``refused`` (every
    30 s): the common cause is vLLM restarted under a coordinator that kept running (its own
    container, a daemon), whose new ranks derive a new id while the old ranks, killed without a
    goodbye, are alive here until the liveness timeout; they are then admitted at once."""
    if hello.deployment == deployment:
        return None
    return HelloProblem(
        f"rank {hello.rank} (pid {hello.pid} on {hello.node!r}) is of deployment {deployment_label(hello.deployment)}, "
        f"but ranks of deployment {deployment_label(deployment)} are alive here. If that deployment was restarted, "
        "this rank is admitted once they are declared dead (the liveness timeout); if it still serves, two vLLM "
        "deployments point at one coordinator endpoint: give each a coordinator of its own (its own "
        "EPLB_SERVICE_ENDPOINT), or, if they are one deployment, set EPLB_SERVICE_DEPLOYMENT alike on all its ranks",
        ("deployment", hello.deployment, deployment),
        code="rank_taken",
    )


def hello_problem(
    identity: bytes,
    hello: protocol.Hello,
    world_size: int,
    model: protocol.ModelShape | None,
    deployment: str | None = None,
) -> HelloProblem | None:
    """Why this Hello cannot belong to this deployment (naming both values), or None.

    ``deployment``: the deployment id of the ranks alive now; None when none is (the first rank
    registering then fixes it)."""
    if not (identity == f"rank-{hello.rank}".encode() or identity.startswith(f"rank-{hello.rank}-".encode())):
        return HelloProblem(
            f"identity {identity!r} does not match rank {hello.rank} (expected b'rank-{hello.rank}-...')",
            (hello.rank, "identity"),
        )
    if hello.protocol_version != protocol.PROTOCOL_VERSION:
        return version_problem(hello.protocol_version)
    # The world size first: a coordinator started without --dp (1 rank) against 8 ranks must
    # say so to every rank, not tell ranks 1..7 only that their rank is out of range. It is not
    # learned from the first Hello: --dp is the operator's statement of the deployment, checked
    # against every agent, and the status, metrics and --initial-placement are sized by it.
    if hello.model.num_ranks != world_size:
        return HelloProblem(
            f"agent reports {hello.model.num_ranks} EP ranks, the coordinator was started for {world_size} "
            f"(--dp x --tp): start it with --dp x --tp = {hello.model.num_ranks} (a refused agent asks "
            f"again every {protocol.REFUSED_RETRY_S:.0f} s)",
            ("world_size", hello.model.num_ranks),
        )
    if not 0 <= hello.rank < world_size:
        return HelloProblem(
            f"rank {hello.rank} outside [0, {world_size}) (coordinator world size {world_size})", (hello.rank, "rank")
        )
    if deployment is not None:
        problem = deployment_problem(hello, deployment)
        if problem is not None:
            return problem
    if model is not None and hello.model != model:
        return HelloProblem(f"model shape {hello.model} differs from the deployment's {model}", ("model", hello.model))
    if hello.rank == 0 and not (hello.store_host and hello.store_port):
        return HelloProblem(
            "rank 0 must host the rendezvous store and name it (store_host, store_port); got "
            f"{hello.store_host!r}:{hello.store_port}",
            (0, "store"),
        )
    return None


def hello_placement(hello: protocol.Hello) -> tuple[PlacementShape, np.ndarray]:
    """The shape and ``[L, P]`` placement a Hello reports; ``PlacementError`` names what is wrong."""
    shape = PlacementShape(
        hello.model.num_layers, hello.model.num_logical, hello.model.num_physical, hello.model.num_ranks
    )
    try:
        phy2log = hello.phy2log.to_numpy("hello.phy2log").astype(np.int64)
    except protocol.ProtocolError as exc:
        raise PlacementError(str(exc)) from None
    validate_phy2log(phy2log, shape)
    return shape, phy2log


def same_process(holder: AgentRecord, hello: protocol.Hello) -> bool:
    """Whether a Hello that takes the rank back (:attr:`Claim.RESUMED`, :attr:`Claim.REOPENED`) is
    the holder's own process: the one that holds its staged rows, its side communicator and its votes.

    A session of the holder's proves the agent: its current one, or one of the earlier sessions of
    that process the record carried over (an agent that missed the ``Welcome`` of its latest
    registration names the one before). Its node and pid say it is still that process, and rank 0's
    store address says the decision records and rendezvous keys are where they were. Only then may
    a plan in flight and the side communicator go on across the new socket; anything else is a
    new process in the rank (its rows and communicator are gone), whatever session it names."""
    store = (hello.store_host, hello.store_port) if hello.rank == 0 else None
    return (
        holder.speaks_for(hello.resume_session)
        and (hello.node, hello.pid) == (holder.node, holder.pid)
        and store == holder.store
    )


def claim(holder: AgentRecord | None, identity: bytes, hello: protocol.Hello) -> Claim:
    """What ``hello``, from the connection ``identity``, means for the rank's live ``holder``.

    Every registration hands out a new session, and only its ``Welcome`` tells the agent which. A
    Hello from the holder's own process (its node and pid; for an agent that names no pid, an
    earlier session of the holder's that it names: sessions are random, only a ``Welcome`` told it
    one) naming another session than the holder's comes from an agent that had not learned the
    holder's: either that ``Welcome`` was lost and this is its next socket (:attr:`Claim.REOPENED`),
    or the Hello was sent before the ``Welcome`` came (:attr:`Claim.STALE`). The holder's connection
    tells which: once a message under its session came (``session_heard``), the agent had learned it
    and names it in every later Hello, so one naming another was sent before.

    Until then the rank goes to the new socket at once. The process has sent nothing under the
    holder's session (no ``Staged``, no vote), so taking the record off that connection costs it
    nothing; refused, it could not reach its rank until the liveness timeout, and no plan ran.
    It must name one of the process's earlier sessions the record carries, if any: the agent
    learned the first and names the newest it learned, so only a process that never proved a
    session here is taken on its node and pid alone, as its first ``Hello`` was (never welcomed, it
    answered no plan under the holder's session; a plan in flight aborts, as for a new process).
    An agent that names no pid has only its sessions to prove it: the lost ``Welcome`` of a reopen
    is recovered at once, that of its very first registration only at the liveness timeout.
    A stale Hello that takes the rank in that window only bounces it: the live connection's next
    heartbeat is answered ``unknown_agent``, and its Hello takes the rank back the same way."""
    if holder is None or not holder.alive:
        return Claim.NEW
    if holder.identity == identity:
        return Claim.REPEATED
    if hello.resume_session == holder.session:
        return Claim.RESUMED
    proven = bool(hello.resume_session) and hello.resume_session in holder.earlier_sessions
    if hello.pid:
        own_process = (hello.node, hello.pid) == (holder.node, holder.pid)
    else:
        own_process = proven and hello.node == holder.node and not holder.pid
    if not own_process:
        return Claim.TAKEN
    if holder.session_heard:
        return Claim.STALE
    if holder.earlier_sessions and not proven:
        return Claim.TAKEN
    return Claim.REOPENED
