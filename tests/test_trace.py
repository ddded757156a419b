"""Load traces: record from a live coordinator, replay through the simulation, plan from them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.sim.deployment import SimulationOptions, run_simulation
from eplb_service.sim.workload import SimModelConfig, popularity, shape_for_trace
from eplb_service.trace import TraceError, TraceRecorder, load_trace


def test_recorder_closes_windows_when_every_rank_moved_on_and_round_trips(tmp_path):
    path = str(tmp_path / "t.npz")
    rec = TraceRecorder(path, num_layers=1, num_logical=2, world_size=2)
    rec.add(np.array([[1.0, 2.0]]), 0, 10, epoch=0, rank=0)
    rec.add(np.array([[3.0, 4.0]]), 0, 10, epoch=0, rank=1)
    rec.add(np.array([[5.0, 0.0]]), 10, 20, epoch=1, rank=0)
    assert rec.windows == 0  # window [0,10) closes only once both ranks reported [10,20)
    rec.add(np.array([[5.0, 0.0]]), 10, 20, epoch=1, rank=1)
    assert rec.windows == 1
    rec.flush(close_all=True)
    trace = load_trace(path)
    assert trace.num_windows == 2
    assert trace.loads.tolist() == [[[4.0, 6.0]], [[10.0, 0.0]]]
    assert trace.step_begin.tolist() == [0, 10] and trace.epoch.tolist() == [0, 1]
    assert trace.ranks_reported.tolist() == [2, 2]
    assert trace.aggregate().tolist() == [[14.0, 6.0]]
    assert [trace.window_at(s) for s in (0, 9, 10, 19, 20, 35)] == [0, 0, 1, 1, 0, 1]


def test_a_long_recording_goes_on_in_parts_and_keeps_only_the_current_part_in_memory(tmp_path):
    """Before: every window of the deployment stayed in memory and every flush rewrote all of
    them into one file (tens of GB a day at 60 layers of 512 experts)."""
    from eplb_service.trace import part_path

    path = str(tmp_path / "t.npz")
    window_bytes = np.zeros((1, 2)).nbytes
    rec = TraceRecorder(path, num_layers=1, num_logical=2, world_size=1, part_bytes=3 * window_bytes)
    for k in range(8):  # one rank: a window closes when the next one's report comes
        rec.add(np.array([[float(k), 1.0]]), 10 * k, 10 * k + 10, epoch=0, rank=0)
        rec.flush()
        assert len(rec._closed) < 3, "a full part is written out and dropped from memory"
    rec.flush(close_all=True)
    assert rec.files == [path, part_path(path, 1), part_path(path, 2)] and rec.windows == 8
    assert part_path(path, 2) == str(tmp_path / "t.part2.npz")
    traces = [load_trace(f) for f in rec.files]
    assert [t.num_windows for t in traces] == [3, 3, 2]
    begins = [b for t in traces for b in t.step_begin.tolist()]
    assert begins == [10 * k for k in range(8)], "every window once, in order, none lost at a part's end"
    assert [v for t in traces for v in t.loads[:, 0, 0].tolist()] == [float(k) for k in range(8)]


def test_overlapping_windows_the_recorder_writes_still_load(tmp_path):
    """Ranks whose report boundaries differ (report_interval_steps takes effect at each rank's
    Welcome) give overlapping windows of one rank each; the reader takes what the recorder writes."""
    path = str(tmp_path / "t.npz")
    rec = TraceRecorder(path, num_layers=1, num_logical=2, world_size=2)
    rec.add(np.array([[1.0, 2.0]]), 30, 62, epoch=0, rank=1)
    rec.add(np.array([[3.0, 4.0]]), 20, 52, epoch=0, rank=0)
    rec.flush(close_all=True)
    trace = load_trace(path)
    assert trace.step_begin.tolist() == [20, 30] and trace.step_end.tolist() == [52, 62]
    assert trace.ranks_reported.tolist() == [1, 1]


def test_bad_traces_are_named(tmp_path):
    np.savez(tmp_path / "a.npz", loads=np.zeros((1, 1, 1)))
    with pytest.raises(TraceError, match=r"lacks arrays \['format_version'"):
        load_trace(str(tmp_path / "a.npz"))
    good = dict(
        format_version=np.int64(2),
        loads=np.zeros((1, 1, 2)),
        step_begin=np.zeros(1, np.int64),
        step_end=np.ones(1, np.int64),
        epoch=np.zeros(1, np.int64),
        ranks_reported=np.ones(1, np.int64),
        unix_time_s=np.zeros(1),
    )
    np.savez(tmp_path / "b.npz", **good)
    with pytest.raises(TraceError, match="format_version 2"):
        load_trace(str(tmp_path / "b.npz"))
    good.update(format_version=np.int64(1), loads=-np.ones((1, 1, 2)))
    np.savez(tmp_path / "c.npz", **good)
    with pytest.raises(TraceError, match=">= 0"):
        load_trace(str(tmp_path / "c.npz"))
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(str(tmp_path / "missing.npz"))


# Recording, replaying and planning do not depend on the deployment's size; 2 ranks start and
# step in about half the time of 4 (each rank is a process importing torch).
WORLD = 2


def test_record_replay_and_plan_from_a_trace(tmp_path):
    trace_path = str(tmp_path / "trace.npz")
    base = CoordinatorConfig(world_size=WORLD, rebalance_interval_steps=60, min_window_steps=30, record_path=trace_path)
    recorded = run_simulation(SimulationOptions(world_size=WORLD, steps=240, seed=3), base)
    assert recorded["output_mismatches"] == 0
    trace = load_trace(trace_path)
    assert trace.num_windows >= 20 and trace.loads.shape[1:] == (4, 32)
    assert (trace.ranks_reported == WORLD).all()
    # each window holds every token-expert pair the ranks routed: ranks x 32 tokens x top-2 x 10 steps
    assert np.allclose(trace.loads[0].sum(axis=1), WORLD * 32 * 2 * 10)

    model = shape_for_trace(SimModelConfig(trace_path=trace_path), WORLD)
    assert (model.num_layers, model.num_logical) == (4, 32) and (model.num_logical + model.num_redundant) % WORLD == 0
    window = trace.window_at(15)
    assert np.allclose(popularity(model, 0, 2, 15), trace.loads[window, 2] / trace.loads[window, 2].sum())

    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "eplb_service.coordinator.plan_cli",
            "--load",
            trace_path,
            "--ranks",
            str(WORLD),
            "--redundant",
            str(model.num_redundant),
            "--out",
            str(tmp_path / "seed.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    seed = json.loads((tmp_path / "seed.json").read_text())
    assert seed["balancedness"]["overall"] > seed["balancedness"]["before"]

    seeded = CoordinatorConfig(
        world_size=WORLD, rebalance_interval_steps=10**6, initial_placement=np.array(seed["phy2log"])
    )
    # 500 steps: the seed waits for the first moment planning is allowed (load window, side
    # communicator, step clocks), and a 200-step run starts no plan after step 132; on the 2-core
    # CI machine with other tests beside it, one 200-step run committed nothing.
    replay = run_simulation(SimulationOptions(world_size=WORLD, steps=500, seed=3, model=model), seeded)
    assert replay["output_mismatches"] == 0 and replay["committed"] >= 1 and replay["aborted"] == 0
    assert replay["balancedness_final"] > replay["balancedness_initial"]


def test_concurrent_flushes_never_leave_a_broken_trace(tmp_path):
    """The coordinator's periodic flush runs in an executor thread and its shutdown flush on the
    loop: seen overlapping once in CI, leaving a trace np.load refused."""
    import threading

    path = str(tmp_path / "trace.npz")
    recorder = TraceRecorder(path, num_layers=8, num_logical=64, world_size=2)
    rng = np.random.default_rng(0)
    for w in range(200):
        for rank in range(2):
            recorder.add(rng.random((8, 64)), 10 * w, 10 * w + 10, 0, rank)
    errors: list[BaseException] = []

    def flush_many() -> None:
        try:
            for _ in range(15):
                recorder.flush()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=flush_many) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert load_trace(path).num_windows == recorder.windows >= 199


def test_a_rank_that_stops_reporting_does_not_keep_every_later_window_open(tmp_path):
    """Before: a window closed only once every rank had reported past it, so after one rank left
    (or with ranks whose report boundaries differ) every window stayed open in memory, an
    ``[L, N_log]`` array each, and none reached the periodic flush. Now a window also closes once
    reports begin ``OPEN_WINDOW_STEPS`` past its end, with the ranks it got."""
    from eplb_service.trace import OPEN_WINDOW_STEPS

    path = str(tmp_path / "t.npz")
    rec = TraceRecorder(path, num_layers=1, num_logical=2, world_size=2)
    for i in range(1000):  # rank 1 is gone: only rank 0 reports
        rec.add(np.array([[1.0, 0.0]]), 10 * i, 10 * i + 10, epoch=0, rank=0)
    assert len(rec._open) <= OPEN_WINDOW_STEPS // 10 + 2
    rec.flush()
    trace = load_trace(path)
    assert trace.num_windows == rec.windows >= 1000 - OPEN_WINDOW_STEPS // 10 - 2
    assert set(trace.ranks_reported.tolist()) == {1} and trace.step_begin.tolist()[:2] == [0, 10]


def test_a_recorded_trace_keeps_layers_and_experts_apart_and_refuses_a_window_one_step_backwards(tmp_path):
    """A 2-layer, 3-expert recording reads back ``[W, L, N]`` entry for entry (a one-layer trace
    cannot tell ``[L, N]`` from its transpose), and a window ``[11, 10)`` is refused like any
    window whose steps run backwards."""
    path = str(tmp_path / "t.npz")
    rec = TraceRecorder(path, num_layers=2, num_logical=3, world_size=1)
    load = np.arange(6, dtype=np.float64).reshape(2, 3)
    rec.add(load, 0, 10, epoch=0, rank=0)
    rec.flush(close_all=True)
    trace = load_trace(path)
    assert trace.loads.shape == (1, 2, 3) and trace.loads[0].tolist() == load.tolist()
    arrays = dict(np.load(path))
    arrays.update(step_begin=np.array([11], np.int64), step_end=np.array([10], np.int64))
    np.savez(tmp_path / "backwards.npz", **arrays)
    with pytest.raises(TraceError, match=r"window 0 covers steps \[11, 10\), which runs backwards"):
        load_trace(str(tmp_path / "backwards.npz"))
