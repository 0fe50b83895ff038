"""Who may call what: the two roles and the least role each RPC needs, as data.

Readers (serving processes) attach, hold leases, fetch handles, list, watch and read status.
Operators may do all of that and also change what is resident: load, unload, swap, alias, and
anything that names a path. A caller's role is the socket it came in on, never what it says;
``hotweightsd.server.roles`` checks this table there, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType


class Role(IntEnum):
    """Ordered: a higher role may do everything a lower one may."""

    READER = 1
    OPERATOR = 2


# Every RPC of hotweights.v1.Hotweights; an RPC missing here needs OPERATOR (fail closed).
MINIMUM_ROLE: Mapping[str, Role] = MappingProxyType(
    {
        "ListModels": Role.READER,
        "Status": Role.READER,
        "Watch": Role.READER,
        "Lease": Role.READER,
        "GetHandles": Role.READER,
        "LoadModel": Role.OPERATOR,
        "UnloadModel": Role.OPERATOR,
        "SwapModel": Role.OPERATOR,
        "SetAlias": Role.OPERATOR,
        "Rollback": Role.OPERATOR,
    }
)

# Services beside Hotweights that only describe the daemon: every caller may use them.
READER_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


def minimum_role(rpc: str) -> Role:
    """The least role that may call the Hotweights RPC ``rpc``; OPERATOR for one the table lacks."""
    return MINIMUM_ROLE.get(rpc, Role.OPERATOR)


def service_minimum_role(service: str, rpc: str, hotweights_service: str) -> Role:
    """The least role for ``rpc`` of ``service`` (full names); ``hotweights_service`` is the full
    name of the Hotweights service, whose RPCs the table above covers. Unknown services: OPERATOR."""
    if service == hotweights_service:
        return minimum_role(rpc)
    if service in READER_SERVICES:
        return Role.READER
    return Role.OPERATOR


def allowed(role: Role, needed: Role) -> bool:
    return role >= needed
