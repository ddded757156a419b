"""fetch_status: a timeout that always ends, and a timeout message that says when CURVE keys may be missing."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import zmq
from conftest import free_port

from eplb_service.coordinator.status_client import NoCoordinatorSocket, fetch_status
from eplb_service.security import CLIENT_CERT_ENV, SERVER_CERT_ENV, generate_keys


@pytest.fixture
def no_curve_env(monkeypatch):
    monkeypatch.delenv(SERVER_CERT_ENV, raising=False)
    monkeypatch.delenv(CLIENT_CERT_ENV, raising=False)


@pytest.mark.parametrize("timeout_s", [0, 0.0, math.nan, math.inf, "3", True])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(tmp_path, timeout_s):
    with pytest.raises(ValueError, match=f"positive finite number of seconds, got {timeout_s!r}"):
        fetch_status(f"ipc://{tmp_path}/none.sock", timeout_s=timeout_s)


@pytest.mark.parametrize("timeout_s", ["-1", "-0.5", "-inf"])
def test_a_negative_timeout_is_refused_instead_of_waiting_forever(tmp_path, timeout_s):
    """Before: ZeroMQ's poll(-1000) waited for an answer that never came. In a child, so a hang fails the test."""
    code = (
        "from eplb_service.coordinator.status_client import fetch_status\n"
        f"fetch_status('ipc://{tmp_path}/none.sock', timeout_s=float('{timeout_s}'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"ValueError: status timeout must be a positive finite number of seconds, got {float(timeout_s)!r}" in (
        out.stderr
    )


