"""The wire protocol as written is enough: agents built from ``proto/PROTOCOL.md`` alone
(``tests/independent_agent.py``, which imports nothing of ``eplb_service``) register with a real
coordinator, report load and heartbeats with step-clock probes, and take a plan through
staging, the vote and the commit; a malformed frame gets a Reject that names what was wrong.

The coordinator's state is read only through the protocol (``StatusRequest``), as an
independent client would.
"""

from __future__ import annotations

import json
import threading
import time

import msgspec
import numpy as np
import pytest
from coordinator_thread import CoordinatorThread
from independent_agent import PROTOCOL_VERSION, IndependentAgent, KeyStore, ask, encode

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig

LAYERS, EXPERTS, RANKS = 2, 8, 2
STEP_S = 0.005
"""One serving step: 32 steps (one step-clock probe) in 0.16 s."""
FENCE_STEPS = 200
"""The ranks learn the decision within a few ms; 1 s of margin keeps a loaded machine from
ever reaching the fence (which would still be correct, but pause these ranks' clocks)."""


def status(endpoint: str) -> dict:
    reply = ask(endpoint, encode("StatusRequest"))
    assert reply["type"] == "StatusReply", reply
    return json.loads(reply["status_json"])


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.02)


def config(tmp_path) -> CoordinatorConfig:
    return CoordinatorConfig(
        world_size=RANKS,
        endpoint=f"ipc://{tmp_path}/c.sock",
        min_window_steps=20,
        rebalance_interval_steps=40,
        load_half_life_steps=50.0,
        agent=protocol.AgentConfig(report_interval_steps=5, heartbeat_interval_s=0.05, fence_steps=FENCE_STEPS),
    )


@pytest.fixture
def endpoint(tmp_path):
    """A coordinator with no agents."""
    coordinator = CoordinatorThread(config(tmp_path)).start()
    yield coordinator.cfg.endpoint
    coordinator.stop()


@pytest.fixture
def deployment(tmp_path):
    cfg = config(tmp_path)
    coordinator = CoordinatorThread(cfg).start()
    store = KeyStore()
    # Experts 0-3 (all on rank 0) take almost every token: balancedness ~0.5 until a plan spreads them.
    load = np.tile(np.where(np.arange(EXPERTS) < 4, 100.0, 1.0), (LAYERS, 1))
    t0 = time.monotonic()
    agents = [
        IndependentAgent(
            endpoint=cfg.endpoint,
            rank=rank,
            world_size=RANKS,
            logical_load=load,
            phy2log=np.tile(np.arange(EXPERTS, dtype=np.int64), (LAYERS, 1)),
            t0=t0,
            step_s=STEP_S,
            store=store if rank == 0 else None,
        )
        for rank in range(RANKS)
    ]
    threads = [threading.Thread(target=agent.run, name=f"independent-{agent.rank}") for agent in agents]
    for thread in threads:
        thread.start()
    yield cfg.endpoint, agents
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(5)
    coordinator.stop()
    store.close()


def test_the_documented_protocol_version_is_the_code_s():
    assert PROTOCOL_VERSION == protocol.PROTOCOL_VERSION, "proto/PROTOCOL.md's version is out of date"


