"""Hardening, model roots: each checkpoint file is opened once, must be a regular file inside the
model roots, and is read through that one open file; nothing blocks on a special file and nothing
leaks a descriptor."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import pytest
import torch

from hotweights import errors
from hotweights.format.checkpoint import open_checkpoint
from hotweights.format.source import FileBudget, open_file
from hotweights.testing import fds_under
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.roots import ModelRoots
from hotweightsd.loaders.files import open_source
from support.ckpt_tools import write_model
from support.threads import started

# A refusal that blocked would hang the test: each call runs in a thread given this long to return.
DEADLINE = 30.0


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def returns(fn):
    """fn()'s result or exception, or AssertionError if it does not return before DEADLINE (it blocked)."""
    return started(fn)(DEADLINE)


@pytest.fixture
def tree(tmp_path):
    """A model root with a model inside, and a file outside it."""
    root = tmp_path / "models"
    write_model(root / "m" / "model.safetensors")
    outside = write_model(tmp_path / "elsewhere" / "secret.safetensors", seed=1)
    return root, outside


def tensor_bytes(ckpt_file: Path, name: str) -> bytes:
    from safetensors.torch import load_file

    return bytes(load_file(str(ckpt_file))[name].reshape(-1).view(torch.uint8).numpy())


def test_a_regular_file_is_opened_and_read_through_its_descriptor(tree):
    root, _ = tree
    before = fds()
    f = open_file(root / "m" / "model.safetensors", ModelRoots([str(root)]).check)
    assert f.real == str(root / "m" / "model.safetensors") and f.size == f.stat.st_size > 0
    assert f.pread(8, 0) == (root / "m" / "model.safetensors").read_bytes()[:8]
    f.close()
    assert fds() == before


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    before = fds()
    with pytest.raises(errors.BadCheckpoint, match=r"model.safetensors: a FIFO, not a regular file"):
        returns(lambda: open_file(fifo))
    with pytest.raises(errors.BadCheckpoint, match="a FIFO"):
        returns(lambda: open_checkpoint(fifo))
    # in a directory: the sharded layout, the directory layout, an index
    for layout, real, fifo in (
        ("sharded", "model-rank-0-part-0.safetensors", "model-rank-0-part-1.safetensors"),
        ("plain", "a.safetensors", "b.safetensors"),
        ("indexed", "a.safetensors", "model.safetensors.index.json"),
    ):
        d = tmp_path / layout
        write_model(d / real)
        os.mkfifo(d / fifo)
        with pytest.raises(errors.BadCheckpoint, match=f"{re.escape(fifo)}: a FIFO"):
            returns(lambda d=d: open_checkpoint(d))
    assert fds() == before


def test_a_device_file_is_refused(tmp_path):
    before = fds()
    with pytest.raises(errors.BadCheckpoint, match="/dev/null: a character device, not a regular file"):
        returns(lambda: open_file("/dev/null"))
    link = tmp_path / "d" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    with pytest.raises(errors.BadCheckpoint, match="a character device"):
        returns(lambda: open_checkpoint(link.parent))
    assert fds() == before


def test_a_path_outside_the_roots_is_refused_before_it_is_probed(tree, tmp_path):
    root, outside = tree
    roots = ModelRoots([str(root)])
    for path in (outside, root / ".." / "elsewhere" / "secret.safetensors", tmp_path / "no" / "such"):
        with pytest.raises(errors.OutsideModelRoots) as info:
            open_checkpoint(path, roots.check)
        assert isinstance(info.value, errors.PermissionDenied)
        assert str(path) in info.value.message and str(root) in info.value.message
        assert info.value.details["roots"] == [str(root)]


def test_a_link_inside_a_root_that_leads_out_is_refused(tree):
    root, outside = tree
    roots = ModelRoots([str(root)])
    (root / "m" / "stolen.safetensors").symlink_to(outside)
    (root / "linked").mkdir()
    (root / "linked" / "model.safetensors").symlink_to(outside)
    before = fds()
    with pytest.raises(errors.OutsideModelRoots, match=f"leads to {outside}"):
        open_file(root / "m" / "stolen.safetensors", roots.check)
    with pytest.raises(errors.OutsideModelRoots, match="model.safetensors is outside the model roots"):
        open_checkpoint(root / "linked", roots.check)
    # the directory layout: the good file was opened first, then the link refused; both closed
    with pytest.raises(errors.OutsideModelRoots):
        open_checkpoint(root / "m", roots.check)
    assert fds() == before


