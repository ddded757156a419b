"""eplb-plan: file formats, output document, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_signals import terminal_defaults

from eplb_service.coordinator.plan_cli import main
from eplb_service.placement import PlacementShape, validate_phy2log

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]


@pytest.fixture
def load_json(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(README_WEIGHT))
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("policy", ["deepseek", "migration"])
def test_writes_placement_json(capsys, load_json, policy):
    code, out, err = run_cli(
        capsys,
        "--load",
        load_json,
        "--ranks",
        "8",
        "--redundant",
        "4",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--policy",
        policy,
    )
    assert code == 0 and err == ""
    doc = json.loads(out)
    phy2log = np.array(doc["phy2log"])
    validate_phy2log(phy2log, PlacementShape(2, 12, 16, 8))
    assert np.array_equal(np.array(doc["logcnt"]), np.stack([np.bincount(r, minlength=12) for r in phy2log]))
    assert len(doc["balancedness"]["per_layer"]) == 2
    assert doc["balancedness"]["overall"] > doc["balancedness"]["before"]
    assert doc["experts_moved"] == int((phy2log != np.arange(16) % 12).sum())
    assert doc["bytes_moved"] <= doc["experts_moved"]


def test_deepseek_matches_the_readme_per_rank(capsys, load_json):
    _, out, _ = run_cli(
        capsys,
        "--load",
        load_json,
        "--ranks",
        "8",
        "--redundant",
        "4",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--policy",
        "deepseek",
    )
    expected = np.array(
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    )
    got = np.array(json.loads(out)["phy2log"])
    # Same experts on every rank; the order within a rank follows the current placement.
    assert np.array_equal(np.sort(got.reshape(2, 8, 2), axis=2), np.sort(expected.reshape(2, 8, 2), axis=2))


def test_npy_load_current_round_trip_and_out(capsys, tmp_path):
    rng = np.random.default_rng(0)
    load = rng.gamma(0.5, 100, size=(3, 16))
    np.save(tmp_path / "load.npy", load)
    first = tmp_path / "first.json"
    assert (
        run_cli(capsys, "--load", str(tmp_path / "load.npy"), "--ranks", "4", "--redundant", "4", "--out", str(first))[
            0
        ]
        == 0
    )
    doc = json.loads(first.read_text())
    # Planning again from its own output for the same load moves nothing.
    code, out, _ = run_cli(
        capsys,
        "--load",
        str(tmp_path / "load.npy"),
        "--ranks",
        "4",
        "--current",
        str(first),
        "--bytes-per-expert",
        "1024",
    )
    again = json.loads(out)
    assert code == 0 and again["experts_moved"] == 0 and again["phy2log"] == doc["phy2log"]


@pytest.mark.parametrize(
    "content,args,message",
    [
        ([[1, 2, 3]], ["--ranks", "2"], "--ranks 2 does not divide the 3 slots per layer (3 experts + 0 redundant)"),
        ([1, 2, 3], ["--ranks", "1"], "row [0] is 1, expected a non-empty list (a 2-D array)"),
        ([[1, 2], [3]], ["--ranks", "1"], "row [1] has 1 entries, row [0] has 2: expected a 2-D array"),
        ([[1, -5, 3, 4]], ["--ranks", "2"], "load.json: entry [0][1] is -5, expected a finite number >= 0"),
        ([[1, 2, 3, 4]], ["--ranks", "0"], "argument --ranks: expected an integer >= 1, got '0'"),
        (
            [[1, 2, 3, 4]],
            ["--ranks", "2", "--redundant", "-2"],
            "argument --redundant: expected an integer >= 0, got '-2'",
        ),
        (
            [[1, 2, 3, 4]],
            ["--ranks", "1", "--redundant", str(10**12)],
            f"--redundant {10**12} is implausible: expected at most 124 redundant slots per layer (31 x the 4 "
            "experts of --load",
        ),
        ([[1, 2, 3, 4]], ["--ranks", "2", "--policy", "lpt"], "invalid choice: 'lpt'"),
        (
            [[1, 2, 3, 4]],
            ["--ranks", "2", "--groups", "3", "--policy", "deepseek"],
            "--groups 3 must divide the 4 experts",
        ),
        (
            [[1, 2, 3, 4]],
            ["--ranks", "2", "--nodes", "4", "--policy", "deepseek"],
            "--nodes 4 must divide --ranks 2",
        ),
        ({"weights": []}, ["--ranks", "2"], "JSON object has no 'load' key"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, tmp_path, content, args, message):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(content))
    code, out, err = run_cli(capsys, "--load", str(path), *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("eplb-plan: error: ")
    assert message in err


def test_bad_current_shape_and_missing_file(capsys, tmp_path, load_json):
    cur = tmp_path / "cur.json"
    cur.write_text(json.dumps({"phy2log": [[0, 1, 2]]}))
    code, _, err = run_cli(capsys, "--load", load_json, "--ranks", "8", "--current", str(cur), "--redundant", "4")
    assert code == 2 and f"--current {cur} has shape (1, 3), expected (2, 16)" in err
    code, _, err = run_cli(capsys, "--load", str(tmp_path / "missing.npy"), "--ranks", "8")
    assert code == 2 and "missing.npy" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    code, _, err = run_cli(capsys, "--load", str(bad), "--ranks", "8")
    assert code == 2 and "not valid JSON" in err


def test_a_current_placement_planned_for_other_ranks_is_refused(capsys, tmp_path, load_json):
    """Before: a plan for 8 ranks taken as ``--current`` with ``--ranks 4`` was read slot by slot as
    4 ranks' placement, one no deployment had, and planned from (the coordinator's
    ``--initial-placement`` already refused the same). Its own rank count, or a bare list, is taken."""
    code, out, _ = run_cli(capsys, "--load", load_json, "--ranks", "8", "--redundant", "4")
    plan = tmp_path / "plan8.json"
    plan.write_text(out)
    code, out, err = run_cli(capsys, "--load", load_json, "--ranks", "4", "--current", str(plan))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"--current {plan}: planned for 8 ranks (its num_ranks), but --ranks is 4" in err
    assert run_cli(capsys, "--load", load_json, "--ranks", "8", "--current", str(plan))[0] == 0
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(json.loads(plan.read_text())["phy2log"]))
    assert run_cli(capsys, "--load", load_json, "--ranks", "4", "--current", str(bare))[0] == 0


@pytest.mark.parametrize("value", [True, False, "4", None, 0, -1, 2.5])
def test_a_current_placement_whose_num_ranks_is_no_rank_count_is_refused(capsys, tmp_path, load_json, value):
    """Before: ``true``, ``"4"`` or ``null`` was ignored (the file planned for any rank count went
    through, as a bare list does), while ``-1`` was refused as "planned for -1 ranks". Now any
    ``num_ranks`` that is there must be an integer >= 1, and the refusal names it."""
    code, out, _ = run_cli(capsys, "--load", load_json, "--ranks", "8", "--redundant", "4")
    doc = json.loads(out)
    doc["num_ranks"] = value
    current = tmp_path / "current.json"
    current.write_text(json.dumps(doc))
    code, out, err = run_cli(capsys, "--load", load_json, "--ranks", "8", "--current", str(current))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"--current {current}: num_ranks is {json.dumps(value)}, expected an integer rank count >= 1" in err, err
    doc["num_ranks"] = 8.0  # numpy's tolist() of a float array writes 8.0: taken, as in phy2log
    current.write_text(json.dumps(doc))
    assert run_cli(capsys, "--load", load_json, "--ranks", "8", "--current", str(current))[0] == 0
    del doc["num_ranks"]  # no rank count named: taken for any --ranks
    current.write_text(json.dumps(doc))
    assert run_cli(capsys, "--load", load_json, "--ranks", "8", "--current", str(current))[0] == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_plan_into_a_closed_pipe_or_a_full_disk_ends_without_a_traceback(tmp_path):
    """Before: ``eplb-plan ... | head -c 100`` could end in a ``BrokenPipeError`` traceback and
    ``> /dev/full`` (a full disk) always did, in an ``OSError`` one."""
    load = tmp_path / "load.npy"
    np.save(load, np.random.default_rng(0).integers(0, 1000, (60, 256)).astype(np.float64))
    argv = [sys.executable, "-m", "eplb_service.coordinator.plan_cli", "--load", str(load), "--ranks", "8"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the plan is written
    assert (proc.wait(timeout=120), proc.stderr.read()) == (141, "")
    with open("/dev/full", "w") as full:
        out = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("eplb-plan: error: cannot write to stdout: No space left on device")


def test_a_csv_or_text_load_is_told_which_formats_are_taken(capsys, tmp_path):
    """Before: ``--load x.csv`` said only "not valid JSON (Extra data at line 1)"."""
    for name in ("load.csv", "load.txt"):
        path = tmp_path / name
        path.write_text("1,2,3,4\n5,6,7,8\n" if name.endswith(".csv") else "1 2 3 4\n5 6 7 8\n")
        code, out, err = run_cli(capsys, "--load", str(path), "--ranks", "2")
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert (
            f"--load {path}: not valid JSON" in err and "--load takes a .npy array, a .npz trace, or else JSON" in err
        )
    path = tmp_path / "load.json"  # a file named .json is JSON by its own word: no list of formats
    path.write_text("1,2,3,4\n")
    code, _, err = run_cli(capsys, "--load", str(path), "--ranks", "2")
    assert code == 2 and "not valid JSON" in err and "takes a .npy" not in err


def test_console_script_module_has_no_traceback(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps([[1, 2, 3]]))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.plan_cli", "--load", str(path), "--ranks", "2"],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_previous_load_gives_the_persistence_and_a_forecast_plan(capsys, tmp_path, load_json):
    # The window before had its hot experts elsewhere: little of the imbalance lasted.
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps([row[::-1] for row in README_WEIGHT]))
    code, out, err = run_cli(capsys, "--load", load_json, "--previous-load", str(previous), "--ranks", "4")
    assert code == 0, err
    doc = json.loads(out)
    assert 0.0 <= doc["persistence"] < 0.5
    code, out, err = run_cli(capsys, "--load", load_json, "--previous-load", load_json, "--ranks", "4")
    assert code == 0 and json.loads(out)["persistence"] == pytest.approx(1.0)
    code, out, _ = run_cli(capsys, "--load", load_json, "--ranks", "4")
    assert json.loads(out)["persistence"] == 1.0


def test_previous_load_of_another_shape_is_named(capsys, tmp_path, load_json):
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(README_WEIGHT[:1]))
    code, out, err = run_cli(capsys, "--load", load_json, "--previous-load", str(previous), "--ranks", "4")
    assert code == 2 and out == ""
    assert f"--previous-load {previous} has shape (1, 12), expected (2, 12)" in err


def test_redundant_up_to_the_bound_still_plans(capsys, tmp_path):
    """The bound refuses only the implausible: 4 experts on 128 ranks, one slot each, plans."""
    path = tmp_path / "load.json"
    path.write_text(json.dumps([[1, 2, 3, 4]]))
    code, out, err = run_cli(capsys, "--load", str(path), "--ranks", "128", "--redundant", "124")
    assert code == 0 and err == "" and json.loads(out)["num_physical"] == 128
    code, out, err = run_cli(capsys, "--load", str(path), "--ranks", "1", "--redundant", "125")
    assert code == 2 and "--redundant 125 is implausible" in err and err.count("\n") == 1


class _DyingFile:
    """A text file whose write stops halfway through with Ctrl-C, as an interrupted run does."""

    def __init__(self, real):
        self._real = real

    def write(self, text):
        self._real.write(text[: len(text) // 2])
        self._real.flush()
        raise KeyboardInterrupt

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


def test_out_interrupted_mid_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, load_json):
    import io

    out = tmp_path / "placement.json"
    out.write_text('{"previous": true}\n')
    real_open = io.open

    def dying_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _DyingFile(handle) if "w" in mode else handle

    monkeypatch.setattr(io, "open", dying_open)
    code = main(["--load", load_json, "--ranks", "4", "--redundant", "4", "--out", str(out)])
    monkeypatch.undo()
    assert code == 130
    assert json.loads(out.read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.json", "placement.json"]  # no temporary left


def test_out_replaces_a_file_with_its_mode_and_a_new_one_gets_the_umask(capsys, tmp_path, load_json):
    import os
    import stat

    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(kept)
    assert run_cli(capsys, "--load", load_json, "--ranks", "4", "--redundant", "4", "--out", str(link))[0] == 0
    assert link.is_symlink() and json.loads(kept.read_text())["num_ranks"] == 4
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    umask = os.umask(0o022)
    try:
        assert run_cli(capsys, "--load", load_json, "--ranks", "4", "--out", str(fresh))[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # as open() makes it, not mkstemp's 0600


def test_out_to_a_pipe_is_written_in_place(capsys, tmp_path, load_json):
    import os
    import threading

    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    code = run_cli(capsys, "--load", load_json, "--ranks", "4", "--out", str(fifo))[0]
    reader.join(timeout=10)
    assert code == 0 and json.loads(got[0])["num_ranks"] == 4
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["load.json", "plan.fifo"]


def test_out_to_dev_stdout_still_works(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(README_WEIGHT))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.plan_cli", "--load", str(path), "--ranks", "4"]
        + ["--out", "/dev/stdout"],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_ranks"] == 4


def test_progress_lines_go_to_stderr_and_leave_the_plan_alone(capsys, load_json):
    code, quiet, err = run_cli(capsys, "--load", load_json, "--ranks", "4", "--redundant", "4")
    assert code == 0 and err == ""  # stderr is no terminal here: no progress unless asked
    code, out, err = run_cli(capsys, "--load", load_json, "--ranks", "4", "--redundant", "4", "--progress")
    assert code == 0 and out == quiet
    lines = err.splitlines()
    assert lines[0].startswith(f"eplb-plan: reading --load {load_json} (")
    assert any(line.startswith("eplb-plan: planning: layers 2/2 (") for line in lines)
    assert lines[-1].startswith("eplb-plan: done (") and lines[-1].endswith(" s)")


def test_progress_is_on_for_a_terminal_unless_no_progress(capsys, monkeypatch, load_json):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert "planning: layers" in run_cli(capsys, "--load", load_json, "--ranks", "4")[2]
    assert run_cli(capsys, "--load", load_json, "--ranks", "4", "--no-progress")[2] == ""


def test_ctrl_c_exits_130_with_one_line_and_no_file(tmp_path):
    """A real SIGINT in the middle of planning 1000 layers: one line, no traceback, no --out file."""
    import os
    import signal

    load = tmp_path / "load.npy"
    np.save(load, np.random.default_rng(0).lognormal(0.0, 1.0, size=(1000, 1792)) * 1000)
    out = tmp_path / "plan.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "eplb_service.coordinator.plan_cli", "--load", str(load), "--ranks", "256"]
        + ["--redundant", "256", "--out", str(out), "--progress"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        # SIGINT as a terminal leaves it, whatever this process's own: an ignored SIGINT is
        # inherited, and Python then installs no KeyboardInterrupt (the child planned to the end)
        preexec_fn=terminal_defaults,
    )
    assert proc.stderr is not None
    seen = [proc.stderr.readline() for _ in range(2)]
    assert "planning 1000 layers" in seen[1], seen
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    tail = [line for line in rest.splitlines() if not line.startswith("eplb-plan: planning: layers")]
    assert tail == ["eplb-plan: interrupted, no plan written"], rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.npy"]


def test_load_sums_a_recordings_parts(capsys, tmp_path):
    """``--load trace.npz trace.part1.npz trace.part2.npz``: every window of every part, as
    one load of their sum would give."""
    from eplb_service.trace import TraceRecorder

    rng = np.random.default_rng(0)
    trace = str(tmp_path / "trace.npz")
    windows = [rng.integers(0, 500, size=(2, 8)).astype(float) for _ in range(8)]
    rec = TraceRecorder(trace, num_layers=2, num_logical=8, world_size=1, part_bytes=3 * windows[0].nbytes)
    for k, window in enumerate(windows):
        rec.add(window, 10 * k, 10 * k + 10, epoch=0, rank=0)
        rec.flush()
    rec.flush(close_all=True)
    assert len(rec.files) == 3
    np.save(tmp_path / "sum.npy", np.sum(windows, axis=0))
    args = ["--ranks", "4", "--redundant", "4"]
    code, expected, _ = run_cli(capsys, "--load", str(tmp_path / "sum.npy"), *args)
    assert code == 0
    code, out, err = run_cli(capsys, "--load", *rec.files, *args)
    assert code == 0 and err == "" and out == expected


def test_load_parts_that_cannot_be_summed_are_skipped_by_name(capsys, tmp_path):
    good = [tmp_path / "a.npy", tmp_path / "b.json"]
    np.save(good[0], np.array([[1.0, 2.0, 3.0, 4.0]]))
    good[1].write_text(json.dumps([[4, 3, 2, 1]]))
    broken = tmp_path / "trace.part2.npz"
    broken.write_bytes(b"PK\x03\x04 cut short")
    other = tmp_path / "other.npy"
    np.save(other, np.ones((2, 4)))
    np.save(tmp_path / "sum.npy", np.array([[5.0, 5.0, 5.0, 5.0]]))
    code, expected, _ = run_cli(capsys, "--load", str(tmp_path / "sum.npy"), "--ranks", "2")
    link = tmp_path / "link.npy"  # the same file under another name: summed once, like a repeated path
    link.symlink_to(good[0])
    files = [str(good[0]), str(broken), str(good[1]), str(other), str(good[0]), str(link)]
    code, out, err = run_cli(capsys, "--load", *files, "--ranks", "2")
    assert code == 0 and out == expected
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert lines[3] == f"eplb-plan: warning: --load {link} skipped: the same file as {good[0]}, already summed"
    assert lines[0].startswith("eplb-plan: warning: --load") and str(broken) in lines[0]
    assert "damaged .npz file" in lines[0] and lines[0].endswith("; skipped")
    assert lines[1] == (
        f"eplb-plan: warning: --load {other} skipped: shape (2, 4), expected (1, 4) (the shape of {good[0]})"
    )
    assert lines[2] == f"eplb-plan: warning: --load {good[0]} skipped: the same file as {good[0]}, already summed"


def test_load_parts_none_readable_is_an_error(capsys, tmp_path):
    missing = [str(tmp_path / "gone.npz"), str(tmp_path / "gone.part1.npz")]
    code, out, err = run_cli(capsys, "--load", *missing, "--ranks", "2")
    assert code == 2 and out == ""
    assert err.count("eplb-plan: warning") == 2 and err.splitlines()[-1] == (
        "eplb-plan: error: --load: none of its 2 files could be read (the warnings above say why)"
    )


def _json_lines(err: str) -> list[dict]:
    """Every stderr line as a JSON object (fails on a line that is not one)."""
    return [json.loads(line) for line in err.splitlines()]


def test_log_format_json_makes_every_stderr_line_a_json_object(capsys, tmp_path, load_json):
    """Before, eplb-plan had no --log-format and wrote bare text lines whatever the service's logs were."""
    missing = tmp_path / "missing.npy"
    code, out, err = run_cli(
        capsys, "--load", load_json, str(missing), "--ranks", "4", "--progress", "--log-format", "json"
    )
    assert code == 0 and json.loads(out)["num_ranks"] == 4
    lines = _json_lines(err)
    assert {line["tag"] for line in lines} == {"plan"} and {line["logger"] for line in lines} == {"eplb-plan"}
    assert [line["msg"] for line in lines if line["level"] == "WARNING"] == [
        f"--load {missing}: No such file or directory; skipped"
    ]
    assert lines[-1]["level"] == "INFO" and lines[-1]["msg"].startswith("done (")
    code, out, err = run_cli(capsys, "--load", str(missing), "--ranks", "4", "--log-format", "json")
    (line,) = _json_lines(err)
    assert code == 2 and out == "" and line["level"] == "CRITICAL"
    assert line["msg"] == f"--load {missing}: No such file or directory"
    code, _, err = run_cli(capsys, "--load", load_json, "--ranks", "0", "--log-format", "json")
    (line,) = _json_lines(err)  # an argparse error, found before the flag itself is parsed
    assert code == 2 and "argument --ranks: expected an integer >= 1, got '0'" in line["msg"]


