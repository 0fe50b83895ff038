"""Hardening, model roots: a daemon configured with model_roots loads only from under them, opens each
file once and reads through it, refuses special files without blocking, and bounds the files a load
holds open. After every refusal the daemon holds no file of the checkpoint, still answers, and stops
cleanly on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from hotweights import errors, testing
from support.ckpt_tools import write_model
from support.daemons import Daemon, run_client, start_daemon, wait_until
from support.tp_forward import shard_cached

MAX_FILES = 4
# A refusal, or a load of a few MB, takes well under this on a loaded machine; a blocked open never returns.
CALL_TIMEOUT = 120.0


def files_under(d: Daemon, *dirs: Path) -> list[str]:
    return [t for t in d.fds() if any(t.startswith(str(p)) for p in dirs)]


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "models"
    outside = tmp_path / "outside"
    write_model(root / "good" / "model.safetensors")
    write_model(outside / "model.safetensors", seed=1)
    return root, outside


@pytest.fixture
def confined(sockdir, roots):
    root, _ = roots
    d = start_daemon(str(sockdir / "roots.sock"), "--model-roots", str(root), "--max-checkpoint-files", str(MAX_FILES))
    try:
        yield d
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


def stops_cleanly(d) -> None:
    """SIGTERM ends the daemon cleanly: it finishes stopping and exits with 0. A thread stuck in a
    blocking open never returns, so it fails this whatever the bound; the bounds are the harness's
    generous ones because interpreter teardown alone takes seconds on a loaded machine."""
    d.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: "daemon.stopped" in d.logs() or d.proc.poll() is not None,
        testing.STOP_TIMEOUT,
        "the daemon to finish stopping",
        context=d.logs,
    )
    try:
        code = d.proc.wait(timeout=testing.STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the daemon logged its stop but did not exit within {testing.STOP_TIMEOUT:g} s:\n{d.logs()}"
        ) from None
    assert code == 0, f"exit status {code}:\n{d.logs()}"
    assert "daemon.stopped" in d.logs(), d.logs()


def still_whole(d, root: Path, outside: Path, baseline: int) -> None:
    """Holds nothing of the checkpoints, is back to its descriptor count, answers and loads, and holds no
    memfd once that load is unloaded."""
    wait_until(lambda: files_under(d, root, outside) == [], what="the daemon to close every checkpoint file")
    wait_until(lambda: len(d.fds()) <= baseline, what=f"the daemon's fd count back to {baseline}")
    with d.connect(timeout=CALL_TIMEOUT) as c:
        assert c.status() is not None
        info = c.load("good", root / "good" / "model.safetensors", version="v1")
        assert info.version == "v1"
        c.unload("good@v1")
    wait_until(lambda: files_under(d, root, outside) == [], what="the good load's files to be closed")
    wait_until(lambda: d.memfds() == [], what="no memfd left once the good load is unloaded")


def _outside(root: Path, outside: Path) -> Path:
    return outside / "model.safetensors"


def _dotdot(root: Path, outside: Path) -> Path:
    return root / ".." / "outside" / "model.safetensors"


def _link_out(root: Path, outside: Path) -> Path:
    (root / "linked").mkdir()
    (root / "linked" / "model.safetensors").symlink_to(outside / "model.safetensors")
    return root / "linked"


def _dir_link_out(root: Path, outside: Path) -> Path:
    (root / "door").symlink_to(outside)
    return root / "door"


def _fifo(root: Path, outside: Path) -> Path:
    os.mkfifo(root / "fifo.safetensors")
    return root / "fifo.safetensors"


def _fifo_shard(root: Path, outside: Path) -> Path:
    write_model(root / "sharded" / "model-rank-0-part-0.safetensors")
    os.mkfifo(root / "sharded" / "model-rank-0-part-1.safetensors")
    return root / "sharded"


def _side_file_link_out(root: Path, outside: Path) -> Path:
    """A sharded checkpoint whose hotweights.json lists config.json, a link to a file outside the roots
    (same bytes: only the roots can refuse it)."""
    ckpt = root / "sharded-aux"
    shutil.copytree(shard_cached("llama_gqa", 2, parts_per_rank=2), ckpt)
    (ckpt / "config.json").rename(outside / "config.json")
    (ckpt / "config.json").symlink_to(outside / "config.json")
    return ckpt


def _device(root: Path, outside: Path) -> Path:
    (root / "dev").mkdir()
    (root / "dev" / "model.safetensors").symlink_to("/dev/zero")
    return root / "dev"


def _too_many_files(root: Path, outside: Path) -> Path:
    for i in range(MAX_FILES + 1):
        write_model(root / "many" / f"part-{i}.safetensors", {f"t{i}": torch.zeros(16)})
    return root / "many"


CASES = [
    (_outside, errors.OutsideModelRoots, "is outside the model roots"),
    (_dotdot, errors.OutsideModelRoots, "is outside the model roots"),
    (_link_out, errors.OutsideModelRoots, "leads to"),
    (_dir_link_out, errors.OutsideModelRoots, "leads to"),
    (_fifo, errors.BadCheckpoint, "a FIFO, not a regular file"),
    (_fifo_shard, errors.BadCheckpoint, "model-rank-0-part-1.safetensors: a FIFO"),
    (_side_file_link_out, errors.OutsideModelRoots, "config.json is outside the model roots (it leads to"),
    (_device, errors.BadCheckpoint, "a character device, not a regular file"),
    (_too_many_files, errors.ResourceExhausted, f"the limit is {MAX_FILES}"),
]


@pytest.mark.parametrize("make,kind,expected", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_refused_with_a_typed_status_and_nothing_held(confined, roots, make, kind, expected):
    root, outside = roots
    with confined.connect(timeout=CALL_TIMEOUT) as c:
        c.status()
    baseline = len(confined.fds())
    path = make(root, outside)
    with confined.connect(timeout=CALL_TIMEOUT) as c:
        with pytest.raises(kind) as info:
            c.load("m", path)
    assert expected in info.value.message, info.value.message
    if kind is errors.OutsideModelRoots:
        assert isinstance(info.value, errors.PermissionDenied)
        assert str(root) in info.value.message and info.value.details["roots"] == [str(root)]
    still_whole(confined, root, outside, baseline)
    stops_cleanly(confined)


def test_the_cli_names_the_path_and_the_roots(confined, roots):
    root, outside = roots
    r = confined.cli("load", "m", str(outside / "model.safetensors"))
    assert r.returncode == 1
    assert f"{outside}/model.safetensors is outside the model roots" in r.stderr, r.stderr
    assert str(root) in r.stderr and "model_roots" in r.stderr
    stops_cleanly(confined)


def test_a_link_swapped_during_a_load_serves_what_was_checked(confined, roots):
    """The load checks the headers of what ``current`` points at, then fills; the link is swapped once
    the load is registered (the fill may be running or done). The version serves the bytes of the
    files it checked, never the new target's."""
    root, outside = roots
    tensors = {f"w{i}": torch.randn(512, 1024, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    first = write_model(root / "a" / "model.safetensors", tensors)
    write_model(root / "b" / "model.safetensors", {k: v + 1 for k, v in tensors.items()})
    (root / "current").symlink_to(root / "a")
    with confined.connect(timeout=CALL_TIMEOUT) as c:
        c.load("m", root / "current", version="v1", wait=False)
        swapped = root / "swap.tmp"
        swapped.symlink_to(root / "b")
        os.replace(swapped, root / "current")
    confined.wait_status(lambda st: [(v["version"], v["state"]) for v in st["versions"]] == [("v1", "READY")])
    r = run_client("attach_compare_file", confined.socket, "m@v1", str(first))
    assert r.stdout.startswith("OK 8"), r.stdout + r.stderr
    wait_until(lambda: files_under(confined, root, outside) == [], what="the load's files to be closed")
    stops_cleanly(confined)


def test_without_roots_any_path_loads_and_the_daemon_warns(sockdir, roots):
    _, outside = roots
    d = start_daemon(str(sockdir / "open.sock"))
    try:
        d.cli("load", "m", str(outside / "model.safetensors"), check=True)
        assert "model_roots.unset" in d.logs()
    finally:
        assert d.stop() == 0
