"""Unreadable or ill-typed load, trace and placement files, and out-of-range eplb-plan flags:
each ends as one line naming the file (or flag) and what was expected, exit code 2, never a
traceback, for ``eplb-plan`` and for ``eplb-coordinator --simulate --trace``."""

from __future__ import annotations

import contextlib
import io
import json
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
    (
        "window_total_overflows",  # replayed, every rank died sampling from all-zero shares
        lambda: npz_bytes(loads=np.array([[[1.0, 2.0]], [[1e308, 1e308]]])),
        "window 1's loads sum to inf (its largest entry is 1e+308): expected windows whose total load is a finite",
    ),
    ("loads_2d", lambda: npz_bytes(loads=np.ones((2, 4))), "loads has shape (2, 4), expected [windows > 0"),
    ("no_experts", lambda: npz_bytes(loads=np.ones((2, 2, 0))), "loads has shape (2, 2, 0)"),
    ("version_array", lambda: npz_bytes(format_version=np.array([1, 1])), "format_version has shape (2,)"),
    ("version_float", lambda: npz_bytes(format_version=np.float64(1)), "expected a scalar integer"),
    ("version_2", lambda: npz_bytes(format_version=np.int64(2)), "format_version 2, this reader knows 1"),
    ("string_steps", lambda: npz_bytes(step_begin=np.array(["0", "10"])), "step_begin has dtype <U2, expected integ"),
    ("short_epoch", lambda: npz_bytes(epoch=np.zeros(1, np.int64)), "epoch has shape (1,), expected (2,)"),
    ("raw_member", zip_with_raw_member, "members ['loads'] are not .npy arrays"),
    (
        "window_backwards",
        lambda: npz_bytes(step_begin=np.array([0, 20]), step_end=np.array([10, 15])),
        "window 1 covers steps [20, 15), which runs backwards: expected step_begin <= step_end",
    ),
    (
        "windows_out_of_order",
        lambda: npz_bytes(step_begin=np.array([10, 0]), step_end=np.array([20, 10])),
        "window 1 covers steps [0, 10) after window 0 at [10, 20): expected windows in step order",
    ),
    (
        "same_begin_shorter_after",
        lambda: npz_bytes(step_begin=np.array([0, 0]), step_end=np.array([20, 10])),
        "window 1 covers steps [0, 10) after window 0 at [0, 20)",
    ),
    ("negative_step", lambda: npz_bytes(step_begin=np.array([-5, 10])), "step_begin[0] = -5, expected a step in [0"),
    (
        "uint64_step_past_int64",
        lambda: npz_bytes(step_end=np.array([10, 2**64 - 1], dtype=np.uint64)),
        f"step_end[1] = {2**64 - 1}, expected a step in [0, 2**63)",
    ),
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


BAD_NPY: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "the file is empty, expected a .npy array"),
    ("truncated", lambda: npy_bytes(np.ones((2, 4)))[:100], "damaged .npy file"),
    ("text", lambda: b"[[1, 2, 3, 4]]", "it is not a .npy array (no numpy header at its start)"),
    ("npz_renamed", lambda: npz_bytes(), "it is an .npz archive, expected a .npy array"),
    ("pickle", lambda: npy_bytes(np.array([[1, None]], dtype=object), allow_pickle=True), "pickled Python objects"),
    ("complex", lambda: npy_bytes(np.ones((2, 4), complex)), "dtype complex128, expected real numbers"),
    ("bool", lambda: npy_bytes(np.ones((2, 4), bool)), "dtype bool, expected real numbers"),
    ("string", lambda: npy_bytes(np.full((2, 4), "x")), "dtype <U1, expected real numbers"),
    ("datetime", lambda: npy_bytes(np.zeros((2, 4), "datetime64[s]")), "dtype datetime64[s]"),
    ("one_d", lambda: npy_bytes(np.ones(4)), "expected a 2-D array [layers > 0, experts > 0], got shape (4,)"),
    ("three_d", lambda: npy_bytes(np.ones((1, 2, 4))), "got shape (1, 2, 4)"),
    ("no_layers", lambda: npy_bytes(np.ones((0, 4))), "got shape (0, 4)"),
    ("nan", lambda: npy_bytes(np.array([[1, 2, np.nan, 4]])), "entry [0, 2] = nan, expected a finite number >= 0"),
    ("inf", lambda: npy_bytes(np.array([[1, 2, 3, np.inf]])), "entry [0, 3] = inf"),
    ("negative", lambda: npy_bytes(np.array([[1, -2, 3, 4]])), "entry [0, 1] = -2.0"),
    (
        "total_overflows",  # every entry finite, the sum not: balancedness came out NaN
        lambda: npy_bytes(np.array([[1e308, 1e308, 3, 4]])),
        "the load sums to inf (its largest entry is [0, 0] = 1e+308): expected loads whose total is a finite",
    ),
]