def test_independent_agents_register_report_and_commit_a_plan(deployment):
    endpoint, agents = deployment
    wait_for(lambda: all(a.committed for a in agents), 8.0, "a plan committed on every independent agent")
    first = [a.committed[0] for a in agents]
    assert first[0] == first[1], f"the ranks applied different decisions: {first}"
    plan_id, commit_step, epoch = first[0]
    assert epoch == 1
    wait_for(lambda: status(endpoint)["plans"]["committed"] >= 1, 3.0, "the coordinator to book the commit")
    doc = status(endpoint)
    assert doc["halted"] is None, doc["halted"]
    assert doc["epoch"] >= 1 and doc["load_reports"] > 0
    assert doc["last_plans"][0]["plan_id"] == plan_id and doc["last_plans"][0]["commit_step"] == commit_step
    assert {r["rank"]: r["step_clock_offset"] for r in doc["ranks"]} == {0: 0, 1: 0}, "the probes were understood"
    for agent in agents:
        assert agent.rejects == [], agent.rejects
        assert agent.seen["Welcome"] >= 1 and agent.seen["CommInit"] >= 1 and agent.seen["Plan"] >= 1
        assert agent.seen["VoteNow"] >= 1 and agent.seen["HeartbeatAck"] > 0
        assert (agent.phy2log == agents[0].phy2log).all()
    # the plan spread the hot experts 0-3 over both ranks
    assert (agents[0].phy2log[:, :4] < 4).sum() < agents[0].phy2log[:, :4].size


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            encode(
                "Heartbeat",
                rank=0,
                step=64,
                epoch=0,
                clock={"probe_steps": [32], "times": [[0.0] * 7], "radius": 4, "wall_minus_mono": 0.0},
            ),
            "- at `$.clock.radius`",
        ),
        (
            encode(
                "Heartbeat",
                rank=0,
                step=64,
                epoch=0,
                clock={"probe_steps": [32, 64], "times": [[0.0] * 7], "radius": 3, "wall_minus_mono": 0.0},
            ),
            "one row of times per probe step (2), got 1 rows - at `$.clock.times`",
        ),
        (json.dumps({"type": "StatusRequest"}).encode(), "the frame is JSON text; messages are msgpack"),
        (encode("Heartbeat", rank=0, step=1, epoch=0, session=5), "unknown agent"),
        (msgspec.msgpack.encode({"type": "Pickle"}), "Invalid value 'Pickle' - at `$.type`"),
    ],
    ids=["bad_radius", "rows_vs_probes", "json", "unregistered", "unknown_type"],
)
def test_a_malformed_or_out_of_order_frame_gets_a_reject_naming_what_was_wrong(endpoint, frame, expected):
    reply = ask(endpoint, frame, identity=b"rank-0-stranger")
    assert reply["type"] == "Reject" and expected in reply["reason"], reply
    assert reply["code"] == ("unknown_agent" if expected == "unknown agent" else "bad_message")


@pytest.mark.parametrize(
    ("version", "change"),
    [(PROTOCOL_VERSION + 1, {"a_newer_field": "a field of a newer Hello"}), (3, {}), (2, {}), (1, {"drop": "step"})],
    ids=["newer_with_a_new_field", "previous_without_deployment", "older", "older_without_a_field"],
)
def test_a_hello_of_another_protocol_version_is_refused_naming_both_versions(endpoint, version, change):
    """Before: a Hello that was not shaped like this version's (a newer one with a field added,
    an older one without one) got ``bad_message`` "unknown field" / "missing required field",
    naming no version, and an agent does not ask again after ``bad_message``. Now every Hello of
    another version gets ``refused`` naming both, as PROTOCOL.md says."""
    phy2log = np.tile(np.arange(EXPERTS, dtype=np.int64), (LAYERS, 1))
    fields = {
        "protocol_version": version,
        "rank": 1,
        "model": {
            "num_layers": LAYERS,
            "num_logical": EXPERTS,
            "num_physical": EXPERTS,
            "num_ranks": RANKS,
            "bytes_per_expert": 64,
        },
        "phy2log": {"dtype": "int64", "shape": [LAYERS, EXPERTS], "data": phy2log.tobytes()},
        "epoch": 0,
        "step": 0,
        "transport": "none",
    }
    fields.pop(change.pop("drop", ""), None)
    reply = ask(endpoint, encode("Hello", **fields, **change), identity=b"rank-1-other-version")
    assert reply["type"] == "Reject" and reply["code"] == "refused", reply
    assert f"protocol version {version} does not match the coordinator's {PROTOCOL_VERSION}" in reply["reason"]
    same = ask(endpoint, encode("Hello", **{**fields, "protocol_version": PROTOCOL_VERSION}, extra=1))
    assert same["code"] == "bad_message" and "unknown field `extra`" in same["reason"], "this version: named as is"
