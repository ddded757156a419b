"""The agent's link to the coordinator (``worker_agent.link``): identities and ``last_heard``, which
the agent's silence check reads; a real ROUTER stands in for the coordinator."""

from __future__ import annotations

import collections
import logging
import time

import zmq

from eplb_service import protocol
from eplb_service.worker_agent.link import CoordinatorLink


def test_every_open_is_a_new_identity_heard_from_now_and_every_frame_refreshes_last_heard(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    link = CoordinatorLink(1, endpoint, None, collections.Counter(), logging.LoggerAdapter(logging.getLogger("t"), {}))
    try:
        identities = []
        for _ in range(2):
            before = time.monotonic()
            link.open()
            assert link.last_heard >= before, "a fresh socket must not inherit the old one's silence"
            identities.append(link.sock.getsockopt(zmq.IDENTITY))
        assert identities[0] != identities[1] and all(i.startswith(b"rank-1-") for i in identities), identities
        link.send(protocol.Goodbye(rank=1, reason="test", session=3))
        assert router.poll(5000)
        identity, _ = router.recv_multipart()
        assert identity == identities[1]
        link.last_heard = 0.0
        before = time.monotonic()
        router.send_multipart([identity, protocol.encode(protocol.HeartbeatAck(session=3))])
        deadline = time.monotonic() + 5
        received: list = []
        while not received and time.monotonic() < deadline:
            received = link.receive(50)
        assert received == [protocol.HeartbeatAck(session=3)]
        assert link.last_heard >= before
    finally:
        link.close()
        router.close(linger=0)
        ctx.term()