@pytest.mark.parametrize("name,content,expected", BAD_NPY, ids=[t[0] for t in BAD_NPY])
@pytest.mark.parametrize("flag", ["--load", "--previous-load"])
def test_bad_npy_load_exits_2_naming_flag_and_file(capsys, tmp_path, name, content, expected, flag):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((1, 4)))
    path = tmp_path / f"{name}.npy"
    path.write_bytes(content())
    files = {"--load": str(good), "--previous-load": str(good), flag: str(path)}
    with no_warnings():
        result = run_plan(capsys, *[a for kv in files.items() for a in kv], "--ranks", "4")
    assert_one_line_error(*result, "eplb-plan", f"{flag} {path}", expected)


BAD_JSON_LOADS: list[tuple[str, str, str]] = [
    ("null", "[[1, null, 3, 4]]", "entry [0][1] is null, expected a finite number >= 0"),
    ("string", '{"load": [[1, 2, "3", 4]]}', 'entry load[0][2] is "3", expected a finite number'),
    ("bool", "[[1, 2, 3, true]]", "entry [0][3] is true"),
    ("nan_literal", "[[1, NaN, 3, 4]]", "entry [0][1] is NaN"),
    ("overflow_float", "[[1, 1e400, 3, 4]]", "entry [0][1] is Infinity"),
    ("huge_int", "[[1, 1" + "0" * 400 + ", 3, 4]]", "entry [0][1] is 1000"),
    ("negative", "[[1, -5, 3, 4]]", "entry [0][1] is -5"),
    ("total_overflows", "[[1, 2, 3, 4], [1, 1e308, 1e308, 4]]", "the load sums to inf (its largest entry is [1, 1]"),
    ("nested", "[[1, [2], 3, 4]]", "entry [0][1] is [2]"),
    ("flat", "[1, 2, 3]", "row [0] is 1, expected a non-empty list"),
    ("empty_row", "[[]]", "row [0] is [], expected a non-empty list"),
    ("ragged", "[[1, 2], [3]]", "row [1] has 1 entries, row [0] has 2"),
    ("empty", "[]", "the document is [], expected a 2-D array"),
    ("scalar", "7", "the document is 7"),
    ("wrong_key", '{"weights": []}', "JSON object has no 'load' key"),
    ("not_json", "{nope", "not valid JSON"),
    ("too_deep", "[" * 100000 + "]" * 100000, "not valid JSON"),
]


@pytest.mark.parametrize("name,text,expected", BAD_JSON_LOADS, ids=[t[0] for t in BAD_JSON_LOADS])
def test_bad_json_load_exits_2_naming_file_and_position(capsys, tmp_path, name, text, expected):
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    result = run_plan(capsys, "--load", str(path), "--ranks", "4")
    assert_one_line_error(*result, "eplb-plan", f"--load {path}", expected)


def test_binary_json_load_is_named_not_a_unicode_error(capsys, tmp_path):
    path = tmp_path / "load.json"
    path.write_bytes(npy_bytes(np.ones((1, 4))))
    result = run_plan(capsys, "--load", str(path), "--ranks", "4")
    assert_one_line_error(*result, "eplb-plan", f"--load {path}", "not valid JSON (not UTF-8 text)")


BAD_PLACEMENTS: list[tuple[str, object, str]] = [
    (
        "float_1e30",
        {"phy2log": [[1e30, 1, 2, 3]]},
        "entry phy2log[0][0] is 1e+30, a float that is not an exact integer",
    ),
    ("float_2_5", [[0, 1, 2.5, 3]], "entry [0][2] is 2.5, a float that is not an exact integer"),
    ("negative", [[0, -1, 2, 3]], "entry [0][1] is -1, expected an integer expert index >= 0"),
    ("bool", [[0, 1, True, 3]], "entry [0][2] is true"),
    ("string", [[0, 1, "2", 3]], 'entry [0][2] is "2"'),
    ("null", [[0, None, 2, 3]], "entry [0][1] is null"),
    ("huge_int", [[0, 10**30, 2, 3]], "entry [0][1] is 1000000000000000000000000000000"),
    ("out_of_range", [[0, 1, 2, 7]], "layer 0: slot 3 holds expert 7, expected 0 <= expert < 4"),
    ("missing_expert", [[0, 1, 2, 2]], "layer 0: logical expert 3 has no replica"),
    ("too_few_slots", [[0, 1, 2]], "has 3 slots per layer, fewer than the 4 experts of --load"),
    ("wrong_layers", [[0, 1, 2, 3], [0, 1, 2, 3]], "has shape (2, 4), expected (1, 4)"),
    ("no_key", {"placement": []}, "JSON object has no 'phy2log' key"),
]