def test_log_format_comes_from_the_environment_and_a_bad_one_is_named(capsys, monkeypatch, load_json):
    """Before, eplb-plan ignored EPLB_SERVICE_LOG_FORMAT, which every other command of the service reads."""
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", " JSON")
    code, _, err = run_cli(capsys, "--load", load_json, "--ranks", "5")
    (line,) = _json_lines(err)
    assert code == 2 and line["tag"] == "plan" and "--ranks 5 does not divide the 12 slots" in line["msg"]
    code, _, err = run_cli(capsys, "--load", load_json, "--ranks", "5", "--log-format", "text")  # the flag wins
    assert code == 2 and err.startswith("eplb-plan: error: --ranks 5 does not divide")
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "xml")
    code, out, err = run_cli(capsys, "--load", load_json, "--ranks", "4")
    assert code == 2 and out == ""
    assert err == "eplb-plan: error: EPLB_SERVICE_LOG_FORMAT='xml' is not a log format; expected 'text' or 'json'\n"


def test_ctrl_c_under_json_is_one_json_line(capsys, monkeypatch, load_json):
    from eplb_service.coordinator import plan_cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_cli, "plan_document", interrupted)
    code, out, err = run_cli(capsys, "--load", load_json, "--ranks", "4", "--log-format", "json")
    (line,) = _json_lines(err)
    assert code == 130 and out == "" and line["msg"] == "interrupted, no plan written" and line["tag"] == "plan"


