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
    out = run_logging(MIXED_SOURCES, "json", tag="coordinator")
    assert out.returncode == 1
    lines = json_lines(out.stderr)
    by_msg = {doc["msg"]: doc for doc in lines}
    assert by_msg["a library's line"]["tag"] == "coordinator"
    assert by_msg["an agent's line"]["tag"] == "rank 3"  # the tag is in "tag", not repeated in "msg"
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


MIXED_SOURCES = """
logging.getLogger("zmq.auth").warning("a library's line")
logutil.rank_logger("eplb_service.x", 3).info("an agent's line")
warnings.warn("something deprecated", DeprecationWarning)
thread = threading.Thread(target=lambda: 1 / 0, name="worker")
thread.start()
thread.join()
raise RuntimeError("the end")
"""
"""Lines from every source a process has: a library's logger, a tagged rank logger, a warning,
an uncaught exception in a thread and in the main thread."""


def run_logging(code: str, fmt: str, tag: str = "rank 5") -> subprocess.CompletedProcess:
    """``code`` after ``logutil.configure("INFO", fmt, tag=tag)``, in a fresh interpreter."""
    preamble = "import logging, threading, warnings\nfrom eplb_service import logutil\n"
    preamble += f"logutil.configure('INFO', {fmt!r}, tag={tag!r})\n"
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", preamble + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EPLB_SERVICE_LOG_FORMAT": "", "EPLB_SERVICE_LOG_LEVEL": ""},
    )


def test_every_text_line_carries_the_tag_other_loggers_warnings_and_uncaught_exceptions_too():
    """Before: in text format only lines logged through a RankAdapter named their rank; a library's
    line, a warning and an uncaught exception (a bare traceback) did not."""
    out = run_logging(MIXED_SOURCES, "text")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    untagged = [line for line in lines if "[rank 5] " not in line and "[rank 3] " not in line]
    assert not untagged, out.stderr
    assert any(line.endswith("zmq.auth: [rank 5] a library's line") for line in lines), out.stderr
    assert any(line.endswith("eplb_service.x: [rank 3] an agent's line") for line in lines), out.stderr
    assert any("py.warnings: [rank 5] " in line and "something deprecated" in line for line in lines)
    assert any("[rank 5] uncaught ZeroDivisionError in thread worker: division by zero" in line for line in lines)
    assert "[rank 5] uncaught RuntimeError: the end" in out.stderr
    assert lines[-1] == "[rank 5] RuntimeError: the end", "the traceback's own lines carry the tag too"


def test_a_log_call_that_cannot_be_formatted_gives_one_tagged_line():
    """Before: ``log.info("%d steps", "x")`` printed logging's "--- Logging error ---" traceback
    (a dozen untagged lines) and the line itself was lost."""
    code = """
        logutil.rank_logger("eplb_service.x", 2).info("%d steps", "many")
        logging.getLogger("lib").warning("%s and %s", "one")
        logging.getLogger("lib").info("after")
        """
    text = run_logging(code, "text")
    assert text.returncode == 0 and "Logging error" not in text.stderr and "Traceback" not in text.stderr
    lines = text.stderr.splitlines()
    assert len(lines) == 3, text.stderr
    assert "[rank 2] unformattable log call at <string>:" in lines[0] and "%d steps'" in lines[0]
    assert "('many',)" in lines[0] and "TypeError" in lines[0]
    assert "lib: [rank 5] unformattable log call" in lines[1] and "'%s and %s'" in lines[1]
    assert lines[2].endswith("lib: [rank 5] after")
    docs = json_lines(run_logging(code, "json").stderr)
    assert len(docs) == 3 and [d["tag"] for d in docs] == ["rank 2", "rank 5", "rank 5"]
    assert docs[0]["msg"].startswith("unformattable log call at <string>:")


def test_stack_info_is_kept_in_json():
    """Before: ``stack_info=True`` was dropped from the JSON line (text printed it)."""
    out = run_logging(
        """
        def where_it_was_called():
            logging.getLogger("lib").warning("look", stack_info=True)
        where_it_was_called()
        """,
        "json",
    )
    (doc,) = json_lines(out.stderr)
    assert doc["msg"] == "look" and doc["stack"].startswith("Stack (most recent call last):")
    assert "in where_it_was_called" in doc["stack"]


def test_fatal_errors_are_json_lines_under_log_format_json(tmp_path):
    """Before: with ``--log-format json`` (or ``EPLB_SERVICE_LOG_FORMAT=json``) a fatal error of the
    coordinator or the sidecar (a bad flag, a bad config file, a taken port) was a bare text line,
    the one line a log pipeline reading JSON could not parse."""
    import socket

    coordinator = [sys.executable, "-m", "eplb_service.coordinator.cli"]
    sidecar = [sys.executable, "-m", "eplb_service.sidecar"]
    missing = str(tmp_path / "missing.json")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (coordinator + ["--log-format", "json", "--initial-placement", missing], "", 2, "--initial-placement"),
            (coordinator + ["--log-format=json", "--fence-steps", "-1"], "", 2, "argument --fence-steps"),
            (coordinator + ["--config", missing], "json", 2, "cannot read config file"),
            (
                coordinator + ["--log-format", "json", "--log-level", "loud"],
                "",
                2,
                "argument --log-level: expected one of DEBUG",
            ),
            (
                coordinator
                + ["--log-format", "json", "--endpoint", f"ipc://{tmp_path}/c.sock", "--metrics-port", port],
                "",
                1,
                f"cannot serve HTTP on --metrics-port {port}",
            ),
            (sidecar + ["--log-format", "json"], "", 2, "give the vLLM command after '--'"),
            (sidecar + ["--bogus", "1", "--", "vllm", "serve", "m"], "json", 2, "unrecognized arguments: --bogus"),
        ]
        for argv, env_format, code, expected in cases:
            out = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
                env={**os.environ, "EPLB_SERVICE_LOG_FORMAT": env_format, "EPLB_SERVICE_LOG_LEVEL": ""},
            )
            assert out.returncode == code, (argv, out.stderr)
            (doc,) = json_lines(out.stderr)
            role = "sidecar" if argv[2] == "eplb_service.sidecar" else "coordinator"
            assert doc["level"] == "CRITICAL" and doc["tag"] == role and expected in doc["msg"], (argv, doc)