@pytest.mark.parametrize("name,doc,expected", BAD_PLACEMENTS, ids=[t[0] for t in BAD_PLACEMENTS])
def test_bad_current_placement_exits_2_naming_file_and_position(capsys, tmp_path, name, doc, expected):
    load = tmp_path / "load.json"
    load.write_text(json.dumps([[1, 2, 3, 4]]))
    current = tmp_path / f"{name}.json"
    current.write_text(json.dumps(doc))
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--current", str(current))
    assert_one_line_error(*result, "eplb-plan", f"--current {current}", expected)
    assert "-9223372036854775808" not in result[2]


def test_coordinator_initial_placement_names_flag_and_position(capsys, tmp_path):
    current = tmp_path / "p.json"
    current.write_text(json.dumps({"phy2log": [[1e30, 1, 2, 3]]}))
    code = coordinator_cli.main(["--simulate", "--steps", "1", "--initial-placement", str(current)])
    captured = capsys.readouterr()
    assert_one_line_error(
        code, captured.out, captured.err, "eplb-coordinator", f"--initial-placement {current}", "phy2log[0][0]"
    )


GAIN = "expected a balancedness gain >= 0 and below 1 (0.01 = one percentage point)"
BAD_FLAGS: list[tuple[str, str, str]] = [
    ("--ranks", "0", "expected an integer >= 1"),
    ("--ranks", "1.5", "expected an integer >= 1"),
    ("--ranks", "four", "expected an integer >= 1"),
    ("--redundant", "-2", "expected an integer >= 0"),
    ("--groups", "0", "expected an integer >= 1"),
    ("--nodes", "-5", "expected an integer >= 1"),
    ("--bytes-per-expert", "0", "expected an integer >= 1"),
    ("--bytes-per-expert", str(2**70), "expected an integer <= 1099511627776"),
    ("--staging-budget-bytes", "-1", "expected an integer >= 1"),
    ("--staging-budget-bytes", "0", "expected an integer >= 1"),
    ("--min-layer-gain", "-1", GAIN),
    ("--min-layer-gain", "nan", GAIN),
    ("--min-layer-gain", "inf", GAIN),
    ("--min-layer-gain", "x", GAIN),
    ("--min-layer-gain", "2", GAIN),
]


@pytest.mark.parametrize("flag,value,expected", BAD_FLAGS, ids=[f"{f}={v[:8]}" for f, v, _ in BAD_FLAGS])
@pytest.mark.parametrize("policy", ["migration", "deepseek"])
def test_bad_numeric_flag_is_refused_at_parse_time(capsys, tmp_path, flag, value, expected, policy):
    # The load file does not exist: a flag refused at parse time is named before any file is read.
    argv = ["--load", str(tmp_path / "absent.json"), "--ranks", "2", "--policy", policy, flag, value]
    result = run_plan(capsys, *argv)
    assert_one_line_error(*result, "eplb-plan", f"argument {flag}: {expected}, got {value!r}")


def test_hierarchy_errors_name_the_flags_under_either_policy(capsys, tmp_path):
    load = tmp_path / "load.json"
    load.write_text(json.dumps([[1, 2, 3, 4]]))
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--policy", "deepseek", "--groups", "3")
    assert_one_line_error(*result, "eplb-plan", f"--groups 3 must divide the 4 experts of --load {load}")
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--policy", "deepseek", "--nodes", "4")
    assert_one_line_error(*result, "eplb-plan", "--nodes 4 must divide --ranks 2")
    # The migration policy names them too, whether or not it keeps a hierarchy with them (groups
    # not a multiple of the nodes, or one node): it used to ignore them there and exit 0.
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--groups", "3", "--nodes", "4")
    assert_one_line_error(*result, "eplb-plan", f"--groups 3 must divide the 4 experts of --load {load}")
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--groups", "3")
    assert_one_line_error(*result, "eplb-plan", f"--groups 3 must divide the 4 experts of --load {load}")
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--groups", "2", "--nodes", "4")
    assert_one_line_error(*result, "eplb-plan", "--nodes 4 must divide --ranks 2")
    result = run_plan(capsys, "--load", str(load), "--ranks", "2", "--groups", "4", "--nodes", "4")
    assert_one_line_error(*result, "eplb-plan", "--nodes 4 must divide --ranks 2")
    # A pair that divides both but keeps no hierarchy (3 groups on 2 nodes) plans on any node.
    six = tmp_path / "six.json"
    six.write_text(json.dumps([[1, 2, 3, 4, 5, 6]]))
    assert run_plan(capsys, "--load", str(six), "--ranks", "2", "--groups", "3", "--nodes", "2")[0] == 0


