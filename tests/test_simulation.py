"""The embedded default: the simulated deployment end to end (coordinator + agent processes)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from child_signals import terminal_defaults

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.placement import PlacementShape
from eplb_service.sim.deployment import SimulationOptions, measured_balancedness, run_simulation
from eplb_service.sim.workload import SimModelConfig


def test_short_simulation_commits_improves_balance_and_never_mismatches(tmp_path):
    model = SimModelConfig(drift_interval_steps=120)
    opts = SimulationOptions(
        world_size=4,
        steps=480,
        seed=1,
        model=model,
        summary_json=str(tmp_path / "s.json"),
        plot=str(tmp_path / "p.png"),
    )
    base = CoordinatorConfig(world_size=4, rebalance_interval_steps=60, min_window_steps=30, load_half_life_steps=60.0)
    summary = run_simulation(opts, base)
    assert summary["output_mismatches"] == 0
    assert summary["committed"] >= 3, summary
    assert summary["aborted"] == 0 and summary["diverged"] == 0 and summary["errors"] == []
    assert summary["maps_identical_on_all_ranks"] and summary["maps_match_coordinator"] is True
    assert summary["balancedness_final"] > summary["balancedness_initial"]
    # the same tokens under the initial maps: what rebalancing bought
    assert summary["balancedness_final"] > summary["balancedness_final_without_rebalancing"]
    assert summary["bytes_moved"] > 0 and summary["experts_moved"] > 0
    on_disk = json.loads((tmp_path / "s.json").read_text())
    for key in (
        "committed",
        "aborted",
        "output_mismatches",
        "balancedness_initial",
        "balancedness_final",
        "bytes_moved",
    ):
        assert on_disk[key] == summary[key]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_balancedness_is_mean_over_max_of_summed_windows():
    recv = np.zeros((2, 4, 1), dtype=np.int64)  # [ranks, steps, layers]
    recv[0, :, 0] = 3
    recv[1, :, 0] = 1
    assert measured_balancedness(recv, 0, 4) == (12 + 4) / 2 / 12
    recv[1, 2:, 0] = 3
    assert measured_balancedness(recv, 2, 4) == 1.0


def _rank_result(
    rank: int, mismatches: int, received: int, sent_to: list[int], phy2log, error=None, epoch: int = 0
) -> dict:
    """One rank's result as ``serving_loop`` reports it, for 10 steps of 1 layer."""
    return {
        "rank": rank,
        "mismatches": mismatches,
        "recv_counts": [[received]] * 10,
        "ref_sent": [[sent_to]] * 10,
        "phy2log": phy2log,
        "epoch": epoch,
        "error": error,
        "commit_stall_max_us": 10.0 * (rank + 1),
        "step_time_p50_ms": 1.0,
        "step_time_p99_ms": 2.0 + rank,
    }


def _summarised_coordinator(**overrides):
    """A stand-in for what ``_summary`` reads of the coordinator: by default no plan moved
    anything, nothing halted, and the ranks never agreed on a placement."""
    from types import SimpleNamespace

    fields = {
        "counts": {"proposed": 0, "committed": 0, "aborted": 0, "diverged": 0, "skipped": 0},
        "outcomes": [],
        "bytes_moved_total": 0,
        "experts_moved_total": 0,
        "epoch": 0,
        "halted_reason": None,
        "book": SimpleNamespace(placements={}),
    }
    return SimpleNamespace(**{**fields, **overrides})


