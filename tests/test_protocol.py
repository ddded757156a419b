"""The wire protocol: round trips, strict decoding, array checks, fuzzing, schema currency."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service import protocol
from eplb_service.schema import SCHEMA_PATH, render


def _arr(a) -> protocol.NDArray:
    return protocol.NDArray.from_numpy(np.asarray(a))


SAMPLES = [
    protocol.Hello(
        protocol_version=1,
        rank=3,
        model=protocol.ModelShape(2, 4, 6, 2, 128),
        phy2log=_arr(np.arange(12).reshape(2, 6) % 4),
        epoch=0,
        step=7,
        transport="gloo",
        node="n1",
        pid=42,
    ),
    protocol.Welcome(protocol_version=1, rank=3, config=protocol.AgentConfig(fence_steps=4)),
    protocol.Welcome(
        protocol_version=1,
        rank=0,
        config=protocol.AgentConfig(),
        comm=protocol.CommInit(generation=2, store_host="h", store_port=1, world_size=2),
    ),
    protocol.Reject(reason="no"),
    protocol.CommInit(generation=1, store_host="127.0.0.1", store_port=5000, world_size=8),
    protocol.Heartbeat(rank=1, step=10, epoch=2, comm_generation=1),
    protocol.Heartbeat(
        rank=1,
        step=10,
        epoch=2,
        comm_generation=1,
        session=77,
        internal_errors=2,
        clock=protocol.StepClock(
            probe_steps=[32], times=[[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]], radius=3, wall_minus_mono=5.5
        ),
    ),
    protocol.HeartbeatAck(session=77),
    protocol.Reject(reason="held", code="rank_taken"),
    protocol.LoadReport(rank=1, epoch=2, step_begin=0, step_end=10, slot_load=_arr(np.ones((2, 6), dtype=np.int64))),
    protocol.Plan(plan_id=5, base_epoch=2, layers=[0, 1], phy2log=_arr(np.zeros((2, 6), dtype=np.int64))),
    protocol.Staged(rank=0, plan_id=5, bytes_received=1024, duration_s=0.5),
    protocol.Failed(rank=0, plan_id=5, reason="busy"),
    protocol.VoteNow(plan_id=5),
    protocol.Voted(rank=0, plan_id=5, commit_step=99, ok=True),
    protocol.Committed(rank=0, plan_id=5, commit_step=99, epoch=3, stall_s=1e-5),
    protocol.Aborted(rank=0, plan_id=5, reason="fence_timeout"),
    protocol.AbortPlan(plan_id=5, reason="rank 2 lost"),
    protocol.Goodbye(rank=0, reason="bye"),
    protocol.CoordinatorStopping(reason="SIGTERM"),
    protocol.StatusRequest(),
    protocol.StatusReply(status_json=b"{}"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_every_union_member_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(protocol.Message.__args__)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "float64"])
def test_ndarray_round_trip_keeps_dtype_shape_values(dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    b = _arr(a).to_numpy()
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


@pytest.mark.parametrize(
    ("shape", "size", "refusal"),
    [
        ((2, 3), 40, r"shape \(2, 3\) of int64 needs 48 bytes, got 40"),
        ((2, 3), 56, r"shape \(2, 3\) of int64 needs 48 bytes, got 56"),
        ((-1, -2), 16, r"shape \(-1, -2\) must have <= 4 non-negative dims"),
        ((0, -1), 0, r"shape \(0, -1\) must have <= 4 non-negative dims"),
    ],
)
def test_ndarray_rejects_byte_count_that_does_not_match_shape(shape, size, refusal):
    """Too few bytes, too many, or negative dims whose product happens to match the bytes: each a
    ``ProtocolError`` naming the array, never numpy's ``ValueError`` from the reshape."""
    bad = protocol.NDArray(dtype="int64", shape=shape, data=b"\0" * size)
    with pytest.raises(protocol.ProtocolError, match=r"^plan\.phy2log: " + refusal):
        bad.to_numpy("plan.phy2log")


def test_ndarray_rejects_unknown_dtype_and_too_many_dims():
    with pytest.raises(protocol.ProtocolError, match="object"):
        protocol.NDArray(dtype="object", shape=(1,), data=b"x").to_numpy()
    with pytest.raises(protocol.ProtocolError, match="dims"):
        protocol.NDArray(dtype="int8", shape=(1,) * 5, data=b"x").to_numpy()
    with pytest.raises(protocol.ProtocolError, match="complex128"):
        protocol.NDArray.from_numpy(np.zeros(2, dtype=np.complex128))


