"""Package metadata that has to agree with the code: the vLLM extra, the TOML reader below Python 3.11."""

from __future__ import annotations

import pathlib
import sys

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from eplb_service.integrations.vllm.adapter import KNOWN_VLLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(specs: list[str], name: str) -> Requirement:
    found = [Requirement(s) for s in specs if Requirement(s).name == name]
    assert len(found) == 1, f"expected one {name} requirement, got {found}"
    return found[0]


def test_vllm_extra_admits_exactly_the_versions_the_adapter_knows():
    """The extra admits every release of ``KNOWN_VLLM``'s minor versions and nothing outside it
    (the adapter runs outside it too, with a warning, but pip should not pick such a vLLM)."""
    spec = requirement(PROJECT["optional-dependencies"]["vllm"], "vllm").specifier
    (lo_major, lo_minor), (hi_major, hi_minor) = KNOWN_VLLM
    assert lo_major == hi_major, "a range across major versions needs this test rewritten"
    for minor in range(lo_minor, hi_minor + 1):
        for patch in (0, 9):
            v = f"{lo_major}.{minor}.{patch}"
            assert spec.contains(v), f"vllm extra {spec} refuses vLLM {v}, which the adapter knows ({KNOWN_VLLM})"
    for v in (f"{lo_major}.{lo_minor - 1}.99", f"{hi_major}.{hi_minor + 1}.0"):
        assert not spec.contains(v), f"vllm extra {spec} admits vLLM {v}, outside what the adapter knows"


def test_tomli_is_required_exactly_where_tomllib_is_missing():
    assert PROJECT["requires-python"] == ">=3.10"
    tomli = requirement(PROJECT["dependencies"], "tomli")
    assert tomli.marker is not None
    assert tomli.marker.evaluate({"python_version": "3.10"}) and not tomli.marker.evaluate({"python_version": "3.11"})
    assert Marker("python_version < '3.11'").evaluate() == (sys.version_info < (3, 11))


def test_config_file_reads_with_the_tomli_backport(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the same file must load through tomli (stood in for by tomllib here)."""
    from eplb_service.coordinator.cli import parse_command_line

    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ModuleNotFoundError, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    path = tmp_path / "eplb.toml"
    path.write_text("dp = 4\nmetrics-port = 9464\n")
    args = parse_command_line(["--config", str(path)])
    assert (args.dp, args.metrics_port) == (4, 9464)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ValueError, match="--config needs tomli on Python < 3.11"):
        parse_command_line(["--config", str(path)])


def test_docker_base_image_is_a_pinned_vllm_the_adapter_knows():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    (image,) = [line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG VLLM_IMAGE=")]
    repo, _, tag = image.partition(":")
    assert repo == "vllm/vllm-openai" and tag and tag != "latest", f"VLLM_IMAGE {image!r} is not pinned to a release"
    version = Version(tag.removeprefix("v"))
    assert KNOWN_VLLM[0] <= (version.major, version.minor) <= KNOWN_VLLM[1], (
        f"{image}: the adapter knows vLLM {KNOWN_VLLM}, not {version}"
    )
