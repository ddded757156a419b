"""The copy-engine transport's pure logic: which transport a deployment uses, where every
byte of an exchange goes, and how a receiver knows its bytes have landed.

No CUDA, no processes, no I/O here: :mod:`.transport_copy_engine` drives these pieces with
a :mod:`.memory_mover` (CUDA IPC + ``cudaMemcpyAsync`` on the GPU, shared memory on CPU).

**Selection.** ``EPLB_SERVICE_TRANSPORT`` (:func:`parse_mode`): ``copy-engine`` forces
peer copies, ``nccl`` forces the NCCL transport, ``auto`` takes copy engines for every
pair of ranks that can use them. A pair can when both ranks run on the same host
(:func:`host_key`) and each rank could open the other's memory (same device, or peer
access): :func:`candidate_peers` narrows the peers by host and device, each rank then
really opens its candidates' windows, publishes the ones it opened, and
:func:`copy_engine_pairs` keeps the pairs that both ends opened. Today the transport is
chosen for the whole deployment (:func:`decide`): copy engines when *every* pair of
ranks can use them (one node), else NCCL for every pair. Pairs are already decided one
by one, so mixing both per pair is a later layer on the same decision.

**Addressing.** Every rank owns one *outbox*: device memory of ``window_bytes`` that its
peers have opened (CUDA IPC handles exchanged at the side-communicator rendezvous). The
ops of one ``exchange`` with one peer form a *stream*: the bytes of that peer's ops in
issue order (every rank issues the same ops in the same order with the same sizes, as
NCCL requires). A stream moves in *pieces*: the sender copies a byte range of it into
its outbox (:func:`plan_round` shares the outbox among the peers still owed bytes), the
receiver copies the piece from the sender's outbox straight into its receive tensors
(:func:`split_span` maps a stream range onto op tensors on both sides). Receivers pull:
the one cross-device copy per byte lands in its final place.

**Completion.** Each rank owns a small host control block in shared memory
(:class:`ControlBlock`): one :class:`Descriptor` slot per peer it sends to, one ack
word per peer it receives from, and a state word. The sender publishes a piece only once
its copies into the outbox have *completed* (it waited for a CUDA event on the host),
writing the descriptor's fields first and its sequence number last. The receiver
starts its copy when it sees the next sequence number, waits for that copy's event on
the host, and only then acks the sequence number; the sender reuses outbox space and the
descriptor slot only after every ack of its round. So a receiver never reads a byte the
sender has not finished writing, a sender never overwrites a byte a receiver has not
finished reading, and the stream's last piece acked means every byte of the stream has
landed in the receiver's tensors. Why not a CUDA IPC event the receiver's stream waits
on: a wait on an event whose ``record`` has not been issued yet returns at once, so a
host-side sequence number is needed anyway, and once it is there a host wait costs
nothing more than the per-chunk host wait the transport keeps for bounded waits (a
peer that is gone must end in ``TransportError`` within the timeout, never a stuck
stream). Why not the TCP store: tens of signals per chunk at ~0.1 ms each. The
descriptor also carries the stream's total length and its number, so a receiver whose
ops do not match the sender's fails with an error naming both, instead of copying
garbage. Digests still cover every byte before any vote.

A rank that aborts writes :data:`STATE_ABORTED` into its block, so its peers fail their
waits at once instead of at the timeout.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MODES = ("auto", "nccl", "copy-engine")
"""Values of ``EPLB_SERVICE_TRANSPORT`` that concern the choice between copy engines and NCCL."""

ALIGN = 256
"""Pieces start on this boundary in the outbox (copy engines move aligned blocks fastest)."""


class CopyEngineError(RuntimeError):
    """The copy-engine protocol cannot go on (the transport turns it into ``TransportError``)."""


# -- selection -----------------------------------------------------------------------------------


def parse_mode(text: str, variable: str = "EPLB_SERVICE_TRANSPORT") -> str:
    """``text`` as one of :data:`MODES`; a ``ValueError`` naming the value and the choices otherwise."""
    mode = text.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{variable}={text!r}: expected one of {', '.join(MODES)}")
    return mode


def host_key() -> str:
    """Same value for every process of one machine (and one boot), different across machines.

    The hostname alone can repeat across containers on different hosts; the kernel's boot
    id cannot.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def pid_namespace() -> str:
    """This process's pid namespace (``""`` where it cannot be read)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this pid namespace) still runs; an exited, unreaped one does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass(frozen=True)
class RankInfo:
    """What a rank publishes at the rendezvous for the others to choose and open with."""

    rank: int
    host: str
    device: str
    """The rank's device, as the mover names it (a GPU UUID; ``cpu``)."""
    mode: str
    control: str
    """Where its control block lives (a shared-memory file path)."""
    window: str
    """Its outbox's handle (hex of a CUDA IPC memory handle; a shared-memory file path)."""
    window_bytes: int
    pid: int = 0
    pid_namespace: str = ""
    """The rank's process and pid namespace: a peer in the same namespace watches the pid, so a
    rank that dies without aborting fails its peers' exchanges at once, not at the timeout."""

    def as_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "host": self.host,
            "device": self.device,
            "mode": self.mode,
            "control": self.control,
            "window": self.window,
            "window_bytes": self.window_bytes,
            "pid": self.pid,
            "pid_namespace": self.pid_namespace,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> RankInfo:
        return cls(
            rank=int(str(raw["rank"])),
            host=str(raw["host"]),
            device=str(raw["device"]),
            mode=str(raw["mode"]),
            control=str(raw["control"]),
            window=str(raw["window"]),
            window_bytes=int(str(raw["window_bytes"])),
            pid=int(str(raw.get("pid", 0))),
            pid_namespace=str(raw.get("pid_namespace", "")),
        )


