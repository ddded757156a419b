"""``bench/planner.py --seeds``: one cell's numbers under several seeds, pooled, so that a reader
can tell a miss that one seed's loads drew from one the policy makes under every seed."""

import argparse
import sys

import pytest

from bench import planner
from bench.planner import (
    MATRIX_SHAPES,
    CellResult,
    SequenceResult,
    Workload,
    parse_seeds,
    pool_seeds,
    pooled_report,
    run_cell,
    run_cells,
)
from eplb_service.coordinator.policy_exact import plans_exactly, plans_locally

MIXTRAL = MATRIX_SHAPES[0]
SWAP = Workload("zipf-1.0", "swap", "low")
SLOW = Workload("zipf-1.0", "slow", "low")


def cell(workload: Workload, ds_next: float, mg_next: float, ds_moved: int, mg_moved: int) -> CellResult:
    ds = SequenceResult(0.9, ds_next, ds_moved, ds_moved, 0, 1.0)
    mg = SequenceResult(0.9, mg_next, mg_moved, mg_moved, 0, 1.0)
    return CellResult(MIXTRAL, workload, 64, 10, ds, mg, mg)


def test_pooled_balance_is_the_seeds_mean_and_slots_are_summed_before_they_are_compared():
    # seed 0 misses on balance (-0.8 pp), seed 1 passes (+0.2 pp): pooled -0.3 pp, within the line
    # slots: 30 of 100 (30%, a miss) and 10 of 200 (5%): pooled 40 of 300 = 13.3%, not (30% + 5%) / 2
    (pooled,) = pool_seeds([[cell(SWAP, 0.800, 0.792, 100, 30)], [cell(SWAP, 0.800, 0.802, 200, 10)]])
    assert pooled.balance_pp == pytest.approx(-0.3)
    assert pooled.moved_share == pytest.approx(40 / 300)
    assert pooled.meets_targets
    assert [r.meets_targets for r in pooled.results] == [False, True]
    (both_miss,) = pool_seeds([[cell(SWAP, 0.8, 0.792, 100, 10)], [cell(SWAP, 0.8, 0.793, 100, 10)]])
    assert both_miss.balance_pp == pytest.approx(-0.75) and not both_miss.meets_targets


def test_unlike_cell_lists_are_refused_naming_the_cell():
    with pytest.raises(ValueError, match=r"seed list 1 holds .*zipf-1.0, slow, low noise where the first holds"):
        pool_seeds([[cell(SWAP, 0.8, 0.8, 1, 0)], [cell(SLOW, 0.8, 0.8, 1, 0)]])
    with pytest.raises(ValueError, match=r"seed list 1 has 2 cells, the first has 1"):
        pool_seeds([[cell(SWAP, 0.8, 0.8, 1, 0)], [cell(SWAP, 0.8, 0.8, 1, 0)] * 2])
    with pytest.raises(ValueError, match="no seeds to pool"):
        pool_seeds([])


def test_the_report_counts_per_seed_and_pooled_and_rows_only_the_cells_that_miss_somewhere():
    by_seed = [
        [cell(SWAP, 0.8, 0.792, 100, 10), cell(SLOW, 0.8, 0.8, 100, 10)],
        [cell(SWAP, 0.8, 0.802, 100, 10), cell(SLOW, 0.8, 0.8, 100, 10)],
    ]
    report = pooled_report(pool_seeds(by_seed), [4, 7])
    assert report.startswith(
        "Seeds 4, 7: cells meeting both targets 1 (seed 4), 2 (seed 7) of 2; on the seeds' pooled numbers 2; "
        "under every seed 1."
    )
    rows = [line for line in report.splitlines() if line.startswith("| Mixtral")]
    assert len(rows) == 1 and "zipf-1.0, swap, low noise | -0.80 +0.20 | 10.0% 10.0% | -0.30 | 10.0% | ok |" in rows[0]


def test_each_seed_is_the_matrix_own_run_of_that_seed(capsys):
    """The pooled run's per-seed numbers are those of ``--seed k`` (the same loads), not a re-draw."""
    planner.run_pooled_matrix(
        argparse.Namespace(seeds=[0, 3], rebalances=10, progress=False, jobs=1), [(MIXTRAL, SWAP)]
    )
    out = capsys.readouterr().out
    per_seed = [run_cell(MIXTRAL, SWAP, seed=k, decayed=False) for k in (0, 3)]
    met = [int(r.meets_targets) for r in per_seed]
    assert f"cells meeting both targets {met[0]} (seed 0), {met[1]} (seed 3) of 1;" in out
    row = f"| {MIXTRAL.label} | {SWAP.label} | " + " ".join(f"{r.balance_pp:+.2f}" for r in per_seed) + " | "
    assert (row in out) == (not all(met)), out  # a row only where some seed misses
    pooled = sum(r.balance_pp for r in per_seed) / 2
    assert f"Worst pooled balance: {MIXTRAL.label}, {SWAP.label}: {pooled:+.2f} pp" in out


def test_cells_run_in_several_processes_give_the_numbers_one_process_gives(capsys):
    """``--jobs``: each cell draws its own loads, so the worker processes change no number (plan
    times aside), and the lists come back per seed in the cells' order whatever order they end in."""
    cells = [(MIXTRAL, SWAP), (MIXTRAL, SLOW)]
    one = run_cells(cells, [0, 3], rebalances=10, decayed=False)
    two = run_cells(cells, [0, 3], rebalances=10, decayed=False, jobs=2, progress=True)

    def numbers(r: CellResult) -> tuple:
        return (r.shape, r.workload, r.balance_pp, r.moved_share, r.deepseek.moved, r.migration.plan_moves)

    assert [[numbers(r) for r in seed] for seed in two] == [[numbers(r) for r in seed] for seed in one]
    assert numbers(one[1][0]) == numbers(run_cell(MIXTRAL, SWAP, seed=3, decayed=False))
    err = capsys.readouterr().err
    assert err.count("(seed 3)") == 2 and f"{MIXTRAL.label} | {SLOW.label} (seed 0): " in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--matrix", "--jobs", "0"], "--jobs takes a number of processes >= 1, got 0"),
        (["--jobs", "2"], "--jobs applies to --matrix or --held-out only"),
    ],
)
def test_bad_jobs_are_refused_naming_them(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["planner", *argv])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [("0,x", "comma-separated integers such as 0,1,2, got '0,x'"), ("1,1", "names a seed twice: '1,1'")],
)
def test_bad_seeds_are_refused_naming_them(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_seeds(text)
    assert parse_seeds("0,2,5") == [0, 2, 5]


def test_seeds_without_the_matrix_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["planner", "--seeds", "0,1"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2
    assert "--seeds applies to --matrix or --held-out only" in capsys.readouterr().err


def test_off_matrix_shape_sets_need_the_matrix_and_each_shape_draws_its_own_loads(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["planner", "--small-layers"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2
    assert "--small-layers applies to --matrix only" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["planner", "--matrix", "--held-out", "3", "--small-layers"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2 and "not with --held-out" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["planner", "--sixteen-experts"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2 and "--sixteen-experts applies to --matrix only" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["planner", "--matrix", "--small-layers", "--sixteen-experts"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    assert exit_.value.code == 2 and "give one of them" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["planner", "--matrix", "--spare-layers", "--small-layers"])
    with pytest.raises(SystemExit) as exit_:
        planner.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--small-layers and --spare-layers each name" in err
    # A cell's loads are seeded by its shape's label: two shapes with one label would share them.
    sets = (
        planner.MATRIX_SHAPES,
        planner.SMALL_LAYER_SHAPES,
        planner.SIXTEEN_EXPERT_SHAPES,
        planner.SPARE_LAYER_SHAPES,
    )
    labels = [s.label for shapes in sets for s in shapes]
    assert len(set(labels)) == len(labels)
    assert all(s.redundant == 0 and s.ranks <= 4 for s in planner.SMALL_LAYER_SHAPES)
    assert all(s.experts == 16 for s in planner.SIXTEEN_EXPERT_SHAPES)
    # The spare set is what policy_exact plans: redundant slots, every layout or every 2-slot change.
    for s in planner.SPARE_LAYER_SHAPES:
        physical = s.experts + s.redundant
        assert s.redundant > 0 and (
            plans_exactly(s.experts, physical, s.ranks, persistence=1.0, fresh=False)
            or plans_locally(s.experts, physical, s.ranks)
        ), s.label