@pytest.fixture
def silent_endpoint(tmp_path):
    """An ``ipc://`` socket that takes connections and never answers (a hung coordinator)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/silent.sock"
    sock.bind(endpoint)
    yield endpoint
    sock.close(linger=0)
    ctx.term()


def test_no_answer_ends_after_the_timeout(silent_endpoint, no_curve_env):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as silent:
        fetch_status(silent_endpoint, timeout_s=0.4)
    waited = time.monotonic() - start
    assert 0.4 <= waited < 5, waited
    assert str(silent.value) == f"no answer from a coordinator at {silent_endpoint} within 0.4s"


def test_no_socket_file_fails_at_once_naming_the_path(tmp_path, no_curve_env):
    """Before: the client connected to the missing path (ZeroMQ says nothing and retries) and
    waited out the whole timeout to say "no answer"."""
    start = time.monotonic()
    with pytest.raises(NoCoordinatorSocket) as missing:
        fetch_status(f"ipc://{tmp_path}/none.sock", timeout_s=30)
    assert time.monotonic() - start < 2
    assert str(missing.value) == (
        f"no coordinator at ipc://{tmp_path}/none.sock: there is no socket file {tmp_path}/none.sock "
        "(not started yet, stopped, or started with another --endpoint)"
    )
    assert isinstance(missing.value, TimeoutError)  # callers waiting for a coordinator to come up keep waiting


def test_a_timeout_under_a_millisecond_still_waits_and_ends(silent_endpoint):
    with pytest.raises(TimeoutError, match="within 0.0001s"):
        fetch_status(silent_endpoint, timeout_s=0.0001)


def test_silence_on_loopback_tcp_without_keys_names_the_key_variables(no_curve_env):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError) as silent:
        fetch_status(endpoint, timeout_s=0.3)
    message = str(silent.value)
    assert message.startswith(f"no answer from a coordinator at {endpoint} within 0.3s; if the coordinator uses CURVE")
    assert SERVER_CERT_ENV in message and CLIENT_CERT_ENV in message


def test_silence_on_remote_tcp_without_keys_says_curve_is_expected_there(no_curve_env):
    with pytest.raises(TimeoutError) as silent:
        fetch_status("tcp://192.0.2.1:5555", timeout_s=0.3)  # TEST-NET-1: nobody answers
    message = str(silent.value)
    assert "on a non-loopback tcp:// endpoint uses CURVE keys (--curve-dir) unless started with --insecure" in message
    assert SERVER_CERT_ENV in message and CLIENT_CERT_ENV in message


def test_silence_with_keys_from_the_environment_says_they_may_not_match(tmp_path, monkeypatch):
    keys = generate_keys(str(tmp_path / "keys"))
    monkeypatch.setenv(SERVER_CERT_ENV, keys["server_public"])
    monkeypatch.setenv(CLIENT_CERT_ENV, keys["agent_secret"])
    with pytest.raises(TimeoutError) as silent:
        fetch_status(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)
    assert f"do not match the ones from {SERVER_CERT_ENV} / {CLIENT_CERT_ENV}" in str(silent.value)


def strict_json(text: str):
    """Parse as JavaScript's ``JSON.parse`` or Go's ``encoding/json`` would: ``NaN``/``Infinity`` are errors."""
    import json

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_status_is_strict_json_everywhere_a_client_reads_it(tmp_path, no_curve_env):
    """Before: a number that was not finite went out as a bare ``NaN``/``Infinity`` token on
    ``/status``, in the ``StatusReply`` and from ``status --json``, which strict parsers refuse."""
    import json
    import urllib.request

    import numpy as np
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.status_client import format_status

    cfg = CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", metrics_port=0, http_host="127.0.0.1")
    thread = CoordinatorThread(cfg).start()
    coordinator = thread.coordinator
    # what the document holds when a value is not finite: every path out must still be strict JSON
    coordinator.plans.last_persistence = math.nan
    coordinator.book.balancedness = lambda: (math.inf, np.array([0.25, 0.75]))
    try:
        while coordinator.metrics_port is None:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{coordinator.metrics_port}/status"
        http_doc = strict_json(urllib.request.urlopen(url, timeout=10).read().decode())
        zmq_doc = fetch_status(cfg.endpoint, timeout_s=5)
        cli = subprocess.run(
            [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", cfg.endpoint, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        table = subprocess.run(
            [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", cfg.endpoint],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        thread.stop()
    assert cli.returncode == 0, cli.stderr
    cli_doc = strict_json(cli.stdout)
    strict_json(json.dumps(zmq_doc, allow_nan=False))  # what the coordinator sent parsed without NaN too
    for doc in (http_doc, zmq_doc, cli_doc):
        assert doc["load_persistence"] is None
        assert doc["balancedness"] == {"model": None, "layer_min": 0.25, "layer_mean": 0.5, "layer_max": 0.75}
    assert table.returncode == 0, table.stderr
    assert "balancedness: model n/a  per layer min 0.250 mean 0.500 max 0.750" in table.stdout
    assert "balancedness: model n/a" in format_status(zmq_doc)


def document_with(**changes: object) -> dict:
    """A fresh 4-rank coordinator's status document as it leaves the process, with ``changes``:
    the table is checked against the document the coordinator really writes, not a hand copy."""
    import json

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.server import Coordinator
    from eplb_service.coordinator.status_doc import status_json

    coordinator = Coordinator(CoordinatorConfig(world_size=4, endpoint="ipc:///nonexistent/table.sock"))
    try:
        document = json.loads(status_json(coordinator.status()))
    finally:
        coordinator.plans.close()
    document.update(changes)
    return document


def rank_row(rank: int, offset: int | None) -> dict:
    return {
        "rank": rank,
        "alive": True,
        "node": "n",
        "pid": 70 + rank,
        "last_seen_s": 0.5,
        "step": 120,
        "load_reported_to_step": 100,
        "epoch": 3,
        "comm_generation": 1,
        "internal_errors": 0,
        "step_clock_offset": offset,
    }


def outcome(number: int) -> dict:
    return {
        "plan_id": 9000 + number,
        "phase": "committed",
        "reason": "",
        "number": number,
        "code": "",
        "layers": [0],
        "bytes_moved": 0,
        "experts_moved": 2,
        "commit_step": 100 * number,
        "staging_s": 0.1,
        "voting_s": 0.01,
        "max_stall_s": 0.0,
    }


def test_the_table_shows_each_ranks_clock_the_newest_plans_and_mib():
    """The clock column says ``ok`` only for offset 0 (a rank behind is ``-2``, not ``ok``), the last
    five plans listed are the newest, and bytes moved are MiB (2**20), as the column says."""
    from eplb_service.coordinator.status_client import format_status

    doc = document_with(
        ranks=[rank_row(0, 0), rank_row(1, -2), rank_row(2, 3), rank_row(3, None)],
        missing_ranks=[],
        bytes_moved=3 * 2**20,
        last_plans=[outcome(n) for n in range(1, 9)],
    )
    table = format_status(doc)
    rows = {line.split()[-1]: line.split() for line in table.splitlines() if line.split()[-1:] and "/7" in line}
    assert [rows[f"n/{70 + r}"][6] for r in range(4)] == ["ok", "-2", "+3", "?"], table
    assert [line.split()[1] for line in table.splitlines() if line.startswith("  plan #")] == [
        "#4:",
        "#5:",
        "#6:",
        "#7:",
        "#8:",
    ], table
    assert "moved 0 experts, 3.0 MiB" in table, table
    assert "waiting for" not in table


def test_the_table_names_a_single_missing_rank():
    """One rank missing of four is the case an operator meets most (one worker restarting)."""
    from eplb_service.coordinator.status_client import format_status

    doc = document_with(ranks=[rank_row(0, 0), rank_row(1, 0), rank_row(2, 0), None], missing_ranks=[3])
    table = format_status(doc)
    assert "waiting for 1 of 4 ranks: 3 (no plan starts until every rank is registered)" in table, table
    assert "   3  -      (not registered)" in table, table