def test_constraints_refuse_negative_ids_and_nan_naming_the_field():
    import msgspec

    with pytest.raises(protocol.ProtocolError, match=r"Expected `int` >= 0 - at `\$.rank`"):
        protocol.decode(msgspec.msgpack.encode({"type": "Heartbeat", "rank": -1, "step": 1, "epoch": 0}))
    with pytest.raises(protocol.ProtocolError, match=r"\$.stall_s"):
        protocol.decode(
            msgspec.msgpack.encode(
                {"type": "Committed", "rank": 0, "plan_id": 1, "commit_step": 5, "epoch": 1, "stall_s": float("nan")}
            )
        )


def _heartbeat_with_clock(**clock) -> bytes:
    import msgspec

    probe = {"probe_steps": [32, 64], "times": [[1.0] * 7, [2.0] * 7], "radius": 3, "wall_minus_mono": 0.0}
    probe.update(clock)
    return msgspec.msgpack.encode({"type": "Heartbeat", "rank": 1, "step": 70, "epoch": 0, "clock": probe})


@pytest.mark.parametrize(
    ("clock", "refusal"),
    [
        ({"radius": 4}, r"Invalid enum value 4 - at `\$\.clock\.radius`"),
        ({"times": [[1.0] * 7, [2.0] * 6]}, r"length >= 7 - at `\$\.clock\.times\[1\]`"),
        ({"times": [[1.0] * 7, [2.0] * 9]}, r"length <= 7 - at `\$\.clock\.times\[1\]`"),
        ({"times": [[1.0] * 7]}, r"one row of times per probe step \(2\), got 1 rows - at `\$\.clock\.times`"),
        ({"probe_steps": [32]}, r"one row of times per probe step \(1\), got 2 rows - at `\$\.clock\.times`"),
        ({"probe_steps": [32, 65]}, r"multiple of 32 - at `\$\.clock\.probe_steps\[1\]`"),
        ({"wall_minus_mono": float("inf")}, r"finite `float`, got inf - at `\$\.clock\.wall_minus_mono`"),
        (
            {"times": [[1.0] * 7, [2.0] * 6 + [float("nan")]]},
            r"finite `float`, got nan - at `\$\.clock\.times\[1\]\[6\]`",
        ),
    ],
)
def test_a_step_clock_probe_off_the_spec_is_refused_naming_the_field(clock, refusal):
    """Radius 3, rows of 7 times, one row per probe step at multiples of 32 (PROTOCOL.md, Step clock):
    a probe of another shape never lines up with the other ranks' and held planning unexplained."""
    with pytest.raises(protocol.ProtocolError, match=refusal):
        protocol.decode(_heartbeat_with_clock(**clock))
    assert isinstance(protocol.decode(_heartbeat_with_clock()), protocol.Heartbeat)  # the spec's own shape passes


def test_wrong_field_type_is_named():
    import msgspec

    frame = msgspec.msgpack.encode({"type": "Heartbeat", "rank": "zero", "step": 1, "epoch": 0})
    with pytest.raises(protocol.ProtocolError, match=r"\$\.rank"):
        protocol.decode(frame)


def test_unknown_fields_and_types_are_refused():
    import msgspec

    with pytest.raises(protocol.ProtocolError, match="extra"):
        protocol.decode(msgspec.msgpack.encode({"type": "VoteNow", "plan_id": 1, "extra": 2}))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(msgspec.msgpack.encode({"type": "Pickle", "payload": b"x"}))


@pytest.mark.parametrize("frame", [b'{"type": "StatusRequest"}', b" [1, 2]\n", b'"StatusRequest"'])
def test_a_json_frame_is_named_as_json(frame):
    """A third-party client sending JSON got msgpack's reading of it: ``{`` is the msgpack
    integer 123, so the answer was "Expected `object`, got `int`", which points nowhere."""
    with pytest.raises(protocol.ProtocolError, match=r"the frame is JSON text; messages are msgpack"):
        protocol.decode(frame)


def test_a_msgpack_frame_that_looks_like_json_is_still_read_as_msgpack():
    with pytest.raises(protocol.ProtocolError) as refused:
        protocol.decode(b"{")  # the msgpack integer 123, not JSON
    assert "JSON" not in str(refused.value)


def test_oversize_frame_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 100)
    with pytest.raises(protocol.ProtocolError, match="exceeds MAX_MESSAGE_BYTES=100"):
        protocol.decode(b"\x90" * 101)


