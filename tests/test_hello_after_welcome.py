"""An agent told to register again soon after a ``Welcome`` asks at once, whatever its ``Hello``
back-off had grown to before that ``Welcome``.

The back-off (``hello_interval_s`` doubling up to 5 s) spaces the ``Hello`` messages of an agent
the coordinator does not answer. A ``Welcome`` is an answer: the next ``Hello``, when the
coordinator asks for one (``Reject(unknown_agent)``: it restarted, declared the rank dead, or a
delayed ``Hello`` of the same process took the rank to a closed socket), is owed at once.
"""

from __future__ import annotations

import time

from conftest import make_model
from test_bad_input import FakeCoordinator

from eplb_service import protocol
from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport

HELLO_INTERVAL_S = 0.1
UNANSWERED = 5
"""Hellos left unanswered first: sent at 0, 0.1, 0.3, 0.7, 1.5 s, the next one due 3.2 s after the last."""


def test_a_hello_asked_for_right_after_a_late_welcome_goes_at_once(tmp_path):
    """Before: the next ``Hello`` waited for the back-off of the unanswered ones (due 1.6 s after
    the answered one here, up to 5 s with the default interval); the rank was unregistered meanwhile."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    fake = FakeCoordinator(endpoint)
    model = make_model(1, PlacementShape(2, 6, 8, 2))
    agent = WorkerAgent(model, endpoint, GlooTransport(), hello_interval_s=HELLO_INTERVAL_S).start()
    try:
        for _ in range(UNANSWERED):
            identity, _ = fake.recv(protocol.Hello)
        config = protocol.AgentConfig(heartbeat_interval_s=0.1)
        fake.send(
            identity, protocol.Welcome(protocol_version=protocol.PROTOCOL_VERSION, rank=1, config=config, session=7)
        )
        fake.recv(protocol.Heartbeat)
        asked_at = time.monotonic()
        fake.send(identity, protocol.Reject(reason="declared dead, send Hello again", code="unknown_agent"))
        _, hello = fake.recv(protocol.Hello, timeout_s=10.0)
        hello_after_s = time.monotonic() - asked_at
    finally:
        agent.stop()
        fake.close()
    print(f"the Hello asked for went {hello_after_s:.3f}s after the Reject")
    assert hello.resume_session == 7
    assert hello_after_s < 0.5, f"the Hello the coordinator asked for went {hello_after_s:.2f}s later"
