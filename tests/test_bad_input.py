"""Bad input at every edge: invalid plans reach neither side, Hello mismatches say both values,
oversize frames are refused by the socket, and the daemon keeps serving through all of it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq
from conftest import hello_message as hello
from conftest import make_model, rows_match_maps
from coordinator_thread import CoordinatorThread

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport

SHAPE = PlacementShape(2, 6, 8, 2)


class FakeCoordinator:
    """A bare ROUTER that speaks the protocol by hand, to feed a real agent bad plans."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(endpoint)

    def recv(self, kind, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                identity, frame = self.sock.recv_multipart()
                message = protocol.decode(frame)
                if isinstance(message, kind):
                    return identity, message
        raise AssertionError(f"no {kind.__name__} within {timeout_s}s")

    def send(self, identity: bytes, message) -> None:
        self.sock.send_multipart([identity, protocol.encode(message)])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def plan(rows, layers=(0,), epoch=0, plan_id=7) -> protocol.Plan:
    return protocol.Plan(
        plan_id=plan_id,
        base_epoch=epoch,
        layers=list(layers),
        phy2log=protocol.NDArray.from_numpy(np.asarray(rows, dtype=np.int64)),
    )


@pytest.mark.parametrize(
    "bad, expected",
    [
        (plan([[0, 1, 2, 3, 4, 4, 4, 4]]), "layer 0: logical expert 5 has no replica"),
        (plan([[0, 1, 2, 3, 4, 5, 9, 0]]), "layer 0: slot 6 holds expert 9, expected 0 <= expert < 6"),
        (plan([[0, 1, 2, 3, 4, 5]]), "phy2log shape (1, 6), expected (1, 8)"),
        (plan([[0, 1, 2, 3, 4, 5, 0, 1]], layers=(5,)), "layers [5] must be distinct and in [0, 2)"),
        # The first layer past the end: a check off by one let it through to an IndexError (an agent reset).
        (plan([[0, 1, 2, 3, 4, 5, 0, 1]], layers=(2,)), "layers [2] must be distinct and in [0, 2)"),
        # A negative layer: numpy would read -1 as the last layer, a plan for a layer no rank has.
        (plan([[0, 1, 2, 3, 4, 5, 0, 1]], layers=(-1,)), "layers [-1] must be distinct and in [0, 2)"),
        # One layer twice: its maps and rows would each be written twice, from different plan rows.
        (
            plan([[0, 1, 2, 3, 4, 5, 0, 1], [1, 0, 2, 3, 4, 5, 0, 1]], layers=(0, 0)),
            "layers [0, 0] must be distinct and in [0, 2)",
        ),
        (plan([[0, 1, 2, 3, 4, 5, 0, 1]], epoch=3), "is for epoch 3, this rank is at epoch 0"),
        # Before, float rows were truncated into the int64 placement and staged: 0.9 became expert 0.
        (
            protocol.Plan(
                plan_id=7,
                base_epoch=0,
                layers=[0],
                phy2log=protocol.NDArray.from_numpy(np.array([[0, 1, 2, 3, 4, 5, 0.9, 1]], dtype=np.float64)),
            ),
            "plan 7: phy2log has dtype float64, expected an integer dtype",
        ),
        (
            protocol.Plan(
                plan_id=7,
                base_epoch=0,
                layers=[0],
                phy2log=protocol.NDArray(dtype="int64", shape=(1, 8), data=b"\0" * 8),
            ),
            "plan.phy2log: shape (1, 8) of int64 needs 64 bytes, got 8",
        ),
    ],
)
def test_agent_refuses_invalid_plans_naming_the_problem_and_keeps_its_maps(tmp_path, bad, expected):
    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    model = make_model(0, SHAPE)
    before = model.phy2log.clone()
    agent = WorkerAgent(model, endpoint, GlooTransport()).start()
    try:
        identity, hello = fake.recv(protocol.Hello)
        assert hello.rank == 0
        fake.send(
            identity,
            protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=protocol.AgentConfig()),
        )
        fake.send(identity, bad)
        _, failed = fake.recv(protocol.Failed)
        assert failed.plan_id == 7 and expected in failed.reason, failed.reason
        assert agent.stats["plans_rejected"] == 1
    finally:
        agent.stop()
        fake.close()
    assert model.phy2log.equal(before) and rows_match_maps(model)