def test_the_summary_adds_up_every_rank_and_takes_the_plan_counts_from_the_coordinator():
    """The summary's numbers, from known rank results: mismatches and errors of every rank (not one),
    maps compared across ranks, plans counted by outcome, and the no-rebalancing reference routed
    from every source rank."""
    from types import SimpleNamespace

    from eplb_service.sim.deployment import _summary

    outcomes = [
        SimpleNamespace(phase="committed", code="", commit_step=40),
        SimpleNamespace(phase="aborted", code="fence_timeout", commit_step=-1),
        SimpleNamespace(phase="committed", code="", commit_step=80),
    ]
    coordinator = _summarised_coordinator(
        counts={"proposed": 5, "committed": 2, "aborted": 1, "diverged": 0, "skipped": 4},
        outcomes=outcomes,
        bytes_moved_total=1 << 20,
        experts_moved_total=6,
        epoch=2,
    )
    ranks = [
        _rank_result(0, 3, received=4, sent_to=[4, 0], phy2log=[[0, 1]]),
        _rank_result(1, 5, received=2, sent_to=[0, 2], phy2log=[[1, 0]], error="rank 1: RuntimeError: boom"),
    ]
    opts = SimulationOptions(world_size=2, steps=10)
    summary = _summary(opts, coordinator, ranks, wall_s=1.0)
    assert summary["output_mismatches"] == 8
    assert summary["errors"] == ["rank 1: RuntimeError: boom"]
    assert summary["maps_identical_on_all_ranks"] is False
    assert (summary["committed"], summary["aborted"], summary["skipped_no_gain"]) == (2, 1, 4)
    assert summary["abort_codes"] == ["fence_timeout"] and summary["commit_steps"] == [40, 80]
    # received 4 and 2: mean 3 / max 4; the reference: rank 0 sent 4 to rank 0, rank 1 sent 2 to rank 1
    assert summary["balancedness_initial"] == summary["balancedness_final"] == 0.75
    assert summary["balancedness_final_without_rebalancing"] == 0.75
    assert summary["commit_stall_max_us"] == 20.0 and summary["step_time_p99_ms"] == 3.0
    ranks[1]["phy2log"] = [[0, 1]]
    assert _summary(opts, coordinator, ranks, wall_s=1.0)["maps_identical_on_all_ranks"] is True
    assert summary["maps_match_coordinator"] is None  # the coordinator holds no agreed placement


def test_the_summary_holds_every_ranks_map_against_the_coordinators_placement():
    """Identical maps on all ranks prove nothing if each rank reported a map it no longer serves
    (its initial one, say): every rank's map and epoch must be the coordinator's agreed ones."""
    from types import SimpleNamespace

    from eplb_service.sim.deployment import _summary

    coordinator = _summarised_coordinator(
        counts={"proposed": 1, "committed": 1, "aborted": 0, "diverged": 0, "skipped": 0},
        epoch=1,
        book=SimpleNamespace(placements={0: np.array([[0, 1]]), 1: np.array([[1, 0]])}),
    )
    opts = SimulationOptions(world_size=2, steps=10)

    def summary_of(*maps_and_epochs) -> dict:
        ranks = [
            _rank_result(r, 0, received=1, sent_to=[1, 0], phy2log=m, epoch=e)
            for r, (m, e) in enumerate(maps_and_epochs)
        ]
        return _summary(opts, coordinator, ranks, wall_s=1.0)

    assert summary_of(([[1, 0]], 1), ([[1, 0]], 1))["maps_match_coordinator"] is True
    stale = summary_of(([[0, 1]], 0), ([[0, 1]], 0))  # both still on the epoch before the commit
    assert stale["maps_identical_on_all_ranks"] is True and stale["maps_match_coordinator"] is False
    assert summary_of(([[1, 0]], 1), ([[0, 1]], 1))["maps_match_coordinator"] is False  # right epoch, old map
    coordinator.epoch = -1  # the ranks never agreed on a placement: nothing to hold them against
    assert summary_of(([[1, 0]], 1), ([[1, 0]], 1))["maps_match_coordinator"] is None


@pytest.mark.parametrize("reported", [[0], [0, 0], [1, 0], [0, 1, 2]], ids=["missing", "twice", "unsorted", "extra"])
def test_no_summary_is_made_of_results_that_do_not_cover_every_rank_once(reported):
    """A summary of some ranks counts their mismatches and errors only and calls their maps
    identical on all ranks; it is refused instead, naming the ranks it had."""
    from eplb_service.sim.deployment import IncompleteResults, _summary

    coordinator = _summarised_coordinator()
    ranks = [_rank_result(r, 0, received=1, sent_to=[1, 0], phy2log=[[0, 1]]) for r in reported]
    expected = f"results from ranks {reported}, expected one from each of ranks 0 to 1"
    with pytest.raises(IncompleteResults, match=re.escape(expected)):
        _summary(SimulationOptions(world_size=2, steps=10), coordinator, ranks, wall_s=1.0)


