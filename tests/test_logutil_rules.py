"""``logutil``'s precedence and parsing rules, each on its own (no process started).

A flag wins over the environment, the last of a repeated flag wins (as argparse keeps it), a level
name may carry spaces (a value read from a file), and a thread ended by ``sys.exit`` is no crash.
"""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from eplb_service import logutil


@pytest.fixture
def restored_logging():
    """``configure`` sets process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers[:], level, sys.excepthook, threading.excepthook = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def test_a_log_level_flag_wins_over_the_environment(monkeypatch, restored_logging):
    """README: ``--log-level``, else ``$EPLB_SERVICE_LOG_LEVEL``, else INFO."""
    monkeypatch.setenv(logutil.LOG_LEVEL_ENV, "WARNING")
    logutil.configure("debug", "text", tag="t")
    assert logging.getLogger().level == logging.DEBUG
    logutil.configure(None, "text", tag="t")
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.delenv(logutil.LOG_LEVEL_ENV)
    logutil.configure(None, "text", tag="t")
    assert logging.getLogger().level == logging.INFO


def test_a_level_name_takes_any_case_and_surrounding_blanks():
    """``EPLB_SERVICE_LOG_LEVEL`` is often written from a file, with its newline."""
    assert logutil.level_name(" debug\n") == "DEBUG"
    assert logutil.parse_level("Warning ", "EPLB_SERVICE_LOG_LEVEL") == logging.WARNING
    assert logutil.level_name("verbose") is None


@pytest.mark.parametrize(
    "argv, value",
    [
        (["--log-format", "text", "--dp", "2", "--log-format", "json"], "json"),
        (["--log-format=json", "--log-format=text"], "text"),
        (["--log-format", "json", "--log-format=text"], "text"),
        (["--dp", "2"], None),
        (["--log-format"], None),  # no value follows: argparse refuses it, nothing to read here
    ],
)
def test_the_last_of_a_repeated_flag_is_the_one_read(argv, value):
    """argparse keeps the last one; an error found before parsing must come out in that format,
    and ``--config a --config b`` must peek at the file that will be loaded."""
    assert logutil.last_flag_value(argv, "--log-format") == value


def test_a_format_flag_wins_over_the_config_file_and_the_file_over_the_variable(monkeypatch):
    monkeypatch.setenv(logutil.LOG_FORMAT_ENV, "JSON")
    assert logutil.requested_format([]) == "json"
    assert logutil.requested_format([], "text") == "text"
    assert logutil.requested_format(["--log-format", "json"], "text") == "json"
    assert logutil.requested_format(["--log-format=text"], "json") == "text"


def thread_end(exc: BaseException) -> threading.ExceptHookArgs:
    return threading.ExceptHookArgs((type(exc), exc, None, threading.current_thread()))


def test_a_thread_ended_by_sys_exit_logs_nothing_and_a_crash_logs_one_critical_line(caplog):
    """``threading``'s own hook ignores ``SystemExit``; a CRITICAL "uncaught" line for a thread that
    chose to stop would page someone for nothing."""
    with caplog.at_level(logging.DEBUG, logger="eplb_service"):
        logutil._log_uncaught_in_thread(thread_end(SystemExit(0)))
        assert caplog.records == []
        logutil._log_uncaught_in_thread(thread_end(ValueError("bad")))
    (record,) = caplog.records
    assert record.levelno == logging.CRITICAL and "uncaught ValueError in thread" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError
