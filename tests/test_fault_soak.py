"""The soak runner counts what the scenarios' ledgers say, and a safety violation fails it."""

from __future__ import annotations

import fault_soak

SCENARIO = """
import json, os

def test_scenario():
    with open(os.environ["EPLB_SERVICE_FAULT_LEDGER"], "a") as f:
        f.write(json.dumps({{"plans_committed": 3, "mismatches": {mismatches}, "dead_agent_threads": 0,
                            "agent_resets": 0, "split_commits": {split}, "maps_differ": False}}) + "\\n")
"""


def test_a_clean_soak_passes_and_a_mismatch_or_split_commit_fails_it(tmp_path, capsys):
    clean = tmp_path / "test_clean.py"
    clean.write_text(SCENARIO.format(mismatches=0, split=False))
    assert fault_soak.main(["--runs", "2", "--parallel", "2", "--out", str(tmp_path / "a"), "--", str(clean)]) == 0
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| all 2 | 0 failed | | 2 | 6 | 0 | 0 | 0 | 0 | 0 | 0 | |" in table, table
    unsafe = tmp_path / "test_unsafe.py"
    unsafe.write_text(SCENARIO.format(mismatches=7, split=True))
    assert fault_soak.main(["--runs", "1", "--out", str(tmp_path / "b"), "--", str(unsafe)]) == 1
    assert "| all 1 | 0 failed | | 1 | 3 | 7 | 0 | 0 | 1 | 0 | 0 | |" in (tmp_path / "b" / "table.md").read_text()
    assert "safety violations: 8" in capsys.readouterr().out
    failing = tmp_path / "test_failing.py"
    failing.write_text(SCENARIO.format(mismatches=0, split=False) + "    assert False, 'no plan committed'\n")
    assert fault_soak.main(["--runs", "1", "--out", str(tmp_path / "c"), "--", str(failing)]) == 1
    assert "1 failed in" in (table := (tmp_path / "c" / "table.md").read_text()) and "(test_scenario)" in table, table
