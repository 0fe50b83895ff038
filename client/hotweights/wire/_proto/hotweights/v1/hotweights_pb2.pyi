from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    LOADING: _ClassVar[ModelState]
    READY: _ClassVar[ModelState]
    FAILED: _ClassVar[ModelState]
    UNLOADING: _ClassVar[ModelState]
    DRAINING: _ClassVar[ModelState]

class HandleType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HANDLE_TYPE_UNSPECIFIED: _ClassVar[HandleType]
    MEMFD: _ClassVar[HandleType]
    CUDA_VMM_FD: _ClassVar[HandleType]
    CUDA_IPC: _ClassVar[HandleType]

class VerifyLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFY_DEFAULT: _ClassVar[VerifyLevel]
    VERIFY_NONE: _ClassVar[VerifyLevel]
    VERIFY_FAST: _ClassVar[VerifyLevel]
    VERIFY_FULL: _ClassVar[VerifyLevel]

class AllocationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_MODE_DEFAULT: _ClassVar[AllocationMode]
    ALLOCATION_FD: _ClassVar[AllocationMode]
    ALLOCATION_LEGACY_IPC: _ClassVar[AllocationMode]

class SwapMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWAP_MODE_DEFAULT: _ClassVar[SwapMode]
    SWAP_SIDE_BY_SIDE: _ClassVar[SwapMode]
    SWAP_DRAIN: _ClassVar[SwapMode]

