"""Fuzzing the protocol edge: the decoder, array decoding, and the coordinator's handlers.

``check_frame`` is the property: any bytes either decode into a typed message whose arrays
decode or fail with :class:`~eplb_service.protocol.ProtocolError`, or the frame fails with
``ProtocolError``. ``HandlerHarness`` feeds decoded messages to a real (unbound) Coordinator
with registered agents; a handler must never raise, whatever the message says.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from eplb_service import protocol
from eplb_service.placement import PlacementShape, initial_phy2log

MESSAGE_TYPES = protocol.Message.__args__


def message_strategy() -> st.SearchStrategy:
    """Arbitrary, well-typed instances of every message (any values, any arrays).

    Integers span msgpack's whole range (int64/uint64): nothing wider can arrive on the wire.
    """
    st.register_type_strategy(int, st.integers(-(2**63), 2**64 - 1))
    return st.one_of(*(st.builds(cls) for cls in MESSAGE_TYPES))


def arrays_of(message) -> list[protocol.NDArray]:
    return [
        v for v in (getattr(message, f, None) for f in message.__struct_fields__) if isinstance(v, protocol.NDArray)
    ]


def check_frame(frame: bytes) -> str:
    """Decode ``frame`` like the coordinator and agents do; returns the outcome's name."""
    try:
        message = protocol.decode(frame)
    except protocol.ProtocolError:
        return "rejected"
    for array in arrays_of(message):
        try:
            array.to_numpy()
        except protocol.ProtocolError:
            return "array_rejected"
    return "accepted"


def mutate(frame: bytes, data: st.DataObject) -> bytes:
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif action == "cut" and buf:
            del buf[data.draw(st.integers(0, len(buf) - 1)) :]
        else:
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


class SocketSink:
    """Stands in for the coordinator's ROUTER socket: counts what it would send, never has a
    message waiting (tests that drive a ``Coordinator``'s handlers without sockets use it too)."""

    closed = False

    def __init__(self) -> None:
        self.sent = 0

    def get(self, option) -> int:
        return 0

    def send_multipart(self, frames, flags=0) -> None:
        self.sent += 1

    def setsockopt(self, option, value) -> None:
        pass


class HandlerHarness:
    """A Coordinator whose two agents are registered; ``feed`` must never raise."""

    def __init__(self) -> None:
        from eplb_service.coordinator.config import CoordinatorConfig
        from eplb_service.coordinator.server import Coordinator

        self.coordinator = Coordinator(CoordinatorConfig(world_size=2, endpoint="ipc:///nonexistent/fuzz.sock"))
        self.coordinator._sock = SocketSink()
        shape = PlacementShape(2, 6, 8, 2)
        for rank in range(2):
            self.coordinator._handle(
                f"rank-{rank}".encode(),
                protocol.Hello(
                    protocol_version=protocol.PROTOCOL_VERSION,
                    rank=rank,
                    model=protocol.ModelShape(2, 6, 8, 2, 36),
                    phy2log=protocol.NDArray.from_numpy(initial_phy2log(shape)),
                    epoch=0,
                    step=0,
                    transport="gloo",
                    store_host="127.0.0.1" if rank == 0 else "",
                    store_port=1 if rank == 0 else 0,
                ),
            )
        assert self.coordinator.registry.complete

    def feed(self, message, identity: bytes = b"rank-0") -> None:
        """The message as sent, and, from a registered connection, also with that connection's
        rank and session, so the handlers behind the session check are fuzzed too."""
        import msgspec

        coordinator = self.coordinator
        coordinator._handle(identity, message)
        record = coordinator.registry.by_identity(identity)
        if record is not None and isinstance(message, protocol.AgentMessage.__args__):
            coordinator._handle(identity, msgspec.structs.replace(message, rank=record.rank, session=record.session))


def valid_load_report(rng: np.random.Generator, rank: int = 0) -> protocol.LoadReport:
    return protocol.LoadReport(
        rank=rank,
        epoch=0,
        step_begin=0,
        step_end=10,
        slot_load=protocol.NDArray.from_numpy(rng.integers(0, 100, (2, 8)).astype(np.int64)),
    )
