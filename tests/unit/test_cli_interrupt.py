"""Ctrl-C during `hotweights load` / `swap`: the daemon keeps loading, and the command says so, says how
to follow or stop it, and exits 130. A stand-in server keeps the load in progress for as long as the
test needs, so the interrupt always lands mid-load."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from hotweights import testing
from hotweights.wire.pb import pb, pb_grpc
from support import child_env
from support.stub_server import serving


class Loading(pb_grpc.HotweightsServicer):
    """Every load and swap reports some progress, then never ends."""

    def __init__(self) -> None:
        self.streaming = threading.Event()

    async def LoadModel(self, request, context):
        yield pb.LoadEvent(progress=pb.LoadProgress(bytes_done=1, bytes_total=10))
        self.streaming.set()
        await asyncio.Event().wait()

    SwapModel = LoadModel


@pytest.fixture
def server() -> Iterator[tuple[str, Loading]]:
    servicer = Loading()
    with serving(servicer, operator_socket=True) as path:
        yield path, servicer


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["load", "m", "/models/m", "--version", "v1"],
            "interrupted: the load of m@v1 keeps going in the daemon; follow it with `hotweights watch m`, "
            "stop it with `hotweights unload m@v1`",
        ),
        (["load", "m", "/models/m"], "stop it with `hotweights unload m@VERSION"),
        (["swap", "prod", "/models/m"], "interrupted: the swap of prod keeps going in the daemon: prod moves"),
    ],
)
def test_ctrl_c_says_the_daemon_keeps_loading_and_exits_130(server, args, expected):
    path, servicer = server
    cli = subprocess.Popen(
        [sys.executable, "-m", "hotweights", *args, "--socket", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(HOTWEIGHTS_OPERATOR_SOCKET="auto"),
    )
    try:
        assert servicer.streaming.wait(testing.CLI_TIMEOUT), "the command never reached its load"
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=testing.CLI_TIMEOUT)
    finally:
        cli.kill()
    assert cli.returncode == 130, err
    assert expected in err, err
    assert "Traceback" not in err and out == ""
