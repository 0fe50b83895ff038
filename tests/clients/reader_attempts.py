"""SOCKET MODEL [UID GID]: tries every call of a serving process and of an operator on the daemon at
SOCKET (MODEL: a checkpoint path for the loads) and prints one JSON line of outcomes.

With UID and GID it first becomes that user, with GID its only group, after its imports and after one
round of failing calls on an absent socket (their lazy imports too): this machine's interpreter lives
where an unprivileged user may not read. Outcomes:

- ``raw``: each RPC sent straight to SOCKET (the readers' socket): ``ok``, the hotweights error class,
  or ``DEADLINE_EXCEEDED`` for a stream the daemon let through and this program cut on purpose; and
  ``attach``: a lease on alias prod, its rank 0 handles and their fds (``attached``: ``ok N`` fds);
- ``client``: the library's operator calls (they go to the operator socket): ``ok`` or the error class;
- ``connect_operator``: a plain connect to the operator socket: ``ok`` or the errno's name;
- ``cli_load``: ``hotweights load`` in this process: its exit status and what it printed on stderr;
- ``messages``: each refusal's message.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hotweights
from hotweights import errors
from hotweights.cli import main as cli_main
from hotweights.wire.fdproto import fetch_fds
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import CLASS_KEY, error_from_rpc

CUT = 1.0  # seconds: Watch and an open Lease only end by a deadline


def _raw(stub: Any, model: str) -> dict[str, Callable[[], object]]:
    lease = [pb.LeaseRequest(open=pb.LeaseOpen(ref="ghost@v0", holder="reader"))]
    return {
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10),
        "Status": lambda: stub.Status(pb.StatusRequest(), timeout=10),
        "Watch": lambda: list(stub.Watch(pb.WatchRequest(ref=""), timeout=CUT)),
        "Lease": lambda: list(stub.Lease(iter(lease), timeout=CUT)),
        "GetHandles": lambda: stub.GetHandles(pb.GetHandlesRequest(lease_id="0" * 32), timeout=10),
        "LoadModel": lambda: list(stub.LoadModel(pb.LoadModelRequest(name="r", path=model, wait=True), timeout=60)),
        "UnloadModel": lambda: stub.UnloadModel(pb.UnloadModelRequest(ref="m@v1", force=True), timeout=10),
        "SwapModel": lambda: list(stub.SwapModel(pb.SwapModelRequest(alias="prod", target=model), timeout=60)),
        "SetAlias": lambda: stub.SetAlias(pb.SetAliasRequest(alias="other", target="m@v1"), timeout=10),
    }


def _outcome(fn: Callable[[], object], messages: dict[str, str], name: str) -> str:
    try:
        fn()
        return "ok"
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and CLASS_KEY not in dict(exc.trailing_metadata() or ()):
            return "DEADLINE_EXCEEDED"
        err = error_from_rpc(exc)
    except errors.HotweightsError as exc:
        err = exc
    messages[name] = str(err)
    return type(err).__name__


def _attach(stub: Any, ref: str) -> str:
    """What ``Client.attach`` does on the wire, without torch: a lease, the rank's handles, its fds
    from the fd socket. ``ok N`` with N the fds received."""
    release = threading.Event()

    def requests() -> Any:
        yield pb.LeaseRequest(open=pb.LeaseOpen(ref=ref, holder="reader", pid=os.getpid()))
        release.wait(30)

    stream = stub.Lease(requests(), timeout=30)
    try:
        granted = next(stream).granted
        key = granted.lease_key
        h = stub.GetHandles(pb.GetHandlesRequest(lease_id=granted.lease_id, rank=0, lease_key=key), timeout=10)
        fds = fetch_fds(h.fd_socket, h.ticket, len(h.allocations))
        for fd in fds:
            os.close(fd)
        return f"ok {len(fds)}"
    finally:
        release.set()
        stream.cancel()


def _connect(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        s.close()


def _cli(*args: str) -> dict[str, Any]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(list(args))
    return {"code": code, "stderr": err.getvalue()}


def attempts(sock: str, model: str) -> dict[str, Any]:
    messages: dict[str, str] = {}
    out: dict[str, Any] = {"messages": messages}
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = pb_grpc.HotweightsStub(channel)
        out["raw"] = {name: _outcome(fn, messages, name) for name, fn in _raw(stub, model).items()}
        out["raw"]["attach"] = _outcome(lambda: out.setdefault("attached", _attach(stub, "prod")), messages, "attach")
        health = health_pb2_grpc.HealthStub(channel)
        out["raw"]["Health"] = _outcome(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10), messages, "")
    with hotweights.connect(sock) as c:
        calls: dict[str, Callable[[], object]] = {
            "load": lambda: c.load("r", model),
            "unload": lambda: c.unload("m@v1", force=True),
            "swap": lambda: c.swap("prod", model),
            "alias": lambda: c.set_alias("other", "m@v1"),
            "list": c.list,
            "status": c.status,
        }
        out["client"] = {name: _outcome(fn, messages, f"client.{name}") for name, fn in calls.items()}
        out["connect_operator"] = _connect(c.operator_socket)
    out["cli_load"] = _cli("load", "r", model, "--socket", sock)
    return out


def become(uid: int, gid: int) -> None:
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    sock, model = argv[0], argv[1]
    if len(argv) > 2:
        attempts(sock + ".absent", model)  # every failing path's lazy imports, done while we may read them
        become(int(argv[2]), int(argv[3]))
    print(json.dumps({"uid": os.getuid(), "groups": os.getgroups(), **attempts(sock, model)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