def test_layer_progress_is_throttled_but_shows_the_first_and_the_last_block():
    """One layer-count line per ``interval_s`` at most (a line per layer is thousands of lines for a
    large model), yet always the first and the last, even when the last is not due."""
    import io

    from eplb_service.coordinator.plan_progress import PlanProgress

    now = [0.0]
    stream = io.StringIO()
    progress = PlanProgress(stream, enabled=True, interval_s=1.0, clock=lambda: now[0])
    for done in range(91):
        now[0] = done / 20  # 20 layers a second: a line is due every 20 layers
        progress.layers(done, 90)
    shown = [line.split("layers ")[1].split(" ")[0] for line in stream.getvalue().splitlines()]
    assert shown == ["0/90", "20/90", "40/90", "60/90", "80/90", "90/90"], stream.getvalue()


def test_balancedness_before_is_the_current_placements(capsys, load_json):
    """``per_layer_before`` is each layer under the placement the plan starts from (vLLM's initial
    one here), not under the plan's own."""
    from eplb_service.placement import initial_phy2log, layer_balancedness, rank_loads

    code, out, _ = run_cli(capsys, "--load", load_json, "--ranks", "4", "--redundant", "4")
    doc = json.loads(out)
    load = np.array(README_WEIGHT, dtype=np.float64)
    before = layer_balancedness(rank_loads(initial_phy2log(PlacementShape(2, 12, 16, 4)), load, 4))
    after = layer_balancedness(rank_loads(np.array(doc["phy2log"]), load, 4))
    assert code == 0 and doc["balancedness"]["per_layer_before"] == pytest.approx(before.tolist())
    assert doc["balancedness"]["per_layer"] == pytest.approx(after.tolist())
    assert doc["balancedness"]["per_layer_before"] != pytest.approx(doc["balancedness"]["per_layer"])