def test_links_that_stay_inside_the_roots_are_followed(tree):
    """A Hugging Face cache: the snapshot's names are links to blobs elsewhere in the same root."""
    root, _ = tree
    blob = root / "blobs" / "0123abcd"
    blob.parent.mkdir()
    os.rename(root / "m" / "model.safetensors", blob)
    (root / "m" / "model.safetensors").symlink_to(Path("..") / "blobs" / "0123abcd")
    with open_checkpoint(root / "m", ModelRoots([str(root)]).check) as ckpt:
        f = ckpt.ranks[0].files[0]
        assert f.path.name == "model.safetensors" and f.source is not None and f.source.real == str(blob)


def test_what_is_read_is_the_file_checked_even_if_the_link_is_swapped(tree):
    root, _ = tree
    other = write_model(root / "other" / "model.safetensors", seed=7)
    link = root / "current.safetensors"
    link.symlink_to(root / "m" / "model.safetensors")
    before = fds()
    with open_checkpoint(link, ModelRoots([str(root)]).check) as ckpt:
        source = ckpt.ranks[0].files[0].source
        assert source is not None
        swapped = root / "swap.tmp"
        swapped.symlink_to(other)
        os.replace(swapped, link)  # atomic swap after the header check
        fd, _ = open_source(source, False)
        try:
            data = os.pread(fd, source.size, 0)
        finally:
            os.close(fd)
    assert data == (root / "m" / "model.safetensors").read_bytes() != other.read_bytes()
    assert fds() == before


def test_a_load_fills_from_the_files_it_checked(tree):
    """The manager checks headers when the load starts and fills later: a link swapped in between
    changes nothing that is read."""
    root, _ = tree
    write_model(root / "other" / "model.safetensors", seed=7)
    link = root / "current"
    link.symlink_to(root / "m")
    m = ModelManager(CpuBackend(memory_limit=64 * 2**20), roots=ModelRoots([str(root)]))
    try:
        start = m.start_load("m", str(link), version="v1")
        assert len(fds_under(root)) == 1
        swapped = root / "swap.tmp"
        swapped.symlink_to(root / "other")
        os.replace(swapped, link)
        mv = start.run()
        assert fds_under(root) == []  # the checkpoint's files are closed once the fill ends
        rank = mv.ranks[0]
        p = next(p for p in rank.layout.placements if p.name == "big")
        with open(f"/proc/self/fd/{rank.allocations[0].fd}", "rb") as mem:
            got = os.pread(mem.fileno(), p.nbytes, p.offset)
        assert got == tensor_bytes(root / "m" / "model.safetensors", "big")
        assert got != tensor_bytes(root / "other" / "model.safetensors", "big")
    finally:
        m.close()


def test_refused_and_failed_loads_leave_no_descriptors(tree, tmp_path):
    root, outside = tree
    m = ModelManager(CpuBackend(memory_limit=2**20), roots=ModelRoots([str(root)]), max_checkpoint_files=2)
    try:
        many = root / "many"
        for i in range(3):
            write_model(many / f"p{i}.safetensors", {f"t{i}": torch.zeros(4)})
        before = fds()
        with pytest.raises(errors.OutsideModelRoots):
            m.start_load("m", str(outside))
        with pytest.raises(errors.ResourceExhausted, match="limit is 2"):
            m.start_load("m", str(many))
        with pytest.raises(errors.InsufficientMemory):  # refused after the files were opened
            m.start_load("m", str(root / "m"))
        assert fds() == before
    finally:
        m.close()


def test_the_file_budget_closes_everything_it_opened(tmp_path):
    d = tmp_path / "d"
    for i in range(6):
        write_model(d / f"p{i}.safetensors", {f"t{i}": torch.zeros(4)})
    before = fds()
    with pytest.raises(errors.ResourceExhausted, match=r"has 6 files to open; the limit is 5"):
        open_checkpoint(d, max_files=5)
    budget = FileBudget("d", limit=2)
    budget.open(d / "p0.safetensors")
    budget.open(d / "p1.safetensors")
    with pytest.raises(errors.ResourceExhausted):
        budget.open(d / "p2.safetensors")
    assert budget.files == []
    assert fds() == before


def test_running_out_of_descriptors_closes_everything_opened(tmp_path):
    d = tmp_path / "d"
    for i in range(40):
        write_model(d / f"p{i:02}.safetensors", {f"t{i}": torch.zeros(4)})
    before = fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # new descriptors take the lowest free numbers: room for about ten more than are open now
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(before) + 10, hard))
    try:
        with pytest.raises(errors.ResourceExhausted, match="out of file descriptors"):
            open_checkpoint(d)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert fds() == before


def test_roots_are_judged_on_real_paths(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "models")
    roots = ModelRoots([str(tmp_path / "alias")])  # a root given through a link is its real path
    assert roots.roots == (str(tmp_path / "models"),)
    assert roots.contains(str(tmp_path / "models")) and roots.contains(str(tmp_path / "models" / "a"))
    assert not roots.contains(str(tmp_path / "models-2" / "a")) and not roots.contains(str(tmp_path))
    assert ModelRoots().contains("/anything") and not ModelRoots().confined
    assert ModelRoots(["/"]).contains("/etc/passwd")