def test_agent_refuses_a_plan_over_its_staging_budget_naming_both_sizes(tmp_path):
    """``EPLB_SERVICE_STAGING_BUDGET_BYTES`` is the worker's own bound on staging memory: a plan
    cut to a larger coordinator budget (or forged) is refused before a byte is staged."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    model = make_model(0, SHAPE)
    before = model.phy2log.clone()
    agent = WorkerAgent(model, endpoint, GlooTransport(), staging_budget_bytes=model.bytes_per_expert).start()
    try:
        identity, _ = fake.recv(protocol.Hello)
        fake.send(
            identity,
            protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=protocol.AgentConfig()),
        )
        # rank 0 (slots 0-3) takes experts 4 and 5 from rank 1: two rows of staging
        fake.send(identity, plan([[4, 5, 2, 3, 0, 1, 0, 1]]))
        _, failed = fake.recv(protocol.Failed)
        assert failed.code == "invalid_plan", failed
        assert (
            f"needs {2 * model.bytes_per_expert} bytes of staging on rank 0, more than "
            f"EPLB_SERVICE_STAGING_BUDGET_BYTES={model.bytes_per_expert}" in failed.reason
        ), failed.reason
    finally:
        agent.stop()
        fake.close()
    assert model.phy2log.equal(before) and rows_match_maps(model)


_ASKED = iter(range(10**9))


def ask(endpoint: str, identity: bytes, message) -> protocol.Message:
    """One message on a fresh connection (a fresh identity too: a connection with an identity
    still in use is refused), and the reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.IDENTITY, identity + f"-{next(_ASKED)}".encode())
        sock.connect(endpoint)
        sock.send(protocol.encode(message))
        assert sock.poll(5000), "no reply"
        return protocol.decode(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


def test_hello_mismatches_are_refused_with_both_values(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    try:
        reply = ask(endpoint, b"rank-0", hello(protocol_version=99))
        assert (
            isinstance(reply, protocol.Reject)
            and f"protocol version 99 does not match the coordinator's {protocol.PROTOCOL_VERSION}" in reply.reason
        )
        reply = ask(
            endpoint,
            b"rank-0",
            hello(
                model=protocol.ModelShape(2, 6, 8, 4, 36),
                phy2log=protocol.NDArray.from_numpy(initial_phy2log(PlacementShape(2, 6, 8, 4))),
            ),
        )
        assert "agent reports 4 EP ranks, the coordinator was started for 2" in reply.reason
        assert isinstance(ask(endpoint, b"rank-0", hello()), protocol.Welcome)
        reply = ask(endpoint, b"rank-1", hello(rank=1, model=protocol.ModelShape(2, 6, 8, 2, 72)))
        assert (
            "model shape" in reply.reason
            and "bytes_per_expert=72" in reply.reason
            and "bytes_per_expert=36" in reply.reason
        )
        reply = ask(
            endpoint, b"rank-1", hello(rank=1, phy2log=protocol.NDArray.from_numpy(np.zeros((2, 8), dtype=np.int64)))
        )
        assert "invalid placement: layer 0: logical expert 1 has no replica" in reply.reason
        assert coord.coordinator.metrics.messages_rejected.labels("hello")._value.get() == 4
    finally:
        coord.stop()


def test_a_mispointed_deployment_is_one_log_line_per_mismatch_and_each_new_one_is_logged(tmp_path, caplog):
    """Refusals were throttled per (rank, code): a second deployment of 4 ranks with another
    world size wrote 4 ERROR lines of one cause, and a later, different mismatch on a rank
    already refused (another model, another protocol version) wrote none for up to a minute,
    so the log still blamed the first cause. The deployment that registered is untouched."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    caplog.set_level("WARNING")
    try:
        assert isinstance(ask(endpoint, b"rank-0", hello()), protocol.Welcome)
        assert isinstance(ask(endpoint, b"rank-1", hello(rank=1)), protocol.Welcome)
        phy2log = protocol.NDArray.from_numpy(initial_phy2log(PlacementShape(2, 6, 8, 4)))
        for rank in range(4):
            other = hello(rank=rank, model=protocol.ModelShape(2, 6, 8, 4, 36), phy2log=phy2log, pid=900 + rank)
            assert ask(endpoint, f"rank-{rank}".encode(), other).code == "refused"
        assert ask(endpoint, b"rank-1", hello(rank=1, model=protocol.ModelShape(2, 6, 8, 2, 72))).code == "refused"
        assert ask(endpoint, b"rank-1", hello(rank=1, protocol_version=2)).code == "refused"
        lines = [r.getMessage() for r in caplog.records if "refused rank" in r.getMessage()]
        registry = coord.coordinator.registry
        assert sorted(registry.agents) == [0, 1] and all(r.alive and r.pid == 0 for r in registry.agents.values())
    finally:
        coord.stop()
    assert len([line for line in lines if "agent reports 4 EP ranks" in line]) == 1, lines
    assert len([line for line in lines if "bytes_per_expert=72" in line]) == 1, lines
    own = f"protocol version 2 does not match the coordinator's {protocol.PROTOCOL_VERSION}"
    assert len([line for line in lines if own in line]) == 1, lines
    assert len(lines) == 3, lines


def test_a_second_deployment_of_the_same_shape_is_told_what_differs_from_the_rank_holder(tmp_path):
    """Same model, same world size, another deployment: nothing in its Hello is wrong, only its
    ranks are held. The refusal named the holder alone; now it names both processes (pid, node,
    step, epoch) and the two remedies, and the deployment that holds the ranks is untouched."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    try:
        for rank in (0, 1):
            assert isinstance(
                ask(endpoint, f"rank-{rank}".encode(), hello(rank=rank, pid=100 + rank)), protocol.Welcome
            )
        reply = ask(endpoint, b"rank-1", hello(rank=1, pid=4242, node="other-host"))
        registry = coord.coordinator.registry
        assert sorted(r.pid for r in registry.agents.values() if r.alive) == [100, 101]
    finally:
        coord.stop()
    assert isinstance(reply, protocol.Reject) and reply.code == "rank_taken", reply
    assert "held by a live agent (pid 101 on '', step 0, epoch 0" in reply.reason
    assert "this Hello is from pid 4242 on 'other-host', step 0, epoch 0" in reply.reason
    assert "another deployment, give it a coordinator of its own" in reply.reason


def test_ranks_that_never_register_are_named_in_the_log_and_the_status(tmp_path, caplog, monkeypatch):
    """Before: with 2 of 4 ranks registered for minutes, the log said nothing after the two
    registrations, and the status listed the missing ranks only row by row. Now a warning names
    them once the wait passes ``WAIT_BEFORE_WARNING_S`` (30 s; 0.3 s here), the status document
    has ``missing_ranks`` and the table says whom it waits for."""
    from eplb_service.coordinator import registration_watch
    from eplb_service.coordinator.status_client import format_status

    caplog.set_level("INFO")
    endpoint = f"ipc://{tmp_path}/c.sock"
    shape, model = PlacementShape(2, 6, 8, 4), protocol.ModelShape(2, 6, 8, 4, 36)
    phy2log = protocol.NDArray.from_numpy(initial_phy2log(shape))
    coord = CoordinatorThread(CoordinatorConfig(world_size=4, endpoint=endpoint)).start()
    try:
        for rank in (0, 2):
            reply = ask(endpoint, f"rank-{rank}".encode(), hello(rank=rank, model=model, phy2log=phy2log))
            assert isinstance(reply, protocol.Welcome), reply
        # Shortened once both are in (the watch reads it on every tick): set before, a second
        # registration later than 0.3 s (a GC pause) made a first warning name ranks 1-3.
        monkeypatch.setattr(registration_watch, "WAIT_BEFORE_WARNING_S", 0.3)
        deadline = time.monotonic() + 5
        while "waiting for ranks" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        status = fetch_status(endpoint)
    finally:
        coord.stop()
    assert "waiting for ranks 1, 3 to register: 2 of 4 EP ranks (--dp x --tp) registered" in caplog.text
    assert caplog.text.count("waiting for ranks") == 1, "said once, not on every tick"
    assert status["missing_ranks"] == [1, 3]
    assert "waiting for 2 of 4 ranks: 1, 3" in format_status(status)


def test_rank_spans_keep_a_long_list_of_missing_ranks_short():
    from eplb_service.coordinator.registration_watch import RegistrationWatch, rank_spans

    assert rank_spans([8, 0, 1, 2, 5, 7]) == "0-2, 5, 7-8" and rank_spans([3]) == "3" and rank_spans([]) == ""
    watch = RegistrationWatch(4)
    assert watch.tick(0.0, [0, 2]) is None and watch.tick(29.0, [0, 2]) is None
    first = watch.tick(31.0, [0, 2])
    assert first is not None and first[1] and "ranks 1, 3 " in first[0]
    assert watch.tick(40.0, [0, 2]) is None, "not again before the repeat interval"
    assert watch.tick(50.0, [0, 1, 2]) is None and "rank 3 " in watch.tick(62.0, [0, 1, 2])[0]
    assert watch.tick(70.0, [0, 1, 2, 3]) == ("every rank of 4 is registered, after waiting 70s", False)
    assert watch.tick(71.0, [0, 1, 2, 3]) is None


def test_a_refused_agent_asks_again_slowly_and_joins_once_the_coordinator_accepts_it(tmp_path):
    """A refusal (wrong --dp, version, shape) is something the operator fixes on the coordinator;
    the agent used to stay idle until its vLLM worker restarted. Now it asks again every
    ``refused_retry_s`` (not sooner, even across socket reopens) and joins when welcomed."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    agent = WorkerAgent(make_model(0, SHAPE), endpoint, GlooTransport(), refused_retry_s=2.0).start()
    try:
        identity, _ = fake.recv(protocol.Hello)
        fake.send(
            identity,
            protocol.Reject(reason="agent reports 2 EP ranks, the coordinator was started for 1", code="refused"),
        )
        refused_at = time.monotonic()
        with pytest.raises(AssertionError, match="no Hello"):
            fake.recv(protocol.Hello, timeout_s=1.2)  # not sooner than the retry interval
        identity, again = fake.recv(protocol.Hello, timeout_s=5.0)
        assert time.monotonic() - refused_at >= 1.9
        assert again.rank == 0 and agent.stats["refused"] == 1
        fake.send(
            identity,
            protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=0, config=protocol.AgentConfig()),
        )
        deadline = time.monotonic() + 5
        while not agent.welcomed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.welcomed and agent._refused_reason is None
        fake.recv(protocol.Heartbeat)  # registered: it heartbeats like any welcomed agent
    finally:
        agent.stop()
        fake.close()


def test_agents_refused_by_a_coordinator_with_the_wrong_dp_join_its_corrected_restart(tmp_path):
    """The operator's fix for "the coordinator was started for 1": restart it with --dp 2. The
    running agents (vLLM not restarted) must join the new one."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    wrong = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=endpoint)).start()
    agents = [WorkerAgent(make_model(r, SHAPE), endpoint, GlooTransport(), refused_retry_s=1.0).start() for r in (0, 1)]
    right = None
    try:
        deadline = time.monotonic() + 20
        while not all(a.stats["refused"] >= 1 for a in agents):
            assert time.monotonic() < deadline, [dict(a.stats) for a in agents]
            time.sleep(0.05)
        assert not any(a.welcomed for a in agents) and not wrong.coordinator.registry.agents
        wrong.stop()
        right = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
        deadline = time.monotonic() + 30
        while not (all(a.welcomed for a in agents) and sorted(right.coordinator.registry.agents) == [0, 1]):
            assert time.monotonic() < deadline, (
                [a.welcomed for a in agents],
                sorted(right.coordinator.registry.agents),
            )
            time.sleep(0.05)
    finally:
        for a in agents:
            a.stop()
        if right is not None:
            right.stop()
        wrong.stop()


def test_a_coordinator_without_dp_tells_every_rank_of_a_larger_deployment_both_sizes(tmp_path):
    """``--dp`` defaults to 1: against 4 ranks, rank 0 heard both sizes, but ranks 1..3 only
    "rank 3 outside [0, 1)", which does not say the coordinator was started for the wrong size."""
    from eplb_service.coordinator.cli import config_from_args, parse_command_line

    endpoint = f"ipc://{tmp_path}/c.sock"
    cfg = config_from_args(parse_command_line(["serve", "--endpoint", endpoint]))
    assert cfg.world_size == 1  # no --dp, no --tp
    shape = PlacementShape(2, 6, 8, 4)
    model = protocol.ModelShape(2, 6, 8, 4, 36)
    coord = CoordinatorThread(cfg).start()
    try:
        phy2log = protocol.NDArray.from_numpy(initial_phy2log(shape))
        replies = [ask(endpoint, f"rank-{r}".encode(), hello(rank=r, model=model, phy2log=phy2log)) for r in range(4)]
    finally:
        coord.stop()
    for reply in replies:
        assert isinstance(reply, protocol.Reject) and reply.code == "refused", reply
        assert "agent reports 4 EP ranks, the coordinator was started for 1 (--dp x --tp)" in reply.reason
        assert "--dp x --tp = 4" in reply.reason


def test_oversize_and_garbage_frames_do_not_disturb_the_coordinator(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 1 << 20)  # the socket limit is read when the coordinator binds
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    ctx = zmq.Context()
    try:
        big = ctx.socket(zmq.DEALER)
        big.connect(endpoint)
        big.send(b"\x00" * (2 << 20))  # over the limit: ZeroMQ drops the connection, nothing is decoded
        garbage = ctx.socket(zmq.DEALER)
        garbage.connect(endpoint)
        garbage.send(b"\xc1 not msgpack")
        assert garbage.poll(5000)
        reply = protocol.decode(garbage.recv())
        assert isinstance(reply, protocol.Reject) and "undecodable frame" in reply.reason
        time.sleep(0.2)
        assert fetch_status(endpoint)["world_size"] == 2  # still serving
        assert coord.coordinator.metrics.messages_rejected.labels("decode")._value.get() == 1
        for s in (big, garbage):
            s.close(0)
    finally:
        ctx.term()
        coord.stop()


def test_a_req_client_and_a_multipart_sender_get_an_answer_not_silence(tmp_path):
    """A third-party status client written with a REQ socket (ZeroMQ's request/reply socket)
    sends ``[b"", message]``, which the coordinator dropped as bad framing without a word: the
    client's ``recv`` waited forever. A REQ client now gets its one reply in its envelope (the
    status, or a ``Reject`` saying why); any other multipart message gets a ``Reject`` naming
    the frame count."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    ctx = zmq.Context()
    sockets = []

    def connect(kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    def reply_to(sock: zmq.Socket) -> list[bytes]:
        assert sock.poll(5000), "no answer"
        return sock.recv_multipart()

    try:
        req = connect(zmq.REQ)
        req.send(protocol.encode(protocol.StatusRequest()))
        (status,) = reply_to(req)
        reply = protocol.decode(status)
        assert isinstance(reply, protocol.StatusReply) and json.loads(reply.status_json)["world_size"] == 2
        req.send(protocol.encode(hello()))  # a REQ socket answers once per request: no agent can use one
        refused = protocol.decode(reply_to(req)[0])
        assert isinstance(refused, protocol.Reject) and "REQ" in refused.reason and "DEALER" in refused.reason
        req.send(b"\xc1 not msgpack")
        undecodable = protocol.decode(reply_to(req)[0])
        assert isinstance(undecodable, protocol.Reject) and "undecodable frame" in undecodable.reason

        dealer = connect(zmq.DEALER)  # a DEALER speaking REQ's envelope gets the envelope back
        dealer.send_multipart([b"", protocol.encode(protocol.StatusRequest())])
        empty, status = reply_to(dealer)
        assert empty == b"" and isinstance(protocol.decode(status), protocol.StatusReply)

        multipart = connect(zmq.DEALER)
        multipart.send_multipart([protocol.encode(protocol.StatusRequest())] * 2)
        (frame,) = reply_to(multipart)
        framing = protocol.decode(frame)
        assert isinstance(framing, protocol.Reject) and "2 frames" in framing.reason, framing
        assert coord.coordinator.metrics.messages_rejected.labels("framing")._value.get() == 2
        assert fetch_status(endpoint)["world_size"] == 2  # still serving
    finally:
        for sock in sockets:
            sock.close(0)
        ctx.term()
        coord.stop()


def test_ranks_at_different_epochs_register_and_planning_waits_for_them(tmp_path):
    """After a restart between a decided vote and its commit step, ranks report two epochs."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    try:
        newer = initial_phy2log(SHAPE)
        newer[0, :2] = newer[0, 1::-1]
        assert isinstance(
            ask(endpoint, b"rank-0", hello(epoch=4, phy2log=protocol.NDArray.from_numpy(newer))), protocol.Welcome
        )
        reply = ask(
            endpoint,
            b"rank-1",
            hello(rank=1, epoch=4, pid=99, phy2log=protocol.NDArray.from_numpy(initial_phy2log(SHAPE))),
        )
        assert isinstance(reply, protocol.Reject) and "differs from the other ranks' placement" in reply.reason
        assert isinstance(ask(endpoint, b"rank-1", hello(rank=1, epoch=3)), protocol.Welcome)
        c = coord.coordinator
        # the epoch is the one every rank reports: none yet, both placements known
        assert c.epoch == -1 and np.array_equal(c.placements[4], newer) and 3 in c.placements
        assert not c._should_plan(), "no plan while the ranks disagree on the epoch"
    finally:
        coord.stop()


def test_rank_0_whose_store_port_is_taken_registers_once_the_port_is_free(tmp_path, monkeypatch):
    """A fixed ``EPLB_SERVICE_STORE_PORT`` still held by another process (a previous worker shutting
    down): rank 0 used to stay unregistered until its vLLM worker restarted, so nothing rebalanced."""
    import socket

    from eplb_service.worker_agent import rendezvous

    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setenv(rendezvous.STORE_PORT_ENV, str(port))
    monkeypatch.setattr(rendezvous, "_HOSTED", None)
    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    agent = WorkerAgent(make_model(0, SHAPE), endpoint, GlooTransport(), refused_retry_s=1.0).start()
    try:
        with pytest.raises(AssertionError, match="no Hello"):
            fake.recv(protocol.Hello, timeout_s=1.5)  # no store, no Hello: it would name none
        assert agent.stats["store_host_failed"] >= 1
        holder.close()
        _, hello_msg = fake.recv(protocol.Hello, timeout_s=5.0)
        assert hello_msg.rank == 0 and hello_msg.store_port == port
    finally:
        agent.stop()
        fake.close()
        holder.close()