class KeepPrevious(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEEP_PREVIOUS_DEFAULT: _ClassVar[KeepPrevious]
    KEEP_PREVIOUS_YES: _ClassVar[KeepPrevious]
    KEEP_PREVIOUS_NO: _ClassVar[KeepPrevious]
MODEL_STATE_UNSPECIFIED: ModelState
LOADING: ModelState
READY: ModelState
FAILED: ModelState
UNLOADING: ModelState
DRAINING: ModelState
HANDLE_TYPE_UNSPECIFIED: HandleType
MEMFD: HandleType
CUDA_VMM_FD: HandleType
CUDA_IPC: HandleType
VERIFY_DEFAULT: VerifyLevel
VERIFY_NONE: VerifyLevel
VERIFY_FAST: VerifyLevel
VERIFY_FULL: VerifyLevel
ALLOCATION_MODE_DEFAULT: AllocationMode
ALLOCATION_FD: AllocationMode
ALLOCATION_LEGACY_IPC: AllocationMode
SWAP_MODE_DEFAULT: SwapMode
SWAP_SIDE_BY_SIDE: SwapMode
SWAP_DRAIN: SwapMode
KEEP_PREVIOUS_DEFAULT: KeepPrevious
KEEP_PREVIOUS_YES: KeepPrevious
KEEP_PREVIOUS_NO: KeepPrevious

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path", "version", "alias", "verify", "allocation", "device_map", "wait", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    version: str
    alias: str
    verify: VerifyLevel
    allocation: AllocationMode
    device_map: _containers.RepeatedScalarFieldContainer[int]
    wait: bool
    layout: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., verify: _Optional[_Union[VerifyLevel, str]] = ..., allocation: _Optional[_Union[AllocationMode, str]] = ..., device_map: _Optional[_Iterable[int]] = ..., wait: _Optional[bool] = ..., layout: _Optional[str] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "phase")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    phase: str
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class LoadEvent(_message.Message):
    __slots__ = ("progress", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: LoadProgress
    done: ModelVersionInfo
    def __init__(self, progress: _Optional[_Union[LoadProgress, _Mapping]] = ..., done: _Optional[_Union[ModelVersionInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("ref", "force")
    REF_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    force: bool
    def __init__(self, ref: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("unloaded", "bytes_freed")
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    bytes_freed: int
    def __init__(self, unloaded: _Optional[_Iterable[str]] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions", "aliases")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    aliases: _containers.RepeatedCompositeFieldContainer[AliasInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ..., aliases: _Optional[_Iterable[_Union[AliasInfo, _Mapping]]] = ...) -> None: ...

class AliasInfo(_message.Message):
    __slots__ = ("alias", "name", "version")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    name: str
    version: str
    def __init__(self, alias: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "device", "bytes", "tensors", "allocations", "resident_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: int
    bytes: int
    tensors: int
    allocations: int
    resident_bytes: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[int] = ..., bytes: _Optional[int] = ..., tensors: _Optional[int] = ..., allocations: _Optional[int] = ..., resident_bytes: _Optional[int] = ...) -> None: ...

class ModelVersionInfo(_message.Message):
    __slots__ = ("name", "version", "source", "state", "error", "ranks", "bytes", "leases", "load_seconds", "load_path", "aliases", "created_unix", "allocation", "backend", "already_loaded", "retired", "held_until_unix", "previous_of", "previous_note", "shares_memory_with", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_PATH_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    HELD_UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OF_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_NOTE_FIELD_NUMBER: _ClassVar[int]
    SHARES_MEMORY_WITH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    source: str
    state: ModelState
    error: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    bytes: int
    leases: int
    load_seconds: float
    load_path: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    created_unix: float
    allocation: AllocationMode
    backend: str
    already_loaded: bool
    retired: bool
    held_until_unix: float
    previous_of: str
    previous_note: str
    shares_memory_with: str
    layout: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., error: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ..., bytes: _Optional[int] = ..., leases: _Optional[int] = ..., load_seconds: _Optional[float] = ..., load_path: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., created_unix: _Optional[float] = ..., allocation: _Optional[_Union[AllocationMode, str]] = ..., backend: _Optional[str] = ..., already_loaded: _Optional[bool] = ..., retired: _Optional[bool] = ..., held_until_unix: _Optional[float] = ..., previous_of: _Optional[str] = ..., previous_note: _Optional[str] = ..., shares_memory_with: _Optional[str] = ..., layout: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "strides", "allocation", "offset", "nbytes", "served_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SERVED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    allocation: int
    offset: int
    nbytes: int
    served_dtype: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., allocation: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., served_dtype: _Optional[str] = ...) -> None: ...

class TensorTable(_message.Message):
    __slots__ = ("name", "dtype", "served_dtype", "allocation", "offset", "nbytes", "ndim", "dims")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SERVED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NDIM_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    name: _containers.RepeatedScalarFieldContainer[str]
    dtype: _containers.RepeatedScalarFieldContainer[str]
    served_dtype: _containers.RepeatedScalarFieldContainer[str]
    allocation: _containers.RepeatedScalarFieldContainer[int]
    offset: _containers.RepeatedScalarFieldContainer[int]
    nbytes: _containers.RepeatedScalarFieldContainer[int]
    ndim: _containers.RepeatedScalarFieldContainer[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Iterable[str]] = ..., served_dtype: _Optional[_Iterable[str]] = ..., allocation: _Optional[_Iterable[int]] = ..., offset: _Optional[_Iterable[int]] = ..., nbytes: _Optional[_Iterable[int]] = ..., ndim: _Optional[_Iterable[int]] = ..., dims: _Optional[_Iterable[int]] = ...) -> None: ...

class AllocationInfo(_message.Message):
    __slots__ = ("index", "size", "handle_type", "device", "ipc_handle", "device_bus_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    size: int
    handle_type: HandleType
    device: int
    ipc_handle: bytes
    device_bus_id: str
    def __init__(self, index: _Optional[int] = ..., size: _Optional[int] = ..., handle_type: _Optional[_Union[HandleType, str]] = ..., device: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., device_bus_id: _Optional[str] = ...) -> None: ...

class GetHandlesRequest(_message.Message):
    __slots__ = ("lease_id", "rank", "compact_table", "lease_key")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    COMPACT_TABLE_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEY_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    rank: int
    compact_table: bool
    lease_key: str
    def __init__(self, lease_id: _Optional[str] = ..., rank: _Optional[int] = ..., compact_table: _Optional[bool] = ..., lease_key: _Optional[str] = ...) -> None: ...

class GetHandlesResponse(_message.Message):
    __slots__ = ("name", "version", "rank", "world_size", "tensors", "allocations", "ticket", "fd_socket", "ticket_ttl_seconds", "table")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    FD_SOCKET_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    rank: int
    world_size: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    allocations: _containers.RepeatedCompositeFieldContainer[AllocationInfo]
    ticket: str
    fd_socket: str
    ticket_ttl_seconds: float
    table: TensorTable
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., allocations: _Optional[_Iterable[_Union[AllocationInfo, _Mapping]]] = ..., ticket: _Optional[str] = ..., fd_socket: _Optional[str] = ..., ticket_ttl_seconds: _Optional[float] = ..., table: _Optional[_Union[TensorTable, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("open", "release")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    open: LeaseOpen
    release: LeaseRelease
    def __init__(self, open: _Optional[_Union[LeaseOpen, _Mapping]] = ..., release: _Optional[_Union[LeaseRelease, _Mapping]] = ...) -> None: ...

class LeaseOpen(_message.Message):
    __slots__ = ("ref", "pid", "holder", "with_handles", "rank", "compact_table", "follow")
    REF_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    WITH_HANDLES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    COMPACT_TABLE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    ref: str
    pid: int
    holder: str
    with_handles: bool
    rank: int
    compact_table: bool
    follow: str
    def __init__(self, ref: _Optional[str] = ..., pid: _Optional[int] = ..., holder: _Optional[str] = ..., with_handles: _Optional[bool] = ..., rank: _Optional[int] = ..., compact_table: _Optional[bool] = ..., follow: _Optional[str] = ...) -> None: ...

class LeaseRelease(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseEvent(_message.Message):
    __slots__ = ("granted", "alias_moved")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    ALIAS_MOVED_FIELD_NUMBER: _ClassVar[int]
    granted: LeaseGranted
    alias_moved: AliasMoved
    def __init__(self, granted: _Optional[_Union[LeaseGranted, _Mapping]] = ..., alias_moved: _Optional[_Union[AliasMoved, _Mapping]] = ...) -> None: ...

class LeaseGranted(_message.Message):
    __slots__ = ("lease_id", "name", "version", "world_size", "handles", "lease_key")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEY_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    name: str
    version: str
    world_size: int
    handles: GetHandlesResponse
    lease_key: str
    def __init__(self, lease_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., world_size: _Optional[int] = ..., handles: _Optional[_Union[GetHandlesResponse, _Mapping]] = ..., lease_key: _Optional[str] = ...) -> None: ...

class LeaseInfo(_message.Message):
    __slots__ = ("lease_id", "name", "version", "pid", "uid", "holder", "started_unix", "ref")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    name: str
    version: str
    pid: int
    uid: int
    holder: str
    started_unix: float
    ref: str
    def __init__(self, lease_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., holder: _Optional[str] = ..., started_unix: _Optional[float] = ..., ref: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("index", "name", "total_bytes", "free_bytes", "resident_bytes", "reserve_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    resident_bytes: int
    reserve_bytes: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., reserve_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("daemon_version", "pid", "backend", "socket", "uptime_seconds", "devices", "versions", "leases", "aliases", "resident_bytes", "open_allocations", "gds", "restored", "restore_note", "start_failures")
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    GDS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_NOTE_FIELD_NUMBER: _ClassVar[int]
    START_FAILURES_FIELD_NUMBER: _ClassVar[int]
    daemon_version: str
    pid: int
    backend: str
    socket: str
    uptime_seconds: float
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseInfo]
    aliases: _containers.RepeatedCompositeFieldContainer[AliasInfo]
    resident_bytes: int
    open_allocations: int
    gds: str
    restored: bool
    restore_note: str
    start_failures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, daemon_version: _Optional[str] = ..., pid: _Optional[int] = ..., backend: _Optional[str] = ..., socket: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseInfo, _Mapping]]] = ..., aliases: _Optional[_Iterable[_Union[AliasInfo, _Mapping]]] = ..., resident_bytes: _Optional[int] = ..., open_allocations: _Optional[int] = ..., gds: _Optional[str] = ..., restored: _Optional[bool] = ..., restore_note: _Optional[str] = ..., start_failures: _Optional[_Iterable[str]] = ...) -> None: ...

class SwapModelRequest(_message.Message):
    __slots__ = ("alias", "target", "version", "mode", "drain_timeout_seconds", "verify", "name", "create", "keep_previous", "layout")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    target: str
    version: str
    mode: SwapMode
    drain_timeout_seconds: float
    verify: VerifyLevel
    name: str
    create: bool
    keep_previous: KeepPrevious
    layout: str
    def __init__(self, alias: _Optional[str] = ..., target: _Optional[str] = ..., version: _Optional[str] = ..., mode: _Optional[_Union[SwapMode, str]] = ..., drain_timeout_seconds: _Optional[float] = ..., verify: _Optional[_Union[VerifyLevel, str]] = ..., name: _Optional[str] = ..., create: _Optional[bool] = ..., keep_previous: _Optional[_Union[KeepPrevious, str]] = ..., layout: _Optional[str] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias", "target", "create", "remove")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    alias: str
    target: str
    create: bool
    remove: bool
    def __init__(self, alias: _Optional[str] = ..., target: _Optional[str] = ..., create: _Optional[bool] = ..., remove: _Optional[bool] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: AliasInfo
    def __init__(self, alias: _Optional[_Union[AliasInfo, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("alias", "old_version", "version")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    alias: AliasInfo
    old_version: str
    version: ModelVersionInfo
    def __init__(self, alias: _Optional[_Union[AliasInfo, _Mapping]] = ..., old_version: _Optional[str] = ..., version: _Optional[_Union[ModelVersionInfo, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class AliasMoved(_message.Message):
    __slots__ = ("alias", "name", "old_version", "new_version")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    name: str
    old_version: str
    new_version: str
    def __init__(self, alias: _Optional[str] = ..., name: _Optional[str] = ..., old_version: _Optional[str] = ..., new_version: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "name", "version", "alias", "old_version", "message", "time_unix", "seq")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[WatchEvent.Kind]
        VERSION_ADDED: _ClassVar[WatchEvent.Kind]
        VERSION_READY: _ClassVar[WatchEvent.Kind]
        VERSION_FAILED: _ClassVar[WatchEvent.Kind]
        ALIAS_MOVED: _ClassVar[WatchEvent.Kind]
        VERSION_DRAINING: _ClassVar[WatchEvent.Kind]
        VERSION_FREED: _ClassVar[WatchEvent.Kind]
        ALIAS_REMOVED: _ClassVar[WatchEvent.Kind]
    KIND_UNSPECIFIED: WatchEvent.Kind
    VERSION_ADDED: WatchEvent.Kind
    VERSION_READY: WatchEvent.Kind
    VERSION_FAILED: WatchEvent.Kind
    ALIAS_MOVED: WatchEvent.Kind
    VERSION_DRAINING: WatchEvent.Kind
    VERSION_FREED: WatchEvent.Kind
    ALIAS_REMOVED: WatchEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    kind: WatchEvent.Kind
    name: str
    version: str
    alias: str
    old_version: str
    message: str
    time_unix: float
    seq: int
    def __init__(self, kind: _Optional[_Union[WatchEvent.Kind, str]] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., old_version: _Optional[str] = ..., message: _Optional[str] = ..., time_unix: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...