def test_model_roots_come_from_the_file_the_environment_and_the_flag(tmp_path):
    from hotweightsd.config import load_config

    f = tmp_path / "c.toml"
    f.write_text('model_roots = ["/models", "/srv/models"]\nmax_checkpoint_files = 64\n')
    cfg = load_config(str(f), env={})
    assert cfg.model_roots == ["/models", "/srv/models"] and cfg.max_checkpoint_files == 64
    assert load_config(str(f), env={"HOTWEIGHTS_MODEL_ROOTS": "/a:/b"}).model_roots == ["/a", "/b"]
    assert load_config(str(f), {"model_roots": "/c"}, env={"HOTWEIGHTS_MODEL_ROOTS": "/a"}).model_roots == ["/c"]
    assert load_config("none", env={}).model_roots == []
    with pytest.raises(errors.InvalidArgument, match=r"model_roots \(env HOTWEIGHTS_MODEL_ROOTS\) must name absolute"):
        load_config("none", env={"HOTWEIGHTS_MODEL_ROOTS": "models"})
    f.write_text("model_roots = 3\n")
    with pytest.raises(errors.InvalidArgument, match=r"model_roots \(file .*\) must be a list of directories"):
        load_config(str(f), env={})


def test_a_manifest_that_leads_out_of_the_roots_is_not_read(tree):
    root, outside = tree
    secret = outside.parent / "hotweights.json"
    secret.write_text("{}")
    (root / "m" / "hotweights.json").symlink_to(secret)
    m = ModelManager(CpuBackend(memory_limit=64 * 2**20), roots=ModelRoots([str(root)]))
    try:
        before = fds()
        with pytest.raises(errors.OutsideModelRoots, match="hotweights.json is outside the model roots"):
            m.start_load("m", str(root / "m"), verify="fast")
        assert fds() == before
    finally:
        m.close()


def test_an_o_direct_reopen_reads_the_same_file(tree):
    root, _ = tree
    path = root / "m" / "model.safetensors"
    with open_file(path) as f:
        fd, direct = open_source(f, True)
        try:
            st = os.fstat(fd)
            assert (st.st_dev, st.st_ino) == (f.stat.st_dev, f.stat.st_ino)
            flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            assert bool(flags & os.O_DIRECT) == direct  # False only where the filesystem refuses O_DIRECT
        finally:
            os.close(fd)


# Opens argv[1] as another user would: root reads any file, so the opener drops to nobody first
# (after its imports: this machine's interpreter may live where nobody cannot read).
OPEN_AS_NOBODY = """
import os, sys
from hotweights import errors
from hotweights.format import source
if len(sys.argv) > 2:
    source.name_reader(sys.argv[2])
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    source.open_file(sys.argv[1])
except errors.BadCheckpoint as exc:
    print(exc.message)
"""


@pytest.mark.parametrize(
    ("reader", "folder"),
    [
        ("", "."),
        ("the daemon", "."),
        # the command is pasted into a shell: quoted, and whole however long (the message's head is shortened)
        ("the daemon", "my models"),
        ("the daemon", "d" * 120 + "/" + "e" * 120),
    ],
)
def test_a_file_the_reader_may_not_open_names_its_user_and_the_fix(tmp_path, reader, folder):
    import pwd
    import shlex
    import subprocess
    import sys

    from hotweights.errors import shorten
    from support import child_env

    os.chmod(tmp_path, 0o755)
    (tmp_path / folder).mkdir(parents=True, exist_ok=True, mode=0o755)
    blob = tmp_path / folder / "model.safetensors"
    blob.write_bytes(b"x")
    blob.chmod(0o600 if os.geteuid() == 0 else 0)
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    r = subprocess.run(
        [sys.executable, "-c", OPEN_AS_NOBODY, str(blob), *([reader] if reader else [])],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    message = r.stdout.strip()
    assert message.startswith(f"{shorten(str(blob))}: cannot open: Permission denied: "), r.stdout + r.stderr
    assert f"{reader or 'this process'} runs as user {user}, who may not read it" in message
    assert f"`setfacl -m u:{user}:r {shlex.quote(str(blob))}`" in message and "group- or world-readable" in message


def test_root_refused_is_told_the_filesystem_refuses_root_not_to_grant_root_an_acl(monkeypatch):
    # NFS root_squash or FUSE without allow_other: an ACL for root would change nothing.
    from hotweights.format import source

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    exc = source.open_error("/nfs/m.safetensors", PermissionError(13, "Permission denied"))
    assert "runs as root, and the filesystem refuses root" in exc.message and "root_squash" in exc.message
    assert "setfacl" not in exc.message, exc.message
