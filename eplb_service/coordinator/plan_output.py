"""Writing ``eplb-plan``'s output file whole or not at all.

A plan for 1000 layers is tens of MB of JSON. Written in place, a run stopped mid-write (Ctrl-C,
a full disk, a killed job) left a truncated file under the name the next step reads: the
coordinator's ``--initial-placement`` then refused it at best. Here the text goes to a temporary
file in the same directory (so the rename stays within one file system), is flushed to disk, and
only then renamed over the target: a reader sees the old file or the new one, never a mix.

A target that is not a regular file (``/dev/stdout``, a pipe, a terminal) cannot be replaced by
a rename, and need not be: it is written in place, as before.
"""

from __future__ import annotations

import os
import stat
import tempfile


def _mode_for_new_file() -> int:
    """The permission bits ``open()`` would give a new file (0666 less the umask): ``mkstemp``
    makes its file 0600, which would leave a plan unreadable to the other users it was before."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` never holds part of it.

    A regular file (or a name not taken yet) is replaced by a rename of a complete temporary
    file beside it; a symbolic link keeps pointing where it did, and its target is replaced.
    Anything else (a character device, a FIFO) is written in place. Raises ``OSError`` as
    ``open`` would (a missing directory, no permission); the temporary file never outlives a
    failed or interrupted write (``KeyboardInterrupt`` included).
    """
    try:
        existing = os.stat(path)  # follows links: /dev/stdout is a link to a pipe or a terminal
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        with open(path, "w") as out:
            out.write(text)
        return
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, stat.S_IMODE(existing.st_mode) if existing is not None else _mode_for_new_file())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
