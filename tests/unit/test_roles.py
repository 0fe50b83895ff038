"""Roles as data (hotweightsd.core.roles) and the check on the readers' socket (hotweightsd.server.roles).

The interceptor is driven with a fake continuation and a fake call context: no server, no socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from hotweights import errors
from hotweights.wire.pb import pb
from hotweights.wire.status import CLASS_KEY, DETAILS_KEY, error_from_rpc
from hotweightsd.core.roles import MINIMUM_ROLE, READER_SERVICES, Role, allowed, minimum_role, service_minimum_role
from hotweightsd.server.roles import HOTWEIGHTS_SERVICE, RoleGuard, needed_role

SERVICE = pb.DESCRIPTOR.services_by_name["Hotweights"]
# Rows for RPCs being added on another branch: allowed in the table before the service has them.
ANNOUNCED = {"Rollback"}
READER_RPCS = {"ListModels", "Status", "Watch", "Lease", "GetHandles"}
OPERATOR_RPCS = {"LoadModel", "UnloadModel", "SwapModel", "SetAlias", "Rollback"}


def test_every_rpc_of_the_service_has_a_row():
    rpcs = {m.name for m in SERVICE.methods}
    assert rpcs - set(MINIMUM_ROLE) == set(), "give each new RPC its minimum role in hotweightsd/core/roles.py"
    assert set(MINIMUM_ROLE) - rpcs <= ANNOUNCED, "a row names an RPC the service does not have"


def test_readers_read_and_attach_operators_change_what_is_resident():
    assert {rpc for rpc, role in MINIMUM_ROLE.items() if role == Role.READER} == READER_RPCS
    assert {m.name for m in SERVICE.methods} - READER_RPCS == OPERATOR_RPCS
    assert all(MINIMUM_ROLE[rpc] == Role.OPERATOR for rpc in OPERATOR_RPCS | ANNOUNCED)
    # every request that carries a path (load, swap to a path) needs an operator
    with_paths = {m.name for m in SERVICE.methods if any(f.name in ("path", "target") for f in m.input_type.fields)}
    assert with_paths and all(minimum_role(rpc) == Role.OPERATOR for rpc in with_paths)


def test_what_the_table_lacks_needs_an_operator():
    assert minimum_role("DropEverything") == Role.OPERATOR
    assert service_minimum_role("other.v1.Admin", "ListModels", HOTWEIGHTS_SERVICE) == Role.OPERATOR
    assert service_minimum_role(HOTWEIGHTS_SERVICE, "ListModels", HOTWEIGHTS_SERVICE) == Role.READER
    for service in READER_SERVICES:
        assert service_minimum_role(service, "Check", HOTWEIGHTS_SERVICE) == Role.READER


def test_an_operator_may_do_what_a_reader_may():
    for needed in Role:
        assert allowed(Role.OPERATOR, needed)
    assert allowed(Role.READER, Role.READER) and not allowed(Role.READER, Role.OPERATOR)


def test_needed_role_reads_grpc_method_paths():
    assert needed_role(f"/{HOTWEIGHTS_SERVICE}/LoadModel") == Role.OPERATOR
    assert needed_role(f"/{HOTWEIGHTS_SERVICE}/Lease") == Role.READER
    assert needed_role("/grpc.health.v1.Health/Check") == Role.READER
    assert needed_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == Role.READER
    assert needed_role(f"/{HOTWEIGHTS_SERVICE}/Rollback") == Role.OPERATOR
    assert needed_role("garbage") == Role.OPERATOR


# ---- the interceptor ----------------------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.trailing: tuple = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_trailing_metadata(self, md: tuple) -> None:
        self.trailing = md

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class FakeRpcError(grpc.RpcError):
    """What a client would see: the context's status as an RpcError."""

    def __init__(self, ctx: FakeContext) -> None:
        self.ctx = ctx

    def code(self) -> grpc.StatusCode:
        assert self.ctx.code is not None
        return self.ctx.code

    def details(self) -> str:
        return self.ctx.details

    def trailing_metadata(self) -> tuple:
        return self.ctx.trailing


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _handler(rpc: str, reached: list[str]) -> grpc.RpcMethodHandler:
    """A handler of the RPC's kind that records that it ran."""
    method = SERVICE.methods_by_name[rpc]

    async def behaviour(_request: Any, _context: Any) -> None:
        reached.append(rpc)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return make(behaviour)


def _through_guard(rpc: str, role: Role = Role.READER) -> tuple[list[str], FakeContext, grpc.RpcMethodHandler]:
    reached: list[str] = []
    guard = RoleGuard(role, "/run/hw/hw.sock", "/run/hw/hw.sock.admin")
    original = _handler(rpc, reached)

    async def continuation(_details: Any) -> grpc.RpcMethodHandler:
        return original

    async def run() -> tuple[FakeContext, grpc.RpcMethodHandler]:
        handler = await guard.intercept_service(continuation, Details(f"/{HOTWEIGHTS_SERVICE}/{rpc}"))
        ctx = FakeContext()
        behaviour = getattr(handler, kind_of(handler))
        try:
            await behaviour(b"\xff\x00 not a message", ctx)
        except Aborted:
            pass
        return ctx, handler

    ctx, handler = asyncio.run(run())
    return reached, ctx, handler


def kind_of(handler: grpc.RpcMethodHandler) -> str:
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]


