"""``write_text_atomically`` puts the text on disk before the rename makes it the plan file.

Written against a hand-made mutation that the rest of the suite let through: without the
``fsync``, a power cut after the rename can leave the target name on an empty or partial file
(the rename's metadata reaches the disk before the data on common file systems), exactly what
writing to a temporary file first is meant to prevent."""

from __future__ import annotations

import os

from eplb_service.coordinator import plan_output


def test_the_temporary_file_is_synced_before_it_is_renamed_over_the_target(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(plan_output.os, "fsync", fsync)
    monkeypatch.setattr(plan_output.os, "replace", replace)
    target = tmp_path / "plan.json"
    plan_output.write_text_atomically(str(target), '{"layers": []}')
    assert target.read_text() == '{"layers": []}'
    assert [what for what, _ in calls] == ["fsync", "replace"]
    assert calls[0][1] == calls[1][1]  # the file synced is the one renamed
