from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PayloadEnd(_message.Message):
    __slots__ = ("size", "sha256", "xxh3_128")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    XXH3_128_FIELD_NUMBER: _ClassVar[int]
    size: int
    sha256: str
    xxh3_128: str
    def __init__(self, size: _Optional[int] = ..., sha256: _Optional[str] = ..., xxh3_128: _Optional[str] = ...) -> None: ...

class AppInfo(_message.Message):
    __slots__ = ("name", "version", "has_custom_code", "deployed_at", "consent_status", "consent_reason", "missing_requirements")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_CUSTOM_CODE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_AT_FIELD_NUMBER: _ClassVar[int]
    CONSENT_STATUS_FIELD_NUMBER: _ClassVar[int]
    CONSENT_REASON_FIELD_NUMBER: _ClassVar[int]
    MISSING_REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    has_custom_code: bool
    deployed_at: float
    consent_status: str
    consent_reason: str
    missing_requirements: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., has_custom_code: _Optional[bool] = ..., deployed_at: _Optional[float] = ..., consent_status: _Optional[str] = ..., consent_reason: _Optional[str] = ..., missing_requirements: _Optional[_Iterable[str]] = ...) -> None: ...

class DeployAppHeader(_message.Message):
    __slots__ = ("payload_size",)
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    payload_size: int
    def __init__(self, payload_size: _Optional[int] = ...) -> None: ...

class DeployAppRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: DeployAppHeader
    chunk: DataChunk
    end: PayloadEnd
    def __init__(self, header: _Optional[_Union[DeployAppHeader, _Mapping]] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., end: _Optional[_Union[PayloadEnd, _Mapping]] = ...) -> None: ...

class DeployAppReply(_message.Message):
    __slots__ = ("app", "newly_deployed")
    APP_FIELD_NUMBER: _ClassVar[int]
    NEWLY_DEPLOYED_FIELD_NUMBER: _ClassVar[int]
    app: AppInfo
    newly_deployed: bool
    def __init__(self, app: _Optional[_Union[AppInfo, _Mapping]] = ..., newly_deployed: _Optional[bool] = ...) -> None: ...