def test_cli_rejects_bad_values_naming_them():
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "0", "--simulate"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "expected a positive integer, got 0" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", "http://x"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "'http://x' must start with ipc:// or tcp://" in out.stderr


@pytest.mark.parametrize("dp, tp", [(3, 1), (2, 3), (64, 1), (8, 1)])
def test_any_rank_count_gets_a_simulated_model_whose_slots_it_can_spread(monkeypatch, capsys, dp, tp):
    """Before: ``--dp 3 --simulate`` started 3 rank processes that each died with a
    ``PlacementError`` traceback (the model's 40 slots do not spread over 3 ranks), then the CLI
    itself ended in a ``RankProcessesDied`` traceback. Now the simulated model gets the fewest
    redundant slots, at least its default 8, that spread evenly."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    seen = {}

    def run_simulation(opts, cfg):
        seen["model"] = opts.model
        return {"output_mismatches": 0, "diverged": 0, "errors": []}

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    monkeypatch.setattr(cli, "available_memory_bytes", lambda: 2**40)  # the shape is the question here
    assert cli.main(["--dp", str(dp), "--tp", str(tp), "--simulate", "--steps", "1"]) == 0
    model, default = seen["model"], SimModelConfig()
    shape = PlacementShape(model.num_layers, model.num_logical, model.num_logical + model.num_redundant, dp * tp)
    assert default.num_redundant <= model.num_redundant < default.num_redundant + dp * tp, shape
    assert (model.num_layers, model.num_logical) == (default.num_layers, default.num_logical)


def test_a_step_count_the_simulation_cannot_hold_is_refused_at_once(monkeypatch, capsys):
    """Every simulated rank keeps a record of every step (``[steps, layers, ranks]`` int64 and
    more, summed in the parent): ``--steps 100000000`` asked tens of GB of every rank after a
    10-40 s start, and ``--steps 1e23``-sized counts died in numpy, a traceback per rank."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    def run_simulation(opts, cfg):
        raise AssertionError(f"a simulation of {opts.steps} steps was started")

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    for steps in ("100000000", "99999999999999999999999"):
        try:
            code = cli.main(["--dp", "2", "--simulate", "--steps", steps])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and f"argument --steps: expected at most {cli.SIM_MAX_STEPS} steps, got {steps}" in err, err


