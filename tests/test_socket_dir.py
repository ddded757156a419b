"""The ipc:// socket directory: created 0700 when missing, an existing one refused (never chmod-ed) unless private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from dir_modes import mode_of, shared_dir

from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory, prepare_ipc_dir


def test_a_missing_directory_is_created_private(tmp_path):
    directory = tmp_path / "run" / "eplb"
    old = os.umask(0)  # the 0700 must come from the code, not from a kind umask
    try:
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    finally:
        os.umask(old)
    assert directory.is_dir() and mode_of(directory) == 0o700


def test_an_existing_private_directory_is_taken_as_it_is(tmp_path):
    directory = tmp_path / "eplb"
    directory.mkdir(mode=0o700)
    prepare_ipc_dir(f"ipc://{directory}/c.sock")
    assert mode_of(directory) == 0o700


def test_a_directory_others_can_write_to_is_refused_and_left_alone(tmp_path):
    """Before: made 0700 without a word; with ipc:///tmp/c.sock as root that was /tmp itself."""
    directory = shared_dir(tmp_path / "shared", 0o1777)
    with pytest.raises(UnsafeSocketDirectory) as refused:
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    message = str(refused.value)
    assert f"socket directory {directory} has mode 1777, expected 0700" in message
    assert f"owner uid {os.geteuid()}" in message and "left as it is" in message
    assert "others can write there" in message and "directory of its own" in message
    assert "chmod" not in message, "a shared directory must not be chmod-ed, not even by the user on our word"
    assert mode_of(directory) == 0o1777


def test_a_directory_others_can_only_read_is_refused_with_the_chmod_to_run(tmp_path):
    directory = shared_dir(tmp_path / "mine", 0o755)
    with pytest.raises(UnsafeSocketDirectory, match=f"mode 0755, expected 0700.*`chmod 700 {directory}`"):
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    assert mode_of(directory) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_open_directory_is_refused_and_left_alone(tmp_path):
    directory = shared_dir(tmp_path / "theirs", 0o777)
    os.chown(directory, 65534, 65534)
    with pytest.raises(UnsafeSocketDirectory, match="owned by uid 65534"):
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    info = os.lstat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o777 and info.st_uid == 65534


def test_a_file_or_an_impossible_path_is_a_clear_refusal(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeSocketDirectory, match="is a symlink or not a directory"):
        prepare_ipc_dir(f"ipc://{tmp_path}/file/c.sock")
    with pytest.raises(UnsafeSocketDirectory, match="cannot create socket directory /proc/nope: "):
        prepare_ipc_dir("ipc:///proc/nope/c.sock")


def test_the_coordinator_refuses_a_shared_directory_without_changing_it(tmp_path):
    """The reviewer's case: `eplb-coordinator --dp 2 --endpoint ipc://$PWD/d/c.sock` with d at 1777."""
    directory = shared_dir(tmp_path / "d", 0o1777)
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", f"ipc://{directory}/c.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and f"socket directory {directory} has mode 1777" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert mode_of(directory) == 0o1777 and not (directory / "c.sock").exists()


def test_a_stopped_coordinator_removes_its_socket_file_but_not_a_successors(tmp_path):
    """Before: the ipc:// socket file stayed after a clean stop, an endpoint nobody listened on."""
    import os
    import socket as pysocket

    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.socket_dir import ipc_socket_identity, release_ipc_endpoint

    path = tmp_path / "c.sock"
    thread = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=f"ipc://{path}")).start()
    assert path.is_socket()
    thread.stop()
    assert not os.path.lexists(path)

    with pysocket.socket(pysocket.AF_UNIX) as first:  # a file bound, then replaced by another's
        first.bind(str(path))
        mine = ipc_socket_identity(f"ipc://{path}")
        os.unlink(path)
        with pysocket.socket(pysocket.AF_UNIX) as successor:
            successor.bind(str(path))
            release_ipc_endpoint(f"ipc://{path}", mine)
            assert path.is_socket(), "a socket file bound by someone else since is left alone"
    assert ipc_socket_identity("tcp://127.0.0.1:5555") is None and ipc_socket_identity("ipc://@abstract") is None
