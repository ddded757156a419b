"""Every message between agents, coordinator and clients, in one place.

msgspec structs encoded as msgpack; one tagged union (`Message`) so a frame decodes
into exactly one typed object or fails with an error that names the path
(``Expected int, got str - at $.rank``). Arrays travel as raw bytes with dtype and
shape (:class:`NDArray`), never pickled. ``proto/schema.json`` is generated from these
types (``python -m eplb_service.schema``) and a test keeps it current.
"""

from __future__ import annotations

import math
from typing import Annotated, Final, Literal, Union, get_args

import msgspec
import numpy as np

from eplb_service.deployment_id import DEPLOYMENT_ID_MAX_CHARS, DEPLOYMENT_ID_PATTERN

PROTOCOL_VERSION = 6
"""Bumped on any incompatible change; ``Hello`` carries it and the coordinator refuses others.
2: the commit decision record, the rendezvous store on rank 0, sessions, step-clock probes.
3: each rank's vote contributes its fence step ``e + F`` and the commit step is their MAX
(it was ``max(e) + F``): ranks of versions 2 and 3 in one vote could propose commit steps
before each other's fences, so one coordinator must not admit both.
4: ``Hello.deployment``, the id of the vLLM deployment the rank belongs to: a version-3
coordinator would admit ranks of two deployments into one (see :data:`DeploymentId`).
5: ``Heartbeat.decided_plan``/``decided_commit``/``decided_commit_step``, the newest decision
record the rank read: a version-4 coordinator rejects such heartbeats as unknown fields, so a
mixed deployment would fail every heartbeat instead of being refused once, naming both versions.
6: ``Heartbeat.decided_code``, the abort code the decision record names, for the same reason."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Hard ceiling of any frame (the agents' socket limit; the coordinator's is far lower,
see :func:`max_message_bytes`)."""

UNSHAPED_MAX_MESSAGE_BYTES = 1 << 20
"""The coordinator's frame limit before it knows the model: a ``Hello`` carries one int64
per physical slot, so this admits models of up to ~128k slots (61 layers x 2048 slots)."""


def max_message_bytes(num_layers: int, num_physical: int) -> int:
    """The largest frame a legitimate agent sends for this model shape, with headroom.

    The biggest messages are ``Hello`` and ``LoadReport``, one ``[L, P]`` int64 array each;
    everything else is a few hundred bytes (a heartbeat's step-clock probes about 2 KiB).
    """
    return 2 * 8 * num_layers * num_physical + (64 << 10)


MAX_ARRAY_DIMS = 4
ALLOWED_DTYPES = ("int8", "int32", "int64", "float32", "float64")


INT64_MAX = (1 << 63) - 1
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
"""Ranks, steps, epochs, ids, byte counts: never negative on the wire, and within int64 (the
vote all-reduces them as int64)."""
PosInt = Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
"""Durations and rates; NaN and infinities are refused as well (see ``_check_finite``)."""
PosFloat = Annotated[float, msgspec.Meta(gt=0)]


class ProtocolError(ValueError):
    """A frame or field that is not what the protocol says; the message names it."""


class NDArray(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A numpy array on the wire: little-endian raw bytes plus dtype and shape."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "NDArray":
        arr = np.ascontiguousarray(array)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(f"array dtype {arr.dtype.name!r} not in {ALLOWED_DTYPES}")
        return cls(
            dtype=arr.dtype.name,
            shape=tuple(int(s) for s in arr.shape),
            data=arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(),
        )

    def to_numpy(self, field: str = "array", copy: bool = True) -> np.ndarray:
        """Decode, checking dtype, rank and that the byte count matches the shape.

        ``copy=False``: a read-only view of the message's bytes where the host is little-endian
        (no copy of an ``[L, P]`` array per load report); a writable copy otherwise."""
        if self.dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"{field}: dtype {self.dtype!r} not in {ALLOWED_DTYPES}")
        if len(self.shape) > MAX_ARRAY_DIMS or any(s < 0 for s in self.shape):
            raise ProtocolError(f"{field}: shape {self.shape} must have <= {MAX_ARRAY_DIMS} non-negative dims")
        dtype = np.dtype(self.dtype).newbyteorder("<")
        expected = math.prod(self.shape) * dtype.itemsize
        if expected != len(self.data):
            raise ProtocolError(
                f"{field}: shape {self.shape} of {self.dtype} needs {expected} bytes, got {len(self.data)}"
            )
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="), copy=copy)