@pytest.mark.parametrize("rpc", sorted(OPERATOR_RPCS))
def test_the_readers_socket_refuses_operator_rpcs_typed(rpc):
    reached, ctx, handler = _through_guard(rpc)
    assert reached == [], "the servicer must not run"
    method = SERVICE.methods_by_name[rpc]
    assert (handler.request_streaming, handler.response_streaming) == (method.client_streaming, method.server_streaming)
    assert handler.request_deserializer is None  # the refused request is never decoded
    assert ctx.code == grpc.StatusCode.PERMISSION_DENIED
    meta = dict(ctx.trailing)
    assert meta[CLASS_KEY] == "OperatorRequired" and '"operator_socket"' in meta[DETAILS_KEY]
    err = error_from_rpc(FakeRpcError(ctx))
    assert isinstance(err, errors.OperatorRequired) and isinstance(err, errors.PermissionDenied)
    assert err.details["rpc"] == rpc and err.details["operator_socket"] == "/run/hw/hw.sock.admin"
    assert f"{rpc} needs the operator role" in str(err) and "/run/hw/hw.sock.admin" in str(err)


@pytest.mark.parametrize("rpc", sorted(READER_RPCS))
def test_the_readers_socket_passes_reader_rpcs_untouched(rpc):
    reached, ctx, _ = _through_guard(rpc)
    assert reached == [rpc] and ctx.code is None


@pytest.mark.parametrize("rpc", sorted(OPERATOR_RPCS | READER_RPCS))
def test_an_operator_guard_passes_everything(rpc):
    reached, ctx, _ = _through_guard(rpc, Role.OPERATOR)
    assert reached == [rpc] and ctx.code is None


def test_an_unknown_method_stays_unimplemented():
    guard = RoleGuard(Role.READER, "s", "s.admin")

    async def continuation(_details: Any) -> None:
        return None

    assert asyncio.run(guard.intercept_service(continuation, Details("/x.Y/Z"))) is None


def test_operator_required_maps_through_the_one_error_table():
    from hotweights.wire.status import status_of

    assert status_of(errors.OperatorRequired("x")) == grpc.StatusCode.PERMISSION_DENIED
    assert errors.error_class("OperatorRequired") is errors.OperatorRequired


# ---- the client's side ----------------------------------------------------------------------------


def test_the_operator_socket_is_derived_or_named(monkeypatch):
    from hotweights.paths import operator_socket_for
    from hotweights.reach import resolve_operator_socket

    assert operator_socket_for("/run/hw/hw.sock") == "/run/hw/hw.sock.admin"
    assert operator_socket_for("/run/hw/hw.sock", " AUTO ") == "/run/hw/hw.sock.admin"
    assert operator_socket_for("/run/hw/hw.sock", "/ops/hw") == "/ops/hw"
    monkeypatch.delenv("HOTWEIGHTS_OPERATOR_SOCKET", raising=False)
    assert resolve_operator_socket("/s")[0] == "/s.admin"
    monkeypatch.setenv("HOTWEIGHTS_OPERATOR_SOCKET", "/e")
    assert resolve_operator_socket("/s") == ("/e", "HOTWEIGHTS_OPERATOR_SOCKET")
    assert resolve_operator_socket("/s", "/a")[0] == "/a"
    monkeypatch.setenv("HOTWEIGHTS_OPERATOR_SOCKET", "auto")  # as the daemon reads it: <socket>.admin
    assert resolve_operator_socket("/s")[0] == "/s.admin"
    assert resolve_operator_socket("/s", "auto")[0] == "/s.admin"


def test_one_variable_names_the_operator_socket_for_daemon_and_client():
    from hotweightsd.config import load_config

    cfg = load_config("none", env={"HOTWEIGHTS_SOCKET": "/r/hw.sock", "HOTWEIGHTS_OPERATOR_SOCKET": "/r/ops"})
    assert cfg.operator_socket == "/r/ops"
    cfg = load_config("none", env={"HOTWEIGHTS_SOCKET": "/r/hw.sock"})
    assert cfg.operator_socket == "/r/hw.sock.admin" and cfg.operator_group == ""


def test_an_operator_socket_that_refuses_the_user_means_operator_required():
    import os
    import stat as stat_

    from hotweights.reach import operator_unreachable

    def socket_0600(path: str) -> os.stat_result:
        return os.stat_result((stat_.S_IFSOCK | 0o600, 0, 0, 1, 0, 0, 0, 0, 0, 0))

    def closed_dir(path: str) -> os.stat_result:
        raise PermissionError(path)

    refused = errors.Unavailable("permission denied", reason="permission")
    err = operator_unreachable("LoadModel", "/r/hw.sock.admin", "origin", refused, stat=socket_0600)
    assert isinstance(err, errors.OperatorRequired)
    assert "LoadModel needs the operator role" in str(err) and "/r/hw.sock.admin is mode 0600" in str(err)
    assert err.details["operator_socket"] == "/r/hw.sock.admin" and "hotweights-admin" in err.details["fix"]
    # a directory on the way that the user may not enter, or no daemon at all: the plain diagnosis
    assert operator_unreachable("LoadModel", "/r/x", "o", refused, stat=closed_dir) is refused
    absent = errors.Unavailable("no socket", reason="not_found")
    assert operator_unreachable("LoadModel", "/r/x", "o", absent, stat=socket_0600) is absent

    def answers(path: str) -> None:
        pass

    def refuses(path: str) -> None:
        raise ConnectionRefusedError(path)

    # no operator socket, but a daemon on the readers' socket: the operator socket is elsewhere
    err = operator_unreachable(
        "LoadModel", "/r/hw.sock.admin", "o", absent, readers_socket="/r/hw.sock", connect=answers
    )
    assert isinstance(err, errors.Unavailable) and err.details["reason"] == "no_operator_socket"
    assert "a daemon answers on /r/hw.sock, but there is no operator socket at /r/hw.sock.admin" in str(err)
    assert "--operator-socket" in err.details["fix"]
    assert operator_unreachable("LoadModel", "/r/x", "o", absent, readers_socket="/r/s", connect=refuses) is absent