def test_too_small_staging_budget_names_the_flag(capsys, tmp_path):
    load = tmp_path / "load.json"
    load.write_text(json.dumps([[90, 132, 40, 61, 104, 165, 39, 4], [20, 107, 104, 64, 19, 197, 187, 157]]))
    argv = ["--load", str(load), "--ranks", "4", "--bytes-per-expert", "1024", "--staging-budget-bytes"]
    code, out, err = run_plan(capsys, *argv, "1000")
    assert_one_line_error(code, out, err, "eplb-plan", "staging bytes on rank", "more than --staging-budget-bytes 1000")
    assert "staging_budget_bytes" not in err
    assert run_plan(capsys, *argv, "1024")[0] == 0


def test_integer_typed_files_and_integral_floats_are_still_accepted(capsys, tmp_path):
    """The checks refuse what is ill-typed, not what is merely stored differently."""
    np.save(tmp_path / "int.npy", np.array([[1, 2, 3, 4]], dtype=np.uint16))
    (tmp_path / "trace.npz").write_bytes(npz_bytes(loads=np.ones((2, 1, 4), dtype=np.int32)))
    (tmp_path / "float.json").write_text("[[1.5, 2, 3e2, 0]]")
    (tmp_path / "cur.json").write_text(json.dumps({"phy2log": [[3.0, 2, 1, 0]]}))
    for load in ("int.npy", "trace.npz", "float.json"):
        code, out, err = run_plan(capsys, "--load", str(tmp_path / load), "--ranks", "2")
        assert code == 0 and err == "", (load, err)
        assert json.loads(out)["num_logical"] == 4
    code, out, err = run_plan(
        capsys, "--load", str(tmp_path / "int.npy"), "--ranks", "2", "--current", str(tmp_path / "cur.json")
    )
    assert code == 0 and json.loads(out)["balancedness"]["before"] > 0, err


def test_array_and_trace_files_are_known_by_suffix_in_any_case_or_by_their_bytes(capsys, tmp_path):
    """Before, the format came from a lower-case suffix alone: ``LOAD.NPY``, ``T.NPZ`` or an array
    saved without a suffix was read as JSON and refused as "not UTF-8 text"."""
    np.save(tmp_path / "ref.npy", np.array([[1.0, 2.0, 3.0, 4.0]]))
    (tmp_path / "LOAD.NPY").write_bytes((tmp_path / "ref.npy").read_bytes())
    (tmp_path / "load").write_bytes((tmp_path / "ref.npy").read_bytes())
    (tmp_path / "T.NPZ").write_bytes(npz_bytes())
    (tmp_path / "trace").write_bytes(npz_bytes())
    plans = {}
    for name in ("ref.npy", "LOAD.NPY", "load", "T.NPZ", "trace"):
        code, out, err = run_plan(capsys, "--load", str(tmp_path / name), "--ranks", "2")
        assert code == 0 and err == "", (name, err)
        plans[name] = json.loads(out)["phy2log"]
    assert plans["LOAD.NPY"] == plans["load"] == plans["ref.npy"]
    assert plans["T.NPZ"] == plans["trace"]
    # a text table without a suffix is still JSON's to refuse, by name
    (tmp_path / "table").write_text("1,2,3,4\n")
    result = run_plan(capsys, "--load", str(tmp_path / "table"), "--ranks", "2")
    assert_one_line_error(*result, "eplb-plan", f"--load {tmp_path / 'table'}", "takes a .npy array")


def test_an_empty_out_path_is_refused_not_taken_for_stdout(capsys, tmp_path):
    """``--out "$UNSET"`` wrote the plan to stdout and exited 0, as if --out had not been given."""
    (tmp_path / "load.json").write_text("[[1, 2, 3, 4]]")
    for argv in (["--out", ""], ["--out="]):
        result = run_plan(capsys, "--load", str(tmp_path / "load.json"), "--ranks", "2", *argv)
        assert_one_line_error(*result, "eplb-plan", "argument --out", "expected a file path, got an empty string")


class _WritesMarker:
    """Unpickling this writes ``marker``: proof that a file's pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path, str]]:
        return Path.write_text, (self.marker, "unpickled")


def test_pickles_in_load_and_trace_files_are_never_run(capsys, tmp_path):
    marker = tmp_path / "marker"
    payload = np.array([[_WritesMarker(marker)] * 4], dtype=object)
    (tmp_path / "load.npy").write_bytes(npy_bytes(payload, allow_pickle=True))
    buf = io.BytesIO()
    np.savez(buf, **trace_arrays(loads=payload[None]))
    (tmp_path / "trace.npz").write_bytes(buf.getvalue())
    for name in ("load.npy", "trace.npz"):
        code, out, err = run_plan(capsys, "--load", str(tmp_path / name), "--ranks", "4")
        assert_one_line_error(code, out, err, "eplb-plan", name, "pickled Python objects, which are never loaded")
    assert not marker.exists()
    # The payload does run when unpickled: the test would notice a reader that allowed it.
    np.load(tmp_path / "load.npy", allow_pickle=True)
    assert marker.read_text() == "unpickled"
