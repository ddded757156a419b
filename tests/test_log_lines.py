"""``--log-format json`` as a log pipeline reads it: every stderr line one strict JSON object with a tag.

Before: a simulated rank ignored the coordinator's ``--log-format`` (its lines were text) and
crashed on a lower-case ``EPLB_SERVICE_LOG_LEVEL`` (documented as any case); Python warnings and
uncaught exceptions reached stderr as bare text; lines of loggers other than the tagged ones
(the simulation's, a library's) had ``"tag": null``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def json_lines(stderr: str) -> list[dict]:
    """Every line as strict JSON (``NaN`` refused, as a JavaScript or Go consumer would)."""

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    docs = []
    for line in stderr.splitlines():
        try:
            docs.append(json.loads(line, parse_constant=refuse))
        except ValueError as exc:
            raise AssertionError(f"not a JSON line ({exc}): {line!r}\nstderr:\n{stderr}") from None
    return docs


def test_warnings_and_uncaught_exceptions_are_json_lines_with_the_process_tag():
    code = textwrap.dedent(
        """
        import logging, threading, warnings
        from eplb_service import logutil

        logutil.configure("INFO", "json", tag="coordinator")
        logging.getLogger("some.library").warning("a library's line")
        logutil.rank_logger("eplb_service.x", 3).info("an agent's line")
        warnings.warn("something deprecated", DeprecationWarning)
        thread = threading.Thread(target=lambda: 1 / 0, name="worker")
        thread.start()
        thread.join()
        raise RuntimeError("the end")
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EPLB_SERVICE_LOG_FORMAT": ""},
    )
    assert out.returncode == 1
    lines = json_lines(out.stderr)
    by_msg = {doc["msg"]: doc for doc in lines}
    assert by_msg["a library's line"]["tag"] == "coordinator"
    assert by_msg["[rank 3] an agent's line"]["tag"] == "rank 3"
    (warned,) = [doc for doc in lines if "something deprecated" in doc["msg"]]
    assert warned["logger"] == "py.warnings" and warned["tag"] == "coordinator"
    thread_error = by_msg["uncaught ZeroDivisionError in thread worker: division by zero"]
    assert thread_error["level"] == "CRITICAL" and "in <lambda>\nZeroDivisionError" in thread_error["exc"]
    main_error = by_msg["uncaught RuntimeError: the end"]
    assert main_error["tag"] == "coordinator" and main_error["exc"].endswith("RuntimeError: the end")
    assert len(lines) == 5


def test_simulated_ranks_log_json_lines_tagged_with_their_rank():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eplb_service.coordinator.cli",
            "--dp",
            "2",
            "--simulate",
            "--steps",
            "120",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EPLB_SERVICE_LOG_LEVEL": "info", "EPLB_SERVICE_LOG_FORMAT": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = json_lines(out.stderr)
    tags = {doc["tag"] for doc in lines}
    assert {"coordinator", "rank 0", "rank 1"} <= tags and None not in tags, tags
    assert any(doc["tag"] == "rank 1" and "welcomed by the coordinator" in doc["msg"] for doc in lines)
    assert any(doc["logger"] == "eplb_service.sim.deployment" and doc["tag"] == "coordinator" for doc in lines)
