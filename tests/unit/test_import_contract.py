"""The import contract: which part of the code may import which.

The layers are the architecture drawn in the README. A module's imports are read from its syntax tree
(imports inside functions and under TYPE_CHECKING count too), so a forbidden import fails here before
review, and so does an import circle between two files.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"hotweights": REPO / "client" / "hotweights", "hotweightsd": REPO / "daemon" / "hotweightsd"}
GENERATED = "hotweights.wire._proto"

# Each layer, by module prefix (the longest prefix wins).
LAYERS: dict[str, str] = {
    "hotweights.errors": "kernel.errors",
    "hotweights.units": "kernel.util",
    "hotweights.paths": "kernel.util",
    # Where the socket is and why no daemon answers on it: the file system only, below the client API.
    "hotweights.reach": "kernel.util",
    # Writing a checkpoint directory all-or-nothing: the file system only, for the tools and the converter.
    "hotweights.staging": "kernel.util",
    "hotweights.format": "kernel.format",
    "hotweights.wire": "kernel.wire",
    "hotweights.cuda": "kernel.cuda",
    "hotweights": "client",
    "hotweights.tools": "tools",
    "hotweights.torch": "engines",
    "hotweights.transformers": "engines",
    "hotweights.vllm": "engines",
    "hotweights.vllm_layout": "engines",
    "hotweights.cli": "cli",
    "hotweights.__main__": "cli",
    "hotweightsd": "wiring",
    # A leaf of the standard library only: any daemon layer that starts threads may name them with it.
    "hotweightsd.threadnames": "daemon.root",
    "hotweightsd.core": "core",
    "hotweightsd.server": "server",
    "hotweightsd.persist": "persist",
    "hotweightsd.backends": "backends",
    "hotweightsd.loaders": "loaders",
}
KERNEL_PARTS = {"kernel.errors", "kernel.util", "kernel.format", "kernel.wire", "kernel.cuda"}
NO_TRANSPORT = {"kernel.errors", "kernel.util", "kernel.format"}
DAEMON = {"daemon.root", "wiring", "core", "server", "persist", "backends", "loaders"}

# What each layer may import from the project (its own layer always).
ALLOWED: dict[str, set[str]] = {
    "kernel.errors": set(),
    "kernel.util": {"kernel.errors"},
    "kernel.format": {"kernel.errors", "kernel.util"},
    "kernel.wire": {"kernel.errors", "kernel.util"},
    "kernel.cuda": {"kernel.errors", "kernel.util"},
    "daemon.root": set(),
    "core": NO_TRANSPORT | {"daemon.root"},
    "server": NO_TRANSPORT | {"daemon.root", "kernel.wire", "core"},
    "persist": NO_TRANSPORT | {"daemon.root", "core"},
    "loaders": NO_TRANSPORT | {"daemon.root", "kernel.cuda", "core"},
    "backends": NO_TRANSPORT | {"daemon.root", "kernel.cuda", "core", "loaders"},
    "wiring": KERNEL_PARTS | DAEMON,
    "client": KERNEL_PARTS,
    "engines": KERNEL_PARTS | {"client"},
    "tools": KERNEL_PARTS | {"client"},
    "cli": KERNEL_PARTS | {"client", "tools"},
}
# Third-party packages a layer must never import: the core knows nothing of transports or devices.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "core": {"grpc", "grpc_health", "grpc_reflection", "google", "cuda", "torch", "typer", "prometheus_client"},
    "kernel.errors": {"grpc", "torch", "cuda"},
    "kernel.util": {"grpc", "torch", "cuda"},
    "kernel.format": {"grpc", "cuda"},
    "persist": {"grpc", "torch", "cuda"},
    "loaders": {"grpc", "torch"},
    "backends": {"grpc", "torch"},
}
# Serving engines are reached only through their own adapter module (hotweights.vllm is the plugin
# vLLM loads; nothing else may drag vLLM into a process that did not ask for it).
ENGINE_ONLY = {"vllm": {"hotweights.vllm"}, "transformers": {"hotweights.transformers"}}
# The one sanctioned way up: the operator CLI starts the daemon (`hotweights serve`), lazily.
LAZY_EXCEPTIONS = {("cli", "hotweightsd.cli")}


def layer_of(module: str) -> str | None:
    if module == "hotweightsd":
        return "daemon.root"  # the package itself holds only its version
    best = None
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return LAYERS[best] if best else None


def module_name(path: Path) -> str:
    for top, root in ROOTS.items():
        if root in path.parents or path.parent == root:
            rel = path.relative_to(root).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS.values():
        for path in root.rglob("*.py"):
            name = module_name(path)
            if not name.startswith(GENERATED):
                out[name] = path
    return out


def imports_of(name: str, source: str, is_package: bool = False) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken from it, lazily: inside a function) for every import statement."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, [], lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    up = parts[: len(parts) - (child.level - 1)]
                    base = ".".join([*up, base] if base else up)
                found.append((base, [a.name for a in child.names], lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def graph(sources: Mapping[str, str], packages: Iterable[str] = ()) -> dict[str, list[tuple[str, bool]]]:
    pkgs = set(packages)
    known = set(sources)
    out: dict[str, list[tuple[str, bool]]] = {}
    for name, src in sources.items():
        edges = []
        for base, names, lazy in imports_of(name, src, name in pkgs):
            if base.split(".")[0] not in ROOTS:
                edges.append((base, lazy))
                continue
            # `from pkg import module` imports the module; `from module import Name` imports the module
            targets = {f"{base}.{n}" if f"{base}.{n}" in known else base for n in names} or {base}
            for target in targets:
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target in known and target != name:
                    edges.append((target, lazy))
        out[name] = edges
    return out


def violations(g: Mapping[str, list[tuple[str, bool]]]) -> list[str]:
    found = []
    for name, edges in g.items():
        src_layer = layer_of(name)
        if src_layer is None:
            continue
        for target, lazy in edges:
            top = target.split(".")[0]
            if top in ROOTS:
                dst_layer = layer_of(target)
                if (
                    dst_layer is None
                    or dst_layer == src_layer
                    or target.startswith(GENERATED)
                    and (src_layer in ("kernel.wire",))
                ):
                    continue
                if dst_layer in ALLOWED.get(src_layer, set()):
                    continue
                if lazy and (src_layer, target) in LAZY_EXCEPTIONS:
                    continue
                found.append(f"{name} ({src_layer}) imports {target} ({dst_layer})")
            elif top in FORBIDDEN_THIRD_PARTY.get(src_layer, set()):
                found.append(f"{name} ({src_layer}) imports third-party {target}")
    return sorted(set(found))


def file_circles(g: Mapping[str, list[tuple[str, bool]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), counting every import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, []):
            if w not in g:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def without_package_inits(g: Mapping[str, list[tuple[str, bool]]], packages: set[str]) -> dict:
    # A package's __init__ re-exporting its children is not a circle between files of different concerns.
    return {n: [(t, lz) for t, lz in e if not (n in packages and t.startswith(n + "."))] for n, e in g.items()}


@pytest.fixture(scope="module")
def real_graph():
    mods = modules()
    packages = {n for n, p in mods.items() if p.name == "__init__.py"}
    sources = {n: p.read_text() for n, p in mods.items()}
    return graph(sources, packages), packages, sources


def test_every_module_has_a_layer(real_graph):
    g, _, _ = real_graph
    assert [n for n in g if layer_of(n) is None] == []


def test_the_code_keeps_the_import_contract(real_graph):
    g, _, _ = real_graph
    assert violations(g) == []


def engine_breaches(g: Mapping[str, list[tuple[str, bool]]]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, edges in g.items()
        for target, _ in edges
        if name not in ENGINE_ONLY.get(target.split(".")[0], {name})
    )


def test_an_engine_package_is_imported_only_by_its_adapter(real_graph):
    g, packages, sources = real_graph
    assert engine_breaches(g) == []
    poisoned = dict(sources, **{"hotweights.torch": sources["hotweights.torch"] + "\nimport vllm\n"})
    assert engine_breaches(graph(poisoned, packages)) == ["hotweights.torch imports vllm"]


def test_no_import_circles_between_files(real_graph):
    g, packages, _ = real_graph
    assert file_circles(without_package_inits(g, packages)) == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("hotweightsd.core.manager", "import grpc", "imports third-party grpc"),
        ("hotweightsd.core.manager", "from hotweightsd.server import service", "imports hotweightsd.server.service"),
        ("hotweightsd.core.registry", "from hotweights.wire import status", "imports hotweights.wire.status"),
        ("hotweightsd.server.convert", "from hotweights.cuda import devices", "imports hotweights.cuda.devices"),
        ("hotweightsd.persist.fdstore", "from hotweightsd.backends import cpu", "imports hotweightsd.backends.cpu"),
        ("hotweightsd.loaders.bounce", "from hotweightsd.backends import cuda", "imports hotweightsd.backends.cuda"),
        ("hotweights.errors", "from hotweights import client", "imports hotweights.client"),
        ("hotweights.reach", "from hotweights import client", "imports hotweights.client"),
        ("hotweights.reach", "import grpc", "imports third-party grpc"),
        ("hotweights.format.checkpoint", "import torch", None),  # allowed: torch is optional there, not forbidden
        ("hotweights.client", "from hotweightsd.core import manager", "imports hotweightsd.core.manager"),
        ("hotweights.cli", "from hotweightsd import main", "imports hotweightsd.main"),
    ],
)
def test_a_forbidden_import_is_caught(real_graph, module, line, expected):
    _, packages, sources = real_graph
    changed = dict(sources)
    changed[module] = sources[module] + f"\n\ndef _added():\n    {line}\n"
    found = violations(graph(changed, packages))
    if expected is None:
        assert not any(module in v and "torch" in v for v in found), found
    else:
        assert any(expected in v for v in found), found


def test_a_circle_is_caught(real_graph):
    _, packages, sources = real_graph
    changed = dict(sources)
    added = "\nfrom hotweights.format import checkpoint\n"
    changed["hotweights.format.dtypes"] = sources["hotweights.format.dtypes"] + added
    circles = file_circles(without_package_inits(graph(changed, packages), packages))
    assert any("hotweights.format.dtypes" in c and "hotweights.format.checkpoint" in c for c in circles)


def test_the_operator_cli_reaches_the_daemon_only_lazily_for_serve(real_graph):
    _, packages, sources = real_graph
    changed = dict(sources)
    changed["hotweights.cli"] = sources["hotweights.cli"] + "\nfrom hotweightsd import cli as _daemon_cli\n"
    assert any("hotweightsd.cli" in v for v in violations(graph(changed, packages)))
