"""The role check: the readers' gRPC server refuses what needs an operator (``core.roles`` says what).

The role is the socket a call came in on: this interceptor sits on the readers' server only; the
operator server (its socket 0600, or 0660 for the operator group) takes every call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from hotweights.errors import OperatorRequired
from hotweights.wire.pb import pb
from hotweights.wire.status import abort_with
from hotweightsd.core.roles import Role, allowed, service_minimum_role

log = structlog.get_logger("hotweightsd.roles")
HOTWEIGHTS_SERVICE = pb.DESCRIPTOR.services_by_name["Hotweights"].full_name


def needed_role(method: str) -> Role:
    """The least role for a call to ``method`` (gRPC's ``/package.Service/Rpc``)."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    return service_minimum_role(service, rpc, HOTWEIGHTS_SERVICE)


class RoleGuard(grpc.aio.ServerInterceptor):
    """Lets through the calls ``role`` may make; answers the others PERMISSION_DENIED with
    ``OperatorRequired`` naming ``operator_socket``, before the request is even decoded."""

    def __init__(self, role: Role, socket: str, operator_socket: str) -> None:
        self.role = role
        self.socket = socket
        self.operator_socket = operator_socket

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or allowed(self.role, needed_role(method)):
            return handler
        rpc = method.rpartition("/")[2]
        log.info("rpc.operator_required", rpc=rpc, socket=self.socket)
        return refusal(
            handler,
            OperatorRequired(
                f"{rpc} needs the operator role: this socket ({self.socket}) serves readers; operators call it "
                f"on {self.operator_socket}",
                rpc=rpc,
                socket=self.socket,
                operator_socket=self.operator_socket,
            ),
        )


def refusal(handler: grpc.RpcMethodHandler, err: OperatorRequired) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with ``err``; the request stays undecoded bytes."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort_with(context, err)

    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse)
