"""Packaging: every imported package is declared, and only where it is needed.

The daemon's install must not need torch (a GPU node's daemon never builds tensors); the client's
attach does, through the ``torch`` extra. The runtime proof, a daemon serving with torch unimportable,
is in tests/integration/test_without_torch.py.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# import name -> distribution name, where they differ
DIST_OF = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google": "protobuf",
    "cuda": "cuda-bindings",
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
}
# Imported only where a feature is used, under a guard that names the extra (or a peer the user brings).
OPTIONAL_BY_DESIGN = {"cuda-bindings", "transformers", "vllm", "numpy"}


def _dist(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower()


def third_party_imports(root: Path) -> dict[str, set[str]]:
    """Top-level third-party import name -> the modules importing it."""
    stdlib = set(sys.stdlib_module_names)
    out: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in stdlib and top not in ("hotweights", "hotweightsd", "__future__"):
                    out.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return out


def test_every_imported_package_is_declared():
    declared = {_dist(r) for r in PROJECT["dependencies"]}
    for reqs in PROJECT["optional-dependencies"].values():
        declared |= {_dist(r) for r in reqs}
    missing = {}
    for root in ("client/hotweights", "daemon/hotweightsd"):
        for name, where in third_party_imports(REPO / root).items():
            dist = DIST_OF.get(name, name).lower()
            if dist not in declared and dist not in OPTIONAL_BY_DESIGN:
                missing[dist] = sorted(where)
    assert missing == {}


def test_the_daemon_install_needs_no_torch_safetensors_or_rich():
    base = {_dist(r) for r in PROJECT["dependencies"]}
    assert base.isdisjoint({"torch", "safetensors", "rich", "transformers"}), base
    extras = PROJECT["optional-dependencies"]
    assert "torch" in {_dist(r) for r in extras["torch"]}
    assert {"torch", "rich"} <= {_dist(r) for r in extras["shard"]}


def test_the_daemon_imports_no_torch_at_module_level():
    # Lazy imports inside functions are fine (the cuda backend's tests use torch); a top-level one is not.
    offenders = []
    for path in (REPO / "daemon/hotweightsd").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("torch", "safetensors") for m in mods):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_py_typed_ships_with_both_packages():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for pkg, root in (("hotweights", "client/hotweights"), ("hotweightsd", "daemon/hotweightsd")):
        assert "py.typed" in data[pkg]
        assert (REPO / root / "py.typed").is_file()


def test_setuptools_floor_reads_the_license_expression():
    # `license = "Apache-2.0"` (a PEP 639 expression) needs setuptools 77 or later.
    assert isinstance(PROJECT["license"], str)
    floor = [r for r in PYPROJECT["build-system"]["requires"] if _dist(r) == "setuptools"][0]
    major = int(re.search(r">=\s*(\d+)", floor).group(1))
    assert major >= 77
