"""Unreadable or ill-typed trace files: each ends as one line naming the file and what was
expected, exit code 2, never a traceback, for ``eplb-plan --load`` and for
``eplb-coordinator --simulate --trace``."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from eplb_service.coordinator import cli as coordinator_cli
from eplb_service.coordinator.plan_cli import main as plan_main
from eplb_service.trace import TraceError, load_trace

ROOT = Path(__file__).resolve().parents[1]


def trace_arrays(**changes: object) -> dict[str, object]:
    """A valid 2-window trace of 2 layers x 4 experts, with ``changes`` applied."""
    arrays: dict[str, object] = dict(
        format_version=np.int64(1),
        loads=np.arange(16, dtype=np.float64).reshape(2, 2, 4),
        step_begin=np.array([0, 10], dtype=np.int64),
        step_end=np.array([10, 20], dtype=np.int64),
        epoch=np.zeros(2, dtype=np.int64),
        ranks_reported=np.ones(2, dtype=np.int64),
        unix_time_s=np.zeros(2),
    )
    arrays.update(changes)
    return arrays


def npz_bytes(**changes: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **trace_arrays(**changes))
    return buf.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def zip_with_raw_member() -> bytes:
    """A zip whose ``loads`` member is not a .npy array (np.load hands back its raw bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in trace_arrays().items():
            if key == "loads":
                zf.writestr("loads", b"not an array")
            else:
                zf.writestr(f"{key}.npy", npy_bytes(np.asarray(value)))
    return buf.getvalue()


# name, file contents, what the message must say
BAD_TRACES: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "the file is empty"),
    ("truncated", lambda: npz_bytes()[:200], "damaged .npz file"),
    ("text", lambda: b'{"loads": []}', "it is not an .npz archive (no zip signature at its start)"),
    ("npy_renamed", lambda: npy_bytes(np.ones((2, 4))), "it is a .npy array, expected an .npz archive"),
    ("string_loads", lambda: npz_bytes(loads=np.full((2, 2, 4), "a")), "loads has dtype <U1, expected real numbers"),
    ("complex_loads", lambda: npz_bytes(loads=np.ones((2, 2, 4), complex)), "loads has dtype complex128"),
    ("bool_loads", lambda: npz_bytes(loads=np.ones((2, 2, 4), bool)), "loads has dtype bool"),
    ("object_loads", lambda: _pickled_npz(), "it holds pickled Python objects, which are never loaded"),
    ("nan_loads", lambda: npz_bytes(loads=np.array([[[0, np.nan]]] * 2)), "loads[0, 0, 1] = nan, expected a finite"),
    ("negative_loads", lambda: npz_bytes(loads=-np.ones((2, 1, 2))), "loads[0, 0, 0] = -1.0"),
    ("loads_2d", lambda: npz_bytes(loads=np.ones((2, 4))), "loads has shape (2, 4), expected [windows > 0"),
    ("no_experts", lambda: npz_bytes(loads=np.ones((2, 2, 0))), "loads has shape (2, 2, 0)"),
    ("version_array", lambda: npz_bytes(format_version=np.array([1, 1])), "format_version has shape (2,)"),
    ("version_float", lambda: npz_bytes(format_version=np.float64(1)), "expected a scalar integer"),
    ("version_2", lambda: npz_bytes(format_version=np.int64(2)), "format_version 2, this reader knows 1"),
    ("string_steps", lambda: npz_bytes(step_begin=np.array(["0", "10"])), "step_begin has dtype <U2, expected integ"),
    ("short_epoch", lambda: npz_bytes(epoch=np.zeros(1, np.int64)), "epoch has shape (1,), expected (2,)"),
    ("raw_member", zip_with_raw_member, "members ['loads'] are not .npy arrays"),
]


def _pickled_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **trace_arrays(loads=np.array([[[None]]], dtype=object)))
    return buf.getvalue()


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Any warning fails the block (a complex load used to pass with only a ComplexWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def run_plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = plan_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, prog: str, *named: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming every string of ``named``."""
    assert code == 2, err
    assert out == ""
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in named:
        assert text in err, (text, err)


@pytest.mark.parametrize("name,content,expected", BAD_TRACES, ids=[t[0] for t in BAD_TRACES])
def test_bad_trace_is_a_trace_error_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(content())
    with pytest.raises(TraceError) as info:
        load_trace(str(path))
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("name,content,expected", BAD_TRACES, ids=[t[0] for t in BAD_TRACES])
def test_bad_trace_as_plan_load_exits_2_with_one_line(capsys, tmp_path, name, content, expected):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(content())
    with no_warnings():
        result = run_plan(capsys, "--load", str(path), "--ranks", "4")
    assert_one_line_error(*result, "eplb-plan", "--load", str(path), expected)


@pytest.mark.parametrize("name,content,expected", BAD_TRACES, ids=[t[0] for t in BAD_TRACES])
def test_bad_trace_for_coordinator_simulate_exits_2_with_one_line(capsys, tmp_path, name, content, expected):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(content())
    code = coordinator_cli.main(["--simulate", "--trace", str(path), "--steps", "1"])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, "eplb-coordinator", str(path), expected)


@pytest.mark.parametrize("name", ["empty", "truncated", "string_loads", "npy_renamed"])
def test_coordinator_console_has_no_traceback_for_bad_traces(tmp_path, name):
    content = dict((t[0], t[1]) for t in BAD_TRACES)[name]
    path = tmp_path / f"{name}.npz"
    path.write_bytes(content())
    proc = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--simulate", "--trace", str(path), "--steps", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "eplb-coordinator", str(path))