def test_dead_rank_processes_end_the_simulation_in_one_line_not_a_traceback(monkeypatch, capsys):
    """The ranks log their own errors; the CLI then added a ``RankProcessesDied`` traceback of
    its own, which said nothing more and buried the ranks' reasons above it."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment
    from eplb_service.sim.processes import RankProcessesDied

    def run_simulation(opts, cfg):
        raise RankProcessesDied("rank processes died: [('sim-rank-0', 1)]")

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    code = cli.main(["--dp", "2", "--simulate", "--steps", "10"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "eplb-coordinator: error: the simulation stopped: rank processes died: [('sim-rank-0', 1)]" in err
    assert "each rank's error is logged above" in err


def test_a_run_too_short_for_any_plan_says_why(caplog):
    """Before: a run whose steps ended before the coordinator's first plan reported
    ``committed 0`` with no word why (seen with a small, fast trace and ``--steps 300``)."""
    from types import SimpleNamespace

    from eplb_service.sim.deployment import SimulationOptions, _say_if_nothing_was_tried

    cfg = CoordinatorConfig(world_size=2, rebalance_interval_steps=100, min_window_steps=40)
    opts = SimulationOptions(world_size=2, steps=300)
    counts = {"committed": 0, "aborted": 0, "diverged": 0, "proposed": 0, "skipped": 0}
    idle = SimpleNamespace(counts=counts, halted_reason=None, drain_at_step=216)
    with caplog.at_level("WARNING", logger="eplb_service.sim.deployment"):
        _say_if_nothing_was_tried(idle, opts, cfg, 4.2)
        (line,) = [r.getMessage() for r in caplog.records]
        assert line.startswith("no plan was tried in 300 steps (4.2s)")
        assert "40 steps of load" in line and "every 100 steps" in line and "after step 216" in line
        caplog.clear()
        for tried in ({**counts, "skipped": 1}, {**counts, "proposed": 1}):  # a plan evaluated: nothing to say
            _say_if_nothing_was_tried(
                SimpleNamespace(counts=tried, halted_reason=None, drain_at_step=216), opts, cfg, 1
            )
        _say_if_nothing_was_tried(SimpleNamespace(counts=counts, halted_reason="x", drain_at_step=216), opts, cfg, 1)
        assert not caplog.records  # a halt says why itself


def test_a_simulation_that_cannot_fit_in_memory_is_refused_before_it_starts(monkeypatch, capsys):
    """Before: ``--simulate --dp 128`` started 128 rank processes (each imports torch, ~250 MiB)
    whatever the machine had, and the out-of-memory killer ended ranks mid-run."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    def run_simulation(opts, cfg):
        raise AssertionError(f"a simulation of {opts.world_size} ranks was started")

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    monkeypatch.setattr(cli, "available_memory_bytes", lambda: 8 * 2**30)
    code = cli.main(["--dp", "64", "--tp", "2", "--simulate"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (
        "--simulate with 128 ranks starts 128 processes of about 300.0 MiB each (37.50 GiB), more than the "
        "8.00 GiB this machine has available; expected --dp x --tp of at most 27 here"
    ) in err
    assert cli.sim_memory_problem(27, 8 * 2**30) is None and cli.sim_memory_problem(8, None) is None


def _captured_simulation(monkeypatch) -> dict:
    """``run_simulation`` replaced by one that records what the CLI asked of it."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    seen: dict = {}

    def run_simulation(opts, cfg):
        seen["opts"], seen["cfg"] = opts, cfg
        return {"output_mismatches": 0, "diverged": 0, "errors": []}

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    monkeypatch.setattr(cli, "available_memory_bytes", lambda: 2**40)
    return seen


def test_a_chosen_endpoint_is_where_the_simulation_binds(monkeypatch, tmp_path, capsys):
    """Before: ``--simulate --endpoint E`` bound a private temporary socket instead, silently, so
    ``eplb-coordinator status --endpoint E`` found nothing. Without ``--endpoint`` it stays private."""
    from eplb_service.coordinator import cli

    seen = _captured_simulation(monkeypatch)
    endpoint = f"ipc://{tmp_path}/run/c.sock"
    assert cli.main(["--dp", "2", "--simulate", "--steps", "1", "--endpoint", endpoint]) == 0
    assert seen["opts"].coordinator_endpoint == endpoint == seen["cfg"].endpoint
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700  # claimed as the daemon claims it
    assert cli.main(["--dp", "2", "--simulate", "--steps", "1"]) == 0
    assert seen["opts"].coordinator_endpoint is None  # run_simulation's private temporary socket


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--curve-dir", "KEYS"], "--curve-dir 'KEYS' with --simulate: the simulated ranks run on this host without"),
        (["--endpoint", "tcp://*:5555"], "--endpoint 'tcp://*:5555' with --simulate: the simulated ranks connect"),
        (["--endpoint", "tcp://10.0.0.1:5555", "--insecure"], "expected ipc://PATH or a loopback tcp://127.0.0.1"),
    ],
)
def test_an_endpoint_the_simulated_ranks_cannot_reach_is_refused(flags, expected, monkeypatch, tmp_path, capsys):
    """Before: ``--simulate --curve-dir K`` put CURVE on the coordinator's socket, the ranks (no keys)
    never registered, and the run served its steps with no plan and exited 0 as if it had worked."""
    from eplb_service.coordinator import cli
    from eplb_service.security import generate_keys

    generate_keys(str(tmp_path / "keys"))
    monkeypatch.chdir(tmp_path)
    seen = _captured_simulation(monkeypatch)
    argv = ["--dp", "2", "--simulate", *[str(tmp_path / "keys") if f == "KEYS" else f for f in flags]]
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected.replace("KEYS", str(tmp_path / "keys")) in err, err
    assert "opts" not in seen


class _Stdout(io.StringIO):
    """A stdout whose writes fail with ``error``, as a closed pipe or a full disk makes them fail."""

    def __init__(self, error: OSError, fd: int) -> None:
        super().__init__()
        self.error, self.fd = error, fd

    def write(self, text: str) -> int:
        raise self.error

    def fileno(self) -> int:
        return self.fd  # stdout.py points it at /dev/null: a scratch file's descriptor, not the test's


def test_the_summary_into_a_closed_pipe_or_a_full_disk_is_no_traceback(monkeypatch, tmp_path, capsys):
    """Before: ``--simulate | head`` ended the run in a ``BrokenPipeError`` traceback after its last
    step, and ``> /dev/full`` in an ``OSError`` one. A closed pipe keeps the run's verdict as the
    exit status; a full disk is one line, exit 1."""
    from eplb_service.coordinator import cli

    _captured_simulation(monkeypatch)
    with open(tmp_path / "scratch", "w") as scratch:
        monkeypatch.setattr(sys, "stdout", _Stdout(BrokenPipeError(32, "Broken pipe"), scratch.fileno()))
        assert cli.main(["--dp", "2", "--simulate", "--steps", "1"]) == 0
        assert capsys.readouterr().err == ""
        monkeypatch.setattr(sys, "stdout", _Stdout(OSError(28, "No space left on device"), scratch.fileno()))
        assert cli.main(["--dp", "2", "--simulate", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err == "eplb-coordinator: error: the summary: cannot write to stdout: No space left on device\n", err


def test_the_summary_measures_balancedness_on_the_first_and_last_tenth_exactly():
    """Each window of 20 steps gets a load of its own, so a window shifted by one step, the whole run
    taken as a window, or the no-rebalancing figure read from the served counts all show."""
    from eplb_service.sim.deployment import _summary

    steps = 20  # tenths of 2 steps
    received = np.array([[3, 1]] * steps)  # [steps, ranks]: 2/3 in the middle
    received[:2] = [4, 0]  # first tenth: 0.5
    received[-2:] = [2, 2]  # last tenth: 1.0
    reference = np.array([[4, 0]] * steps)  # [steps, dst] as routed by the initial maps
    reference[-2:] = [3, 2]  # last tenth: 2.5 / 3
    ranks = []
    for rank in range(2):
        sent = np.zeros((steps, 1, 2), dtype=np.int64)  # [steps, L, dst]: rank 0 sends it all
        if rank == 0:
            sent[:, 0, :] = reference
        ranks.append(
            {
                **_rank_result(rank, 0, received=0, sent_to=[0, 0], phy2log=[[0, 1]]),
                "recv_counts": received[:, rank : rank + 1].tolist(),  # [steps, L]
                "ref_sent": sent.tolist(),
            }
        )
    coordinator = _summarised_coordinator()
    summary = _summary(SimulationOptions(world_size=2, steps=steps), coordinator, ranks, wall_s=1.0)
    assert summary["balancedness_initial"] == 0.5
    assert summary["balancedness_final"] == 1.0
    assert summary["balancedness_final_without_rebalancing"] == round(2.5 / 3, 4)


@pytest.mark.parametrize(
    "failure",
    [
        {"output_mismatches": 3},
        {"diverged": 1},
        {"errors": ["rank 1: RuntimeError: boom"]},
        {"halted": "x"},
        {"maps_identical_on_all_ranks": False},
        {"maps_match_coordinator": False},
    ],
    ids=["mismatch", "diverged", "rank-error", "halted", "maps-differ", "maps-not-the-coordinators"],
)
def test_the_exit_status_is_1_when_the_summary_reports_any_failure(monkeypatch, capsys, failure):
    """Checks that run ``--simulate`` trust its exit status: each failure the summary can report
    alone makes it 1 (with the summary still printed), and a clean summary makes it 0."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    monkeypatch.setattr(cli, "available_memory_bytes", lambda: 2**40)
    clean = {
        "output_mismatches": 0,
        "diverged": 0,
        "errors": [],
        "halted": None,
        "maps_identical_on_all_ranks": True,
        "maps_match_coordinator": True,
        "committed": 2,
    }
    monkeypatch.setattr(deployment, "run_simulation", lambda opts, cfg: {**clean, **failure})
    assert cli.main(["--dp", "2", "--simulate", "--steps", "1"]) == 1
    assert json.loads(capsys.readouterr().out) == {**clean, **failure}
    monkeypatch.setattr(deployment, "run_simulation", lambda opts, cfg: dict(clean))
    assert cli.main(["--dp", "2", "--simulate", "--steps", "1"]) == 0


def test_a_simulation_past_its_timeout_raises_naming_it_and_leaves_no_rank_process():
    """A run whose ranks have not all reported by ``timeout_s`` ends in an error that says so, not a
    hang and not a summary of what did report, and stops its rank processes before it returns."""
    import multiprocessing

    opts = SimulationOptions(world_size=1, steps=60, timeout_s=0.5)  # less than one rank's start
    with pytest.raises(TimeoutError, match=r"^sim-rank: only 0/1 ranks reported within 0.5s$"):
        run_simulation(opts)
    left = multiprocessing.active_children()
    for p in left:  # do not leak them into later tests when this fails
        p.kill()
    assert not left, f"rank processes left running: {left}"


def _processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment holds ``marker`` (a run's own processes, its rank processes included)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _simulation_process(marker: str, *flags: str) -> subprocess.Popen:
    return _marked_process(marker, ["-m", "eplb_service.coordinator.cli", "--dp", "2", "--simulate", *flags])


def _marked_process(marker: str, python_args: list[str]) -> subprocess.Popen:
    """``python <python_args>`` in a session of its own, its environment holding ``marker``
    (:func:`_processes_with_marker` finds it and its rank processes), both streams piped."""
    import os

    env = {**os.environ, "EPLB_TEST_RUN_MARKER": marker}
    return subprocess.Popen(
        [sys.executable, *python_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=terminal_defaults,  # the tests signal it: not with a signal pytest may ignore
    )


class _StreamsRead:
    """A process's stdout and stderr read as they come (by threads), so that a test can wait for a
    line the process logs and still get all of both streams at the end."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((proc.stdout, self.out), (proc.stderr, self.err))
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for_line(self, text: str, timeout_s: float = 120.0) -> None:
        """Until stderr holds a line containing ``text`` (asserts it does within ``timeout_s``)."""
        import time

        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in list(self.err)):
            assert self.proc.poll() is None, (
                f"exited {self.proc.returncode} before {text!r}: {''.join(self.err)[-2000:]}"
            )
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s}s: {''.join(self.err)[-2000:]}"
            time.sleep(0.1)

    def finish(self, timeout_s: float) -> tuple[str, str]:
        """The process's exit awaited (raises ``TimeoutExpired`` past ``timeout_s``); both streams whole."""
        self.proc.wait(timeout=timeout_s)
        for t in self.threads:
            t.join(timeout=timeout_s)
        return "".join(self.out), "".join(self.err)


ALL_RANKS_SERVING = "all 2 agents registered; serving"
"""What the coordinator's process logs once both rank processes run (imported, registered)."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_simulation_and_every_rank_in_one_line(sig):
    """Before: SIGTERM to the coordinator's process killed it by the default action and left both
    rank processes running, blocked, for good; Ctrl-C (SIGINT to the whole process group) printed a
    KeyboardInterrupt traceback from every rank and the coordinator. Now: one line, no summary, no
    process left, exit 128 + the signal's number."""
    import os
    import secrets
    import signal as signals

    marker = secrets.token_hex(8)
    proc = _simulation_process(marker)
    try:
        streams = _StreamsRead(proc)
        # Both ranks running, not merely spawned: a signal while they start is the next test's.
        # (Counting the run's processes in /proc counted multiprocessing's resource tracker too,
        # so the signal often landed in the middle of the ranks' spawn.)
        streams.wait_for_line(ALL_RANKS_SERVING)
        number = getattr(signals, sig)
        if sig == "SIGINT":
            os.killpg(proc.pid, number)  # as a terminal's Ctrl-C does
        else:
            proc.send_signal(number)
        out, err = streams.finish(timeout_s=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
    assert proc.returncode == 128 + number, err[-2000:]
    assert f"{sig} received: stopping the simulation and its ranks (no summary)" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert out == ""
    assert _processes_with_marker(marker) == []


_SIGNAL_WHILE_RANKS_START = """
import os, signal, sys
from eplb_service.coordinator import cli
from eplb_service.sim import processes

start = processes.RankProcesses.start

def start_then_signal(self, *args):
    start(self, *args)  # every rank process exists, none has run a line of its own yet
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))

processes.RankProcesses.start = start_then_signal
sys.exit(cli.main(["--dp", "2", "--simulate", "--steps", "60"]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_ranks_start_is_not_lost(sig):
    """The signal lands inside the ranks' start, the window CI hit once: before, a SIGTERM there
    killed the coordinator's process by the default action (exit -15, a rank's spawn cut short)
    and a SIGINT there was ignored (the run went on to its end). Now either stops the run as it
    does later: one line, exit 128 + its number, no process left."""
    import os
    import secrets
    import signal as signals

    marker = secrets.token_hex(8)
    proc = _marked_process(marker, ["-c", _SIGNAL_WHILE_RANKS_START, sig])
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
    number = getattr(signals, sig)
    assert proc.returncode == 128 + number, err[-2000:]
    assert f"{sig} received: stopping the simulation and its ranks (no summary)" in err
    assert "Traceback" not in err, err[-3000:]
    assert out == ""
    assert _processes_with_marker(marker) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux's")
def test_rank_processes_end_with_a_coordinator_killed_outright():
    """SIGKILL (an OOM kill, a crash) lets the coordinator's process clean nothing up: its ranks
    used to run on, blocked on a store that was gone, for good."""
    import os
    import secrets
    import signal as signals
    import time

    marker = secrets.token_hex(8)
    proc = _simulation_process(marker)
    try:
        streams = _StreamsRead(proc)
        streams.wait_for_line(ALL_RANKS_SERVING)  # both ranks past their start, blocked in serving
        proc.kill()
        streams.finish(timeout_s=30)
        deadline = time.monotonic() + 10
        while _processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with_marker(marker) == []
    finally:
        for pid in _processes_with_marker(marker):
            os.kill(pid, signals.SIGKILL)


def test_a_taken_metrics_port_ends_the_simulation_in_one_line_not_a_hang():
    """Before: the coordinator's serve() failed to bind while the simulation waited for it to be
    ready, forever and silently; the daemon said it and exited 1."""
    import socket

    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "eplb_service.coordinator.cli",
                "--dp",
                "1",
                "--simulate",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"cannot serve HTTP on --metrics-port {port}" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_output_files_are_opened_at_start_and_a_late_failure_still_gives_the_summary(monkeypatch, tmp_path, capsys):
    """``/proc`` refuses a new file though root may write every directory (os.access said yes):
    the run went to its end, then a traceback. Now refused at once; and should the file still fail
    at the end (a full disk), the summary is on stdout and the error one line, exit 1."""
    from eplb_service.coordinator import cli
    from eplb_service.sim import deployment

    if sys.platform.startswith("linux"):
        with pytest.raises(ValueError, match=r"--summary-json '/proc/eplb-x\.json' cannot be written"):
            cli.check_output_path("--summary-json", "/proc/eplb-x.json")
    kept = tmp_path / "kept.json"
    kept.write_text("before")
    cli.check_output_path("--summary-json", str(kept))
    cli.check_output_path("--summary-json", str(tmp_path / "new.json"))
    assert kept.read_text() == "before" and not (tmp_path / "new.json").exists()

    summary = {"output_mismatches": 0, "diverged": 0, "errors": [], "committed": 3}

    def run_simulation(opts, cfg):
        raise deployment.OutputFileError(f"--summary-json {opts.summary_json}: No space left on device", summary)

    monkeypatch.setattr(deployment, "run_simulation", run_simulation)
    code = cli.main(["--dp", "2", "--simulate", "--steps", "10", "--summary-json", str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert code == 1 and json.loads(captured.out) == summary
    assert captured.err == (
        f"eplb-coordinator: error: --summary-json {tmp_path / 's.json'}: No space left on device "
        "(the summary is on stdout)\n"
    )