class SubmitTaskHeader(_message.Message):
    __slots__ = ("task_id", "app_name", "app_version", "round", "kind", "config_json", "num_gpus", "payload_size", "payload_sha256", "offset", "num_processes", "payload_xxh3_128")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    APP_NAME_FIELD_NUMBER: _ClassVar[int]
    APP_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_XXH3_128_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    app_name: str
    app_version: str
    round: int
    kind: str
    config_json: str
    num_gpus: int
    payload_size: int
    payload_sha256: str
    offset: int
    num_processes: int
    payload_xxh3_128: str
    def __init__(self, task_id: _Optional[str] = ..., app_name: _Optional[str] = ..., app_version: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[str] = ..., config_json: _Optional[str] = ..., num_gpus: _Optional[int] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., offset: _Optional[int] = ..., num_processes: _Optional[int] = ..., payload_xxh3_128: _Optional[str] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: SubmitTaskHeader
    chunk: DataChunk
    end: PayloadEnd
    def __init__(self, header: _Optional[_Union[SubmitTaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., end: _Optional[_Union[PayloadEnd, _Mapping]] = ...) -> None: ...

class SubmitTaskReply(_message.Message):
    __slots__ = ("state", "created")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    created: bool
    def __init__(self, state: _Optional[_Union[TaskState, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class UploadOffsetRequest(_message.Message):
    __slots__ = ("task_id", "payload_size", "payload_sha256", "payload_xxh3_128")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_XXH3_128_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    payload_size: int
    payload_sha256: str
    payload_xxh3_128: str
    def __init__(self, task_id: _Optional[str] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., payload_xxh3_128: _Optional[str] = ...) -> None: ...

class UploadOffsetReply(_message.Message):
    __slots__ = ("offset", "task_exists")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TASK_EXISTS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    task_exists: bool
    def __init__(self, offset: _Optional[int] = ..., task_exists: _Optional[bool] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task_id", "after_seq")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    after_seq: int
    def __init__(self, task_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class TaskState(_message.Message):
    __slots__ = ("task_id", "app_name", "app_version", "round", "kind", "status", "progress", "metrics", "error", "gpus", "num_samples", "result_available", "seq", "created_at", "started_at", "finished_at", "summary_json", "history")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    APP_NAME_FIELD_NUMBER: _ClassVar[int]
    APP_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RESULT_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    app_name: str
    app_version: str
    round: int
    kind: str
    status: str
    progress: float
    metrics: _containers.ScalarMap[str, float]
    error: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    num_samples: int
    result_available: bool
    seq: int
    created_at: float
    started_at: float
    finished_at: float
    summary_json: str
    history: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    def __init__(self, task_id: _Optional[str] = ..., app_name: _Optional[str] = ..., app_version: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[str] = ..., status: _Optional[str] = ..., progress: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ..., num_samples: _Optional[int] = ..., result_available: _Optional[bool] = ..., seq: _Optional[int] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., summary_json: _Optional[str] = ..., history: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("step", "time", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    time: float
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., time: _Optional[float] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FetchResultRequest(_message.Message):
    __slots__ = ("task_id", "offset", "checksums")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    offset: int
    checksums: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., offset: _Optional[int] = ..., checksums: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchResultHeader(_message.Message):
    __slots__ = ("state", "payload_size", "offset", "checksum")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    payload_size: int
    offset: int
    checksum: str
    def __init__(self, state: _Optional[_Union[TaskState, _Mapping]] = ..., payload_size: _Optional[int] = ..., offset: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class FetchResultReply(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: FetchResultHeader
    chunk: DataChunk
    end: PayloadEnd
    def __init__(self, header: _Optional[_Union[FetchResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., end: _Optional[_Union[PayloadEnd, _Mapping]] = ...) -> None: ...

class AcknowledgeResultReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Identity(_message.Message):
    __slots__ = ("name", "org", "kind", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    org: str
    kind: str
    role: str
    def __init__(self, name: _Optional[str] = ..., org: _Optional[str] = ..., kind: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("project", "site", "org", "version", "gpus", "allow_custom_code", "apps", "active_tasks", "task_counts", "started_at", "caller", "attachments", "data_version", "data_version_source", "data_version_seen_at", "custom_code_policy", "payload_checksums")
    class TaskCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CUSTOM_CODE_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_CODE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    project: str
    site: str
    org: str
    version: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    allow_custom_code: bool
    apps: _containers.RepeatedCompositeFieldContainer[AppInfo]
    active_tasks: _containers.RepeatedCompositeFieldContainer[TaskState]
    task_counts: _containers.ScalarMap[str, int]
    started_at: float
    caller: Identity
    attachments: _containers.RepeatedCompositeFieldContainer[RelayAttachment]
    data_version: str
    data_version_source: str
    data_version_seen_at: float
    custom_code_policy: str
    payload_checksums: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, project: _Optional[str] = ..., site: _Optional[str] = ..., org: _Optional[str] = ..., version: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ..., allow_custom_code: _Optional[bool] = ..., apps: _Optional[_Iterable[_Union[AppInfo, _Mapping]]] = ..., active_tasks: _Optional[_Iterable[_Union[TaskState, _Mapping]]] = ..., task_counts: _Optional[_Mapping[str, int]] = ..., started_at: _Optional[float] = ..., caller: _Optional[_Union[Identity, _Mapping]] = ..., attachments: _Optional[_Iterable[_Union[RelayAttachment, _Mapping]]] = ..., data_version: _Optional[str] = ..., data_version_source: _Optional[str] = ..., data_version_seen_at: _Optional[float] = ..., custom_code_policy: _Optional[str] = ..., payload_checksums: _Optional[_Iterable[str]] = ...) -> None: ...

class RelayAttachment(_message.Message):
    __slots__ = ("relay", "address", "connected_since", "last_ping", "attached", "error")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_PING_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    relay: str
    address: str
    connected_since: float
    last_ping: float
    attached: bool
    error: str
    def __init__(self, relay: _Optional[str] = ..., address: _Optional[str] = ..., connected_since: _Optional[float] = ..., last_ping: _Optional[float] = ..., attached: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
