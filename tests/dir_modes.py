"""Directory-mode helpers shared by the tests of private directories (socket dir, CURVE keys)."""

from __future__ import annotations

import os
import stat


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def shared_dir(path, mode: int):
    """A directory with ``mode`` whatever the umask (mkdir applies it, chmod does not)."""
    path.mkdir()
    path.chmod(mode)
    return path