def test_a_frame_of_exactly_the_limit_is_decoded_and_one_byte_more_is_refused(monkeypatch):
    """The limits are the largest frame taken ("exceeds" refuses), the receiver's own and the hard one."""
    frame = protocol.encode(protocol.Heartbeat(rank=1, step=70, epoch=0))
    assert isinstance(protocol.decode(frame, max_bytes=len(frame)), protocol.Heartbeat)
    with pytest.raises(
        protocol.ProtocolError, match=rf"frame of {len(frame)} bytes exceeds the limit of {len(frame) - 1}"
    ):
        protocol.decode(frame, max_bytes=len(frame) - 1)
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", len(frame))
    assert isinstance(protocol.decode(frame), protocol.Heartbeat)
    with pytest.raises(protocol.ProtocolError, match=rf"exceeds MAX_MESSAGE_BYTES={len(frame)}"):
        protocol.decode(frame + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(frame):
    try:
        message = protocol.decode(frame)
    except protocol.ProtocolError:
        return
    assert isinstance(message, protocol.Message.__args__)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_frames_decode_or_fail_cleanly(message, data):
    frame = bytearray(protocol.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    try:
        decoded = protocol.decode(bytes(frame))
    except protocol.ProtocolError:
        return
    if isinstance(decoded, (protocol.Hello, protocol.LoadReport, protocol.Plan)):  # arrays are checked where used
        array = decoded.phy2log if not isinstance(decoded, protocol.LoadReport) else decoded.slot_load
        try:
            array.to_numpy()
        except protocol.ProtocolError:
            pass


def test_schema_file_is_current():
    assert SCHEMA_PATH.read_text() == render(), "proto/schema.json is stale: run `python -m eplb_service.schema`"


def test_no_pickle_in_the_package():
    import pathlib

    root = pathlib.Path(protocol.__file__).parent
    offenders = [
        str(p) for p in root.rglob("*.py") if "import pickle" in p.read_text() or "pickle.loads" in p.read_text()
    ]
    assert offenders == []


from eplb_service.testing.protocol_fuzz import HandlerHarness, check_frame, message_strategy, mutate  # noqa: E402


@settings(max_examples=400, deadline=None)
@given(message_strategy(), st.data())
def test_any_well_typed_message_round_trips_and_mutations_fail_cleanly(message, data):
    frame = protocol.encode(message)
    try:
        assert protocol.decode(frame) == message  # a value the type admits survives the trip exactly
    except protocol.ProtocolError as exc:  # or breaks a constraint (negative rank, NaN duration...), named
        assert "at `$." in str(exc) or "- at $" in str(exc), exc
    assert check_frame(frame) in ("accepted", "array_rejected", "rejected")
    assert check_frame(mutate(frame, data)) in ("accepted", "array_rejected", "rejected")


_HARNESS = None


@settings(max_examples=400, deadline=None)
@given(message_strategy(), st.sampled_from([b"rank-0", b"rank-1", b"stranger"]))
def test_coordinator_handlers_never_raise_on_any_message(message, identity):
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = HandlerHarness()
    _HARNESS.feed(message, identity)  # raising here is the failure


def test_every_message_is_sent_by_exactly_one_side():
    agents = set(protocol.AgentMessage.__args__) | {protocol.Hello, protocol.StatusRequest}
    coordinator = set(protocol.CoordinatorMessage.__args__)
    assert not agents & coordinator
    assert agents | coordinator == set(protocol.Message.__args__)


@pytest.mark.parametrize(
    "message",
    [m for m in SAMPLES if isinstance(m, protocol.CoordinatorMessage.__args__)],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("identity", [b"rank-0", b"stranger"])
def test_a_message_only_the_coordinator_sends_is_refused_as_such_not_as_a_stale_session(message, identity):
    harness = HandlerHarness()
    c = harness.coordinator
    sent: list = []
    c.send = lambda to, reply: sent.append((to, reply))  # type: ignore[method-assign]
    c._handle(identity, message)
    name = type(message).__name__
    assert [(to, type(r), r.code) for to, r in sent] == [(identity, protocol.Reject, "bad_message")], sent
    assert f"{name} is a message only the coordinator sends" in sent[0][1].reason
    assert c.metrics.messages_rejected.labels("coordinator_only")._value.get() == 1
    assert c.metrics.messages_rejected.labels("session")._value.get() == 0
    assert c.registry.agents[0].alive and c.registry.agents[0].identity == b"rank-0"  # the agent keeps its rank