class ModelShape(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an agent's model looks like; all agents of a deployment must agree."""

    num_layers: PosInt
    num_logical: PosInt
    num_physical: PosInt
    num_ranks: PosInt
    bytes_per_expert: PosInt


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Knobs the coordinator hands every agent in ``Welcome`` so all ranks agree."""

    report_interval_steps: PosInt = 10
    """Steps accumulated on the device before one load snapshot goes to the host."""
    heartbeat_interval_s: PosFloat = 1.0
    fence_steps: PosInt = 8
    """F: the commit step is the MAX over ranks of entry + F; a rank blocks at entry + F until it is known."""
    fence_timeout_s: PosFloat = 5.0
    """Longest the serving thread waits at the fence before aborting the plan locally."""
    max_ops_per_group: PosInt = 16
    """Expert rows (remote copies, all ranks) in one chunk. A chunk is one group call holding
    one send or receive per peer (the rows for a peer go as one block), so a group never
    holds more than 2 x (ranks - 1) ops (large groups are what deadlocked vLLM)."""
    chunk_bytes: PosInt = 16 * 1024 * 1024
    """Most bytes one rank sends, or receives, in one chunk: what is in flight per group call.
    Larger chunks stream faster (NCCL's per-op rate grows with the op's size) and let a
    device-wide synchronize elsewhere wait longer."""
    throttle_bytes_per_s: NonNegFloat = 0.0
    """Per-rank cap on streamed bytes per second; 0 = unthrottled."""
    transport_timeout_s: PosFloat = 30.0
    decision_timeout_s: PosFloat = 60.0
    """Longest a serving thread waits at the fence, after ``fence_timeout_s``, for the plan's
    decision record when it cannot reach it; past it the serving thread raises rather than
    guess (see ``docs/FAILURE_MODEL.md``)."""


class CommInit(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """Build (or rebuild) the side communicator from the rendezvous store rank 0 hosts.

    The store also holds every plan's commit decision record. ``generation`` changes after
    every teardown so a rebuilt communicator never reads keys of a dead one.
    """

    generation: NonNegInt
    store_host: str
    store_port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    world_size: PosInt
    nonce: str = ""
    """Random per coordinator process: the store outlives coordinator restarts, whose
    generations count from 1 again, so keys are named by both (see :attr:`key_prefix`)."""

    @property
    def key_prefix(self) -> str:
        """Where this rendezvous keeps its keys in the store."""
        return f"eplb/{self.nonce}/gen{self.generation}" if self.nonce else f"eplb/gen{self.generation}"


DeploymentId = Annotated[str, msgspec.Meta(max_length=DEPLOYMENT_ID_MAX_CHARS, pattern=DEPLOYMENT_ID_PATTERN)]
"""Which vLLM deployment a rank belongs to; every rank of one deployment sends the same one, and
``""`` means unknown. Nothing else in a ``Hello`` tells apart two deployments of one model shape
and world size pointed at one coordinator, whose ranks would otherwise be admitted as one: they
would share rank 0's rendezvous store and its decision records, and a plan would be applied on
the ranks of one deployment while the other's kept the old maps."""


class Hello(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    protocol_version: NonNegInt
    rank: NonNegInt
    model: ModelShape
    phy2log: NDArray
    """The agent's current placement ``[L, P]``: agents are the source of truth."""
    epoch: NonNegInt
    step: NonNegInt
    transport: str
    node: str = ""
    pid: NonNegInt = 0
    store_host: str = ""
    """Rank 0 only: where the others reach the rendezvous store it hosts."""
    store_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    resume_session: NonNegInt = 0
    """The session this agent held before it reopened its socket (0: none): the coordinator
    lets it take its rank back at once, where any other Hello for a held rank waits."""
    deployment: DeploymentId = ""
    """The vLLM deployment this rank belongs to (``""``: unknown). While any rank is alive, the
    coordinator admits only Hellos of the deployment id its first rank registered with."""


Session = NonNegInt
"""Handed out in ``Welcome``; every later message of the agent carries it."""


class Welcome(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    protocol_version: NonNegInt
    rank: NonNegInt
    config: AgentConfig
    comm: CommInit | None = None
    session: Session = 0


REFUSED_RETRY_S = 30.0
"""Seconds an agent waits before its next Hello after a ``refused`` one: slow enough that a
refused deployment of hundreds of ranks logs a few lines a second at most, fast enough that
fixing the coordinator brings rebalancing back without restarting vLLM. Here because both
sides speak of it: the agent waits it, the coordinator's refusal tells the operator."""

RejectCode = Literal["bad_message", "refused", "unknown_agent", "stale_session", "rank_taken"]
"""Why a message was refused. ``unknown_agent`` / ``stale_session``: register again;
``rank_taken``: another live session holds the rank, or live ranks of another deployment hold
the coordinator, try again later; ``refused``: this agent cannot join (version, shape,
placement), it asks again every
``REFUSED_RETRY_S``; ``bad_message``: undecodable, or a message only the coordinator sends.
A new code would break older agents (a ``Literal`` they cannot decode), so refusals reuse these."""


AbortCode = Literal[
    "invalid_plan",
    "busy",
    "not_connected",
    "staging_failed",
    "staging_timeout",
    "no_vote",
    "not_staged",
    "aborted_by_coordinator",
    "coordinator_stopping",
    "agent_stopping",
    "comm_rebuilt",
    "coordinator_lost",
    "fence_timeout",
    "vote_failed",
    "integrity",
    "missed_commit_step",
    "internal_error",
    "agent_lost",
    "voting_timeout",
    "step_clock",
    "other",
]
"""Why a plan was not applied, as a label (``eplb_plans_aborted_total{reason}``); the free
text beside it says the details."""
ABORT_CODES: Final[frozenset[str]] = frozenset(get_args(AbortCode))


class Reject(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    reason: str
    code: RejectCode = "refused"


CLOCK_PROBE_EVERY = 32
"""Step-clock probe steps are the multiples of this (see :class:`StepClock`)."""
CLOCK_PROBE_RADIUS: Final = 3
"""Each probe carries the end times of ``2 * CLOCK_PROBE_RADIUS + 1`` steps around its step."""
CLOCK_PROBE_LEN = 2 * CLOCK_PROBE_RADIUS + 1


class StepClock(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When this rank's serving thread finished the steps around a few probe steps.

    ``times[i][j]`` is the monotonic time at which step ``probe_steps[i] - radius + j``
    ended; ``wall_minus_mono`` converts it to wall time for ranks on other hosts. All ranks
    run the same forward passes at the same moments, so equal step numbers must carry
    (nearly) equal times; see ``coordinator.step_clock``. The decoder holds a probe to the
    spec: radius 3, probe steps multiples of 32, one row of 7 times per probe step. A probe of
    another shape never lines up with the other ranks' (or, rows and steps miscounted, pairs
    times with the wrong step), so the rank's clock would stay unverified and hold planning
    for ``step_clock_grace_s`` with nothing saying why.
    """

    probe_steps: list[Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX, multiple_of=CLOCK_PROBE_EVERY)]]
    times: list[Annotated[list[float], msgspec.Meta(min_length=CLOCK_PROBE_LEN, max_length=CLOCK_PROBE_LEN)]]
    """``[len(probe_steps), 7]``: one row per probe step (checked at decoding, see ``_check_shapes``)."""
    radius: Literal[3]
    """Always ``CLOCK_PROBE_RADIUS`` (3): the only window the coordinator compares."""
    wall_minus_mono: float


class Heartbeat(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    rank: NonNegInt
    step: NonNegInt
    epoch: NonNegInt
    comm_generation: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """Generation of the side communicator the agent has built; -1 while none."""
    session: Session = 0
    internal_errors: NonNegInt = 0
    """Agent-loop failures this agent recovered from (each one a clean reset)."""
    clock: StepClock | None = None
    counters: dict[str, NonNegInt] = msgspec.field(default_factory=dict)
    """The agent's own counters since it started (names in :data:`AGENT_COUNTERS`)."""
    staging_plan: NonNegInt = 0
    """The plan this agent is staging now (0: none). The coordinator sends a rank no copy of a
    ``Plan`` it is staging: a large plan stages for many seconds, and copies every 2 s of a
    message of ``layers x P`` rows, to every rank, were traffic and log lines for nothing."""
    decided_plan: NonNegInt = 0
    """The last plan whose decision record this agent read (0: none yet), with the record's
    content below: what its ``Voted`` says, repeated in every heartbeat. A link that loses a
    plan's every ``Voted`` and ``Committed`` (or an engine idle short of ``S``) otherwise left the
    coordinator without the outcome for as long as that lasted, and no plan started meanwhile."""
    decided_commit: bool = False
    """The record of ``decided_plan`` says commit (else abort)."""
    decided_commit_step: NonNegInt = 0
    """The step ``S`` the record names for a commit (0 for an abort)."""
    decided_code: AbortCode = "other"
    """The abort code the record names (``other`` for a commit). Every rank's ``Aborted`` carries
    it too, but only once its serving thread reaches a step boundary (an idle engine may not for
    long), while heartbeats say the decision at once: a plan settled on heartbeats alone was booked
    ``other`` where every rank knew the reason (``eplb_plans_aborted_total{reason}``, status)."""


AGENT_COUNTERS = (
    "committed",
    "aborted",
    "staged",
    "plans_rejected",
    "integrity_failures",
    "internal_errors",
    "socket_reopened",
    "bad_messages",
    "send_dropped",
    "duplicate_messages",
    "bytes_received",
    "dropped_load_windows",
    "own_stalls",
)
"""What agents count and send in heartbeats; the coordinator exports them per rank."""


class HeartbeatAck(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """The coordinator heard the heartbeat: an agent that hears nothing reopens its socket."""

    session: Session


class LoadReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """Tokens this rank routed to each physical slot over ``[step_begin, step_end)``."""

    rank: NonNegInt
    epoch: NonNegInt
    step_begin: NonNegInt
    step_end: NonNegInt
    slot_load: NDArray
    """``[L, P]`` counts, counted under placement ``epoch``."""
    session: Session = 0


class Plan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """New placement rows for some layers, applied on top of placement ``base_epoch``.

    Every agent derives the same global transfer schedule from (its maps, these rows).
    """

    plan_id: NonNegInt
    base_epoch: NonNegInt
    layers: list[int]
    phy2log: NDArray
    """``[len(layers), P]`` int64."""


class Staged(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    rank: NonNegInt
    plan_id: NonNegInt
    bytes_received: NonNegInt
    duration_s: NonNegFloat
    session: Session = 0


class Failed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """The agent could not stage plan ``plan_id`` (invalid, busy, transport error)."""

    rank: NonNegInt
    plan_id: NonNegInt
    reason: str
    session: Session = 0
    code: AbortCode = "other"


class VoteNow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    plan_id: NonNegInt


class Voted(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """The plan's decision record as this rank read it: every rank commits at ``commit_step``
    (``ok``) or none does."""

    rank: NonNegInt
    plan_id: NonNegInt
    commit_step: NonNegInt
    ok: bool
    session: Session = 0


class Committed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    rank: NonNegInt
    plan_id: NonNegInt
    commit_step: NonNegInt
    epoch: NonNegInt
    stall_s: NonNegFloat
    session: Session = 0


class Aborted(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """The agent dropped plan ``plan_id`` with its maps untouched."""

    rank: NonNegInt
    plan_id: NonNegInt
    reason: str
    session: Session = 0
    code: AbortCode = "other"


class AbortPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """Drop plan ``plan_id``. An agent already in its vote records ``abort`` in the decision
    record instead; if ``commit`` is there already, it commits, and says so in ``Voted``."""

    plan_id: NonNegInt
    reason: str
    code: AbortCode = "other"


class Goodbye(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    rank: NonNegInt
    reason: str
    session: Session = 0


class CoordinatorStopping(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    """The coordinator is shutting down: agents keep serving and register again when it is back."""

    reason: str


class StatusRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    pass


class StatusReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag=True):
    status_json: bytes
    """The coordinator's status document (JSON), see ``coordinator.status``."""


Message = Union[
    Hello,
    Welcome,
    Reject,
    CommInit,
    Heartbeat,
    HeartbeatAck,
    LoadReport,
    Plan,
    Staged,
    Failed,
    VoteNow,
    Voted,
    Committed,
    Aborted,
    AbortPlan,
    Goodbye,
    CoordinatorStopping,
    StatusRequest,
    StatusReply,
]

AgentMessage = Union[Heartbeat, LoadReport, Staged, Failed, Voted, Committed, Aborted, Goodbye]
"""What a registered agent sends: each names its rank and carries its session."""

CoordinatorMessage = Union[
    Welcome, Reject, CommInit, HeartbeatAck, Plan, VoteNow, AbortPlan, CoordinatorStopping, StatusReply
]
"""What only the coordinator sends. One arriving at the coordinator is refused as
``bad_message`` naming its type: no agent or client sends it, so it is a bug or a probe, not
a stale session. The rest of :data:`Message` is ``Hello``, ``StatusRequest`` and
:data:`AgentMessage`."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes, max_bytes: int | None = None) -> Message:
    """Decode one frame; raise :class:`ProtocolError` naming what was wrong.

    ``max_bytes``: the receiver's own limit (the coordinator's, fitted to the model), else
    ``MAX_MESSAGE_BYTES``.
    """
    if max_bytes is None and len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES}")
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        message = _decoder.decode(frame)
        _check_finite(message, "$")
        _check_shapes(message)
        return message
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {_json_hint(frame) or exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 through as UnicodeDecodeError
        raise ProtocolError(f"undecodable frame: {_json_hint(frame) or exc}") from None


class _HelloHead(msgspec.Struct):
    """The part of a ``Hello`` every protocol version has: its type, version and rank. Any other
    field is ignored, so a Hello of another version decodes here whatever fields it adds or lacks."""

    type: Literal["Hello"]
    protocol_version: int
    rank: int = -1


def hello_of_another_version(frame: bytes) -> tuple[int, int] | None:
    """``(protocol_version, rank)`` of a frame that :func:`decode` refused but that is a ``Hello``
    of another protocol version, else None.

    A new version that adds a field to ``Hello`` (or an old one that lacks one) fails to decode
    here before its version is read: the agent heard "unknown field" (``bad_message``: sending
    again will not help) where the protocol promises a refusal naming both versions (``refused``:
    it asks again every ``REFUSED_RETRY_S``, so a coordinator of its version takes it)."""
    try:
        head = msgspec.msgpack.decode(frame, type=_HelloHead)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec's ValidationError is a DecodeError
        return None
    if head.protocol_version == PROTOCOL_VERSION:
        return None
    return head.protocol_version, head.rank


def _json_hint(frame: bytes) -> str:
    """Why a frame that is JSON text failed, or ``""`` when it is not JSON.

    msgpack reads ``{``, ``[`` and ``"`` as small integers, so a JSON message failed as
    "Expected `object`, got `int`", which points nowhere. No message starts with those bytes
    (each is a msgpack map), so a frame that parses as JSON can only be a client sending JSON."""
    if frame.lstrip()[:1] not in (b"{", b"[", b'"'):
        return ""
    try:
        msgspec.json.decode(frame)
    except msgspec.DecodeError:
        return ""
    return (
        "the frame is JSON text; messages are msgpack (a map whose 'type' names the message; "
        "fields as in proto/schema.json)"
    )


def _check_shapes(message: Message) -> None:
    """What the types cannot say: a heartbeat's clock holds one row of times per probe step
    (``zip`` in the coordinator would silently pair the wrong ones, or drop the extras)."""
    if isinstance(message, Heartbeat) and message.clock is not None:
        steps, rows = len(message.clock.probe_steps), len(message.clock.times)
        if steps != rows:
            raise ProtocolError(
                f"invalid message: Expected one row of times per probe step ({steps}), got {rows} rows"
                " - at `$.clock.times`"
            )


def _all_finite(value: object) -> bool:
    """Whether every float in ``value`` (fields, lists, lists of lists) is finite: the fast path of
    :func:`_check_finite` (a heartbeat carries a few hundred floats), which names the culprit."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, msgspec.Struct):
        return all(_all_finite(getattr(value, name)) for name in value.__struct_fields__)
    if isinstance(value, list):
        if all(type(item) is float for item in value):
            return all(map(math.isfinite, value))
        return all(_all_finite(item) for item in value)
    return True


def _check_finite(value: object, path: str) -> None:
    """Refuse NaN and infinities in any float field, also inside lists (not every msgspec
    build does it for ``ge``)."""
    if _all_finite(value):
        return
    _find_not_finite(value, path)


def _find_not_finite(value: object, path: str) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"invalid message: Expected a finite `float`, got {value} - at `{path}`")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _find_not_finite(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_not_finite(item, f"{path}[{i}]")


def json_schema() -> dict[str, object]:
    """The language-neutral schema of every message (written to ``proto/schema.json``)."""
    return msgspec.json.schema(Message)
