"""A rank whose heartbeats arrive but whose load reports stop: the window, and every plan, then
leaves its traffic out. Before, nothing said so; now the coordinator warns, naming the rank and steps."""

from __future__ import annotations

import logging
import time

import numpy as np
import zmq
from conftest import hello_message
from coordinator_thread import CoordinatorThread

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.router import LOAD_SILENCE_REPORTS


def wait_for_line(caplog, text: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}"
        time.sleep(0.02)


def test_a_rank_that_steps_on_without_load_reports_is_named_until_it_reports_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"rank-0-test")
    sock.connect(endpoint)
    try:
        sock.send(protocol.encode(hello_message(step=5)))
        assert sock.poll(5000)
        session = protocol.decode(sock.recv()).session
        limit = LOAD_SILENCE_REPORTS * protocol.AgentConfig().report_interval_steps
        for step in (5 + limit // 2, 5 + limit):  # within the limit: no line
            sock.send(protocol.encode(protocol.Heartbeat(rank=0, step=step, epoch=0, session=session)))
        time.sleep(0.3)
        assert not any("sent no load report" in r.getMessage() for r in caplog.records)
        step = 6 + limit
        sock.send(protocol.encode(protocol.Heartbeat(rank=0, step=step, epoch=0, session=session)))
        wait_for_line(caplog, f"rank 0 heartbeats at step {step} but sent no load report since step 5")
        load = protocol.NDArray.from_numpy(np.ones((2, 8), dtype=np.int64))
        report = protocol.LoadReport(
            rank=0, epoch=0, step_begin=step - 10, step_end=step, slot_load=load, session=session
        )
        sock.send(protocol.encode(report))
        wait_for_line(caplog, "rank 0 sends load reports again")
    finally:
        sock.close(linger=0)
        ctx.term()
        coord.stop()