def candidate_peers(me: RankInfo, infos: Sequence[RankInfo], can_reach: Callable[[str], bool]) -> list[int]:
    """Peers whose windows ``me`` should try to open: same host, a device it can reach, a window at all."""
    return [
        info.rank
        for info in infos
        if info.rank != me.rank and info.host == me.host and info.window and info.control and can_reach(info.device)
    ]


def copy_engine_pairs(opened: Mapping[int, Iterable[int]]) -> set[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, where each rank opened the other's window."""
    sets = {rank: set(peers) for rank, peers in opened.items()}
    return {(a, b) for a, peers in sets.items() for b in peers if a < b and a in sets.get(b, set())}


def missing_pairs(world_size: int, pairs: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pairs of ranks that cannot use copy engines."""
    return [(a, b) for a in range(world_size) for b in range(a + 1, world_size) if (a, b) not in pairs]


def decide(modes: Sequence[str], world_size: int, pairs: set[tuple[int, int]]) -> str:
    """``"copy-engine"`` or ``"nccl"`` for the whole deployment.

    Raises ``CopyEngineError`` when the ranks disagree on the mode (a deployment must set
    ``EPLB_SERVICE_TRANSPORT`` alike everywhere) or when ``copy-engine`` is forced and
    some pair cannot use it (the message names the pairs).
    """
    distinct = sorted(set(modes))
    if len(distinct) > 1:
        by_mode = {m: [r for r, x in enumerate(modes) if x == m] for m in distinct}
        raise CopyEngineError(f"the ranks disagree on EPLB_SERVICE_TRANSPORT: {by_mode}; set it alike on every rank")
    mode = distinct[0] if distinct else "auto"
    if mode == "nccl":
        return "nccl"
    missing = missing_pairs(world_size, pairs)
    if not missing:
        return "copy-engine"
    if mode == "copy-engine":
        shown = ", ".join(f"{a}-{b}" for a, b in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CopyEngineError(
            f"EPLB_SERVICE_TRANSPORT=copy-engine, but {len(missing)} pair(s) of ranks cannot use peer copies "
            f"(not on one host, or no peer access between their GPUs): {shown}"
        )
    return "nccl"


# -- addressing ------------------------------------------------------------------------------------


def split_span(sizes: Sequence[int], start: int, length: int) -> list[tuple[int, int, int, int]]:
    """Where bytes ``[start, start + length)`` of a stream of ops of ``sizes`` bytes lie.

    Returns ``(op index, offset in the op, offset in the piece, bytes)`` for every op the
    range touches, in order. The sender fills its outbox this way, the receiver scatters a
    piece into its receive tensors the same way.
    """
    total = sum(sizes)
    if start < 0 or length < 0 or start + length > total:
        raise CopyEngineError(f"byte range [{start}, {start + length}) outside a stream of {total} bytes")
    out: list[tuple[int, int, int, int]] = []
    op_begin = 0
    done = 0
    for index, size in enumerate(sizes):
        op_end = op_begin + size
        lo, hi = max(start, op_begin), min(start + length, op_end)
        if lo < hi:
            out.append((index, lo - op_begin, done, hi - lo))
            done += hi - lo
        op_begin = op_end
        if op_begin >= start + length:
            break
    return out


def plan_round(remaining: Mapping[int, int], capacity: int, align: int = ALIGN) -> dict[int, tuple[int, int]]:
    """One round of pieces: peer -> ``(offset in the outbox, bytes)``.

    Every peer still owed bytes gets an equal, aligned share of the outbox (or what it is
    owed, if less), in peer order; the pieces do not overlap and fit in ``capacity``.
    """
    owed = {peer: n for peer, n in sorted(remaining.items()) if n > 0}
    if not owed:
        return {}
    share = (capacity // len(owed)) // align * align
    if share <= 0:
        raise CopyEngineError(f"an outbox of {capacity} bytes cannot hold a piece for each of {len(owed)} peers")
    out: dict[int, tuple[int, int]] = {}
    offset = 0
    for peer, n in owed.items():
        size = min(n, share)
        out[peer] = (offset, size)
        offset += -(-size // align) * align
    return out


# -- completion --------------------------------------------------------------------------------------

STATE_LIVE = 1
STATE_ABORTED = 2
_MAGIC = 0x45504C4243450001  # "EPLBCE", layout 1
_HEADER = 8  # int64 words: magic, state, pid, generation, world size, rank, 2 spare
_SLOT = 8  # int64 words per descriptor / ack slot (one 64-byte cache line)


@dataclass(frozen=True)
class Descriptor:
    """One piece a sender offers one receiver (its slot in the sender's control block)."""

    seq: int
    """Pieces of this pair so far in the generation, this one included (0: none yet)."""
    offset: int
    """Where the piece lies in the sender's outbox."""
    nbytes: int
    stream_offset: int
    """Where the piece lies in the stream."""
    stream_total: int
    """The stream's length, as the sender counts it."""
    stream_no: int
    """Non-empty streams of this pair so far in the generation, this one included."""


def control_words(world_size: int) -> int:
    """Size of a control block in int64 words."""
    return _HEADER + 2 * world_size * _SLOT


class ControlBlock:
    """A rank's control block over an int64 array (shared memory; a plain array in tests).

    One writer: the owner. Descriptors are written fields first, sequence number last, and
    readers read the sequence number first: with ``fence`` between (a memory barrier on the
    host, see the transport), a reader that sees a new sequence number sees its fields.
    """

    def __init__(self, words: np.ndarray, world_size: int, fence: Callable[[], None] = lambda: None) -> None:
        if words.dtype != np.int64 or words.size < control_words(world_size):
            raise CopyEngineError(f"a control block for {world_size} ranks needs {control_words(world_size)} int64")
        self.words, self.world_size, self.fence = words, world_size, fence

    def init(self, rank: int, generation: int) -> None:
        self.words[:] = 0
        self.words[2], self.words[3], self.words[4], self.words[5] = os.getpid(), generation, self.world_size, rank
        self.words[1] = STATE_LIVE
        self.fence()
        self.words[0] = _MAGIC

    def check(self, rank: int, generation: int) -> None:
        """Raise unless this is ``rank``'s block of ``generation`` (a peer opened the right file)."""
        w = self.words
        if int(w[0]) != _MAGIC or int(w[3]) != generation or int(w[4]) != self.world_size or int(w[5]) != rank:
            raise CopyEngineError(
                f"control block of rank {rank} generation {generation}: found magic {int(w[0]):#x}, "
                f"generation {int(w[3])}, world size {int(w[4])}, rank {int(w[5])}"
            )

    @property
    def state(self) -> int:
        return int(self.words[1])

    def mark_aborted(self) -> None:
        self.words[1] = STATE_ABORTED

    def _desc(self, peer: int) -> int:
        return _HEADER + peer * _SLOT

    def _ack(self, peer: int) -> int:
        return _HEADER + (self.world_size + peer) * _SLOT

    def publish(self, peer: int, d: Descriptor) -> None:
        base = self._desc(peer)
        self.words[base + 1 : base + 6] = (d.offset, d.nbytes, d.stream_offset, d.stream_total, d.stream_no)
        self.fence()
        self.words[base] = d.seq

    def descriptor(self, peer: int) -> Descriptor:
        """The latest descriptor this block's owner published for ``peer``."""
        base = self._desc(peer)
        seq = int(self.words[base])
        self.fence()
        fields = [int(x) for x in self.words[base + 1 : base + 6]]
        return Descriptor(seq, *fields)

    def ack(self, peer: int, seq: int) -> None:
        """The owner has finished copying piece ``seq`` of ``peer``'s stream to it."""
        self.fence()
        self.words[self._ack(peer)] = seq

    def acked(self, peer: int) -> int:
        value = int(self.words[self._ack(peer)])
        self.fence()
        return value


@dataclass
class SendStream:
    """The sender's side of one pair in one exchange."""

    peer: int
    sizes: list[int]
    stream_no: int
    sent: int = 0
    """Bytes published so far."""

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def owed(self) -> int:
        return self.total - self.sent


@dataclass
class ReceiveStream:
    """The receiver's side of one pair in one exchange."""

    peer: int
    sizes: list[int]
    stream_no: int
    next_seq: int
    """The sequence number of the next piece it expects."""
    received: int = 0

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def done(self) -> bool:
        return self.received >= self.total

    def accept(self, d: Descriptor, me: int) -> bool:
        """Whether ``d`` is the next piece; raises if it is a piece of something else.

        ``False``: not published yet (an older sequence number). A newer one than expected,
        another stream number or total, or a piece out of order means the two ranks issued
        different ops: no byte of it may be copied.
        """
        if d.seq < self.next_seq:
            return False
        where = f"rank {me} receiving from rank {self.peer}"
        if d.seq != self.next_seq:
            raise CopyEngineError(f"{where}: piece {d.seq} published, expected {self.next_seq} (lost a piece)")
        if d.stream_no != self.stream_no or d.stream_total != self.total:
            raise CopyEngineError(
                f"{where}: the sender's stream {d.stream_no} has {d.stream_total} bytes, this rank expects "
                f"stream {self.stream_no} of {self.total} bytes (the ranks issued different ops)"
            )
        if d.stream_offset != self.received or d.nbytes <= 0 or d.stream_offset + d.nbytes > self.total:
            raise CopyEngineError(
                f"{where}: piece of bytes [{d.stream_offset}, {d.stream_offset + d.nbytes}), expected one "
                f"starting at {self.received} within {self.total}"
            )
        return True
