"""One reader of the environment in the daemon: config.py.

Read from each module's syntax tree: a read of ``os.environ`` / ``os.getenv`` anywhere in
daemon/hotweightsd but config.py and persist/systemd.py (the service manager's own protocol
variables: NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*, FDSTORE) fails, and so does a string starting with
``HOTWEIGHTS_`` outside config.py. Setting a variable for a library the daemon loads (a write) is
not configuration and is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parents[2] / "daemon" / "hotweightsd"
MAY_READ_ENV = {"config.py", "persist/systemd.py"}
MAY_NAME_VARIABLES = {"config.py"}
_WRITES = {"setdefault", "pop", "update", "clear", "__setitem__", "__delitem__"}


def env_reads(source: str) -> list[int]:
    """Line numbers where ``source`` reads the process environment."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    environ_names = {"environ"} if "from os import environ" in source else set()
    found = []
    for node in ast.walk(tree):
        is_environ = (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "environb")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ) or (isinstance(node, ast.Name) and node.id in environ_names)
        is_getenv = isinstance(node, ast.Attribute) and node.attr in ("getenv", "getenvb")
        if is_getenv:
            found.append(node.lineno)
        elif is_environ:
            parent = parents.get(node)
            if isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del)):
                continue
            if isinstance(parent, ast.Attribute) and parent.attr in _WRITES:
                continue
            found.append(node.lineno)
    return found


def variable_names(source: str) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("HOTWEIGHTS_")
    ]


def daemon_modules() -> dict[str, str]:
    return {str(p.relative_to(DAEMON)): p.read_text() for p in sorted(DAEMON.rglob("*.py"))}


def test_only_the_config_reads_the_environment():
    found = [
        f"{name}:{line}"
        for name, src in daemon_modules().items()
        if name not in MAY_READ_ENV
        for line in env_reads(src)
    ]
    assert found == [], "read the value from Config (config.py) and pass it down instead"


def test_only_the_config_names_hotweights_variables():
    found = [
        f"{name}:{line} {value!r}"
        for name, src in daemon_modules().items()
        if name not in MAY_NAME_VARIABLES
        for line, value in variable_names(src)
    ]
    assert found == [], "a HOTWEIGHTS_* variable belongs in config.py as a key"


@pytest.mark.parametrize(
    ("code", "reads"),
    [
        ("import os\nx = os.environ.get('A')\n", [2]),
        ("import os\nx = os.environ['A']\n", [2]),
        ("import os\nx = 'A' in os.environ\n", [2]),
        ("import os\nx = os.getenv('A')\n", [2]),
        ("from os import environ\nx = environ.get('A')\n", [2]),
        ("import os\nos.environ['A'] = '1'\n", []),
        ("import os\nos.environ.setdefault('A', '1')\n", []),
        ("import os\ndel os.environ['A']\n", []),
    ],
)
def test_the_checker_tells_reads_from_writes(code, reads):
    assert env_reads(code) == reads


def test_the_checker_finds_variable_names():
    assert variable_names("x = 'HOTWEIGHTS_GDS'\ny = f'HOTWEIGHTS_{k}'\nz = 'see HOTWEIGHTS_X'\n") == [
        (1, "HOTWEIGHTS_GDS"),
        (2, "HOTWEIGHTS_"),
    ]
