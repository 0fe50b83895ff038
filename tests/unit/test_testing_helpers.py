"""hotweights.testing's parts that need no daemon: waiting on a condition, the child environment,
the serve command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hotweights import testing
from support import CLIENTS


def test_wait_until_returns_the_first_true_value():
    seen = iter([0, None, "", "ready"])
    assert testing.wait_until(lambda: next(seen), 10, "the fourth value", interval=0) == "ready"


def test_wait_until_names_what_it_waited_for_and_what_it_saw():
    with pytest.raises(AssertionError, match=r"for the moon to turn blue; last seen: None\nasked the sky"):
        testing.wait_until(lambda: None, 0, "the moon to turn blue", context=lambda: "asked the sky")
    with pytest.raises(AssertionError, match=r"for a non-empty list; last seen: \[\]"):
        testing.wait_until(list, 0, "a non-empty list")


def test_read_line_returns_the_next_line_or_says_why_none_came():
    def child(code: str) -> subprocess.Popen:
        argv = [sys.executable, "-c", code]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    talker = child("print('one', flush=True); print('two', flush=True)")
    assert testing.read_line(talker) == "one\n" and testing.read_line(talker) == "two\n"
    with pytest.raises(AssertionError, match=r"for a third line from pid \d+: it ended first \(exit status 0\)"):
        testing.read_line(talker, what="a third line")

    failing = child("import sys; sys.exit('no model here')")
    with pytest.raises(AssertionError, match=r"it ended first \(exit status 1\); stderr:\nno model here\n\nthe log"):
        testing.read_line(failing, what="attached", context=lambda: "the log")

    silent = child("import signal; signal.pause()")  # never writes: blocked until killed
    with pytest.raises(AssertionError, match=r"none came in 0.5 s \(exit status -9\); stderr:"):
        testing.read_line(silent, 0.5, "a line")  # the bound is the input here: the child never writes one
    assert silent.poll() == -9  # killed, not left hanging


def test_child_env_puts_the_imported_packages_first_and_keeps_the_rest():
    base = {"PYTHONPATH": os.pathsep.join(["/elsewhere", testing.source_dirs()[0]]), "KEEP": "1"}
    env = testing.child_env({"EXTRA": "2"}, paths=["/tests"], base=base)
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts == ["/tests", *testing.source_dirs(), "/elsewhere"]
    assert env["KEEP"] == "1" and env["EXTRA"] == "2"
    r = subprocess.run(
        [sys.executable, str(CLIENTS / "print_package_files.py")],
        env=testing.child_env(base={"PATH": os.environ.get("PATH", "")}),
        capture_output=True,
        text=True,
        check=True,
        timeout=testing.CLI_TIMEOUT,
    )
    client_file, daemon_file = r.stdout.split()
    assert client_file.startswith(testing.source_dirs()[0])
    assert daemon_file.startswith(testing.source_dirs()[-1])


def test_serve_command_lets_extra_flags_win():
    cmd = testing.serve_command("/tmp/s.sock", "--backend", "cuda", "--reserve", "1GiB", config="/tmp/empty.toml")
    assert cmd[:6] == [sys.executable, "-m", "hotweights", "serve", "--socket", "/tmp/s.sock"]
    assert cmd.count("--backend") == 1 and cmd[cmd.index("--backend") + 1] == "cuda"
    assert cmd[cmd.index("--config") + 1] == "/tmp/empty.toml"
    assert "--config" not in testing.serve_command("/tmp/s.sock")


def test_the_harness_imports_without_pytest_or_torch():
    r = subprocess.run(
        [sys.executable, str(CLIENTS / "import_harness_without_torch.py")],
        env=testing.child_env(),
        capture_output=True,
        text=True,
        timeout=testing.CLI_TIMEOUT,
    )
    assert r.stdout.strip() == "ok", r.stderr


def test_daemon_reads_what_its_process_holds_from_proc(tmp_path):
    """Daemon.fds/memfds/memfd_mappings/threads, on a stand-in process holding a file, a mapped memfd
    and a second thread."""
    held = tmp_path / "held.bin"
    held.write_bytes(b"x" * 4096)
    program = (
        "import mmap, os, signal, sys, threading\n"
        f"f = open({str(held)!r}, 'rb')\n"
        "m = os.memfd_create('hotweights-test'); os.ftruncate(m, 4096)\n"
        "view = mmap.mmap(m, 4096); os.close(m)  # the mapping keeps a descriptor of its own\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
        "print('ready', flush=True); signal.pause()  # held until the test kills it\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert testing.read_line(proc, what='"ready" from the stand-in') == "ready\n"
        d = testing.Daemon(str(tmp_path / "none.sock"), proc, tmp_path / "none.log")
        fds = d.fds()
        assert str(held) in fds and "/memfd:hotweights-test (deleted)" in fds
        assert d.memfds() == ["/memfd:hotweights-test (deleted)"]
        assert d.memfd_mappings() == 1 and d.threads() == 2
    finally:
        proc.kill()
        proc.wait()
