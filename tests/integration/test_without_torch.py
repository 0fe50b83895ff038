"""The daemon and the operator's commands run where torch cannot be imported.

A GPU node's daemon never builds tensors, so its install (`pip install hotweights`) leaves torch,
safetensors and rich out; the serving processes that attach bring torch (`hotweights[torch]`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hotweights.testing import CLI_TIMEOUT
from support import SOURCE_DIRS
from support.ckpt_tools import write_model
from support.daemons import run_cli, start_daemon

BLOCKED = ("torch", "safetensors", "rich", "numpy", "transformers")


def blocked_env(tmp: Path) -> dict[str, str]:
    poison = tmp / "poison"
    poison.mkdir()
    for name in BLOCKED:
        (poison / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(poison), *SOURCE_DIRS])
    return env


def test_daemon_loads_and_serves_without_torch(tmp_path, sockdir):
    ckpt = write_model(tmp_path / "m.safetensors")
    env = blocked_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT
    )
    assert probe.returncode != 0 and "not installed here" in probe.stderr  # the poison works

    d = start_daemon(str(sockdir / "hw.sock"), env=env)
    try:

        def cli(*args: str) -> subprocess.CompletedProcess:
            return run_cli(*args, "--socket", d.socket, env=env)

        loaded = cli("load", "m", str(ckpt), "--version", "v1", "--json")
        assert loaded.returncode == 0, loaded.stderr
        info = json.loads(loaded.stdout)
        assert info["state"] == "READY" and int(info["bytes"]) > 0
        listed = cli("list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [v["version"] for v in json.loads(listed.stdout)["versions"]] == ["v1"]
        unloaded = cli("unload", "m@v1")
        assert unloaded.returncode == 0, unloaded.stderr
    finally:
        assert d.stop() == 0, d.logs()
    assert "not installed here" not in d.logs()
