from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: int | None = ..., end: int | None = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("memory_bytes", "device", "throughput")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    device: str
    throughput: float
    def __init__(
        self, memory_bytes: int | None = ..., device: str | None = ..., throughput: float | None = ...
    ) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = (
        "peer_id",
        "multiaddrs",
        "capacity",
        "base_fingerprint",
        "software_version",
        "join_token",
        "round_id",
        "public_key",
        "challenge",
        "signature",
        "role",
        "preferred_span",
        "max_blocks",
        "quantize",
        "spec_nonce",
    )
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_SPAN_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    SPEC_NONCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    capacity: Capacity
    base_fingerprint: str
    software_version: str
    join_token: str
    round_id: str
    public_key: bytes
    challenge: str
    signature: bytes
    role: str
    preferred_span: Span
    max_blocks: int
    quantize: str
    spec_nonce: bytes
    def __init__(
        self,
        peer_id: str | None = ...,
        multiaddrs: _Iterable[str] | None = ...,
        capacity: Capacity | _Mapping | None = ...,
        base_fingerprint: str | None = ...,
        software_version: str | None = ...,
        join_token: str | None = ...,
        round_id: str | None = ...,
        public_key: bytes | None = ...,
        challenge: str | None = ...,
        signature: bytes | None = ...,
        role: str | None = ...,
        preferred_span: Span | _Mapping | None = ...,
        max_blocks: int | None = ...,
        quantize: str | None = ...,
        spec_nonce: bytes | None = ...,
    ) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = (
        "accepted",
        "span",
        "round_spec_json",
        "heartbeat_interval_s",
        "reject_reason",
        "round_id",
        "reject_code",
        "dht_initial_peers",
        "credential",
        "round_spec_signature",
    )
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REJECT_CODE_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROUND_SPEC_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    span: Span
    round_spec_json: str
    heartbeat_interval_s: float
    reject_reason: str
    round_id: str
    reject_code: str
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    credential: str
    round_spec_signature: str
    def __init__(
        self,
        accepted: bool | None = ...,
        span: Span | _Mapping | None = ...,
        round_spec_json: str | None = ...,
        heartbeat_interval_s: float | None = ...,
        reject_reason: str | None = ...,
        round_id: str | None = ...,
        reject_code: str | None = ...,
        dht_initial_peers: _Iterable[str] | None = ...,
        credential: str | None = ...,
        round_spec_signature: str | None = ...,
    ) -> None: ...

class Progress(_message.Message):
    __slots__ = ("samples", "tokens", "loss", "throughput", "epoch")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    samples: int
    tokens: int
    loss: float
    throughput: float
    epoch: int
    def __init__(
        self,
        samples: int | None = ...,
        tokens: int | None = ...,
        loss: float | None = ...,
        throughput: float | None = ...,
        epoch: int | None = ...,
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id", "round_id", "progress", "span", "credential", "accusations")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ACCUSATIONS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round_id: str
    progress: Progress
    span: Span
    credential: str
    accusations: _containers.RepeatedCompositeFieldContainer[Accusation]
    def __init__(
        self,
        peer_id: str | None = ...,
        round_id: str | None = ...,
        progress: Progress | _Mapping | None = ...,
        span: Span | _Mapping | None = ...,
        credential: str | None = ...,
        accusations: _Iterable[Accusation | _Mapping] | None = ...,
    ) -> None: ...

class Accusation(_message.Message):
    __slots__ = ("peer_id", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reason: str
    def __init__(self, peer_id: str | None = ..., reason: str | None = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = (
        "ok",
        "span",
        "round_state",
        "action",
        "heartbeat_interval_s",
        "message",
        "next_round_id",
        "eval_candidate_sha256",
    )
    OK_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EVAL_CANDIDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    span: Span
    round_state: str
    action: str
    heartbeat_interval_s: float
    message: str
    next_round_id: str
    eval_candidate_sha256: str
    def __init__(
        self,
        ok: bool | None = ...,
        span: Span | _Mapping | None = ...,
        round_state: str | None = ...,
        action: str | None = ...,
        heartbeat_interval_s: float | None = ...,
        message: str | None = ...,
        next_round_id: str | None = ...,
        eval_candidate_sha256: str | None = ...,
    ) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("peer_id", "round_id", "credential")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round_id: str
    credential: str
    def __init__(self, peer_id: str | None = ..., round_id: str | None = ..., credential: str | None = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: bool | None = ...) -> None: ...

class GetRoundSpecRequest(_message.Message):
    __slots__ = ("round_id", "spec_nonce")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_NONCE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    spec_nonce: bytes
    def __init__(self, round_id: str | None = ..., spec_nonce: bytes | None = ...) -> None: ...

class GetRoundSpecResponse(_message.Message):
    __slots__ = (
        "round_id",
        "round_spec_json",
        "state",
        "created_at",
        "started_at",
        "ended_at",
        "samples",
        "epoch",
        "reason",
        "adapter_version",
        "join_challenge",
        "candidate_sha256",
        "round_spec_signature",
        "server_time",
        "software_version",
    )
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOIN_CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_SPEC_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    round_spec_json: str
    state: str
    created_at: float
    started_at: float
    ended_at: float
    samples: int
    epoch: int
    reason: str
    adapter_version: str
    join_challenge: str
    candidate_sha256: str
    round_spec_signature: str
    server_time: float
    software_version: str
    def __init__(
        self,
        round_id: str | None = ...,
        round_spec_json: str | None = ...,
        state: str | None = ...,
        created_at: float | None = ...,
        started_at: float | None = ...,
        ended_at: float | None = ...,
        samples: int | None = ...,
        epoch: int | None = ...,
        reason: str | None = ...,
        adapter_version: str | None = ...,
        join_challenge: str | None = ...,
        candidate_sha256: str | None = ...,
        round_spec_signature: str | None = ...,
        server_time: float | None = ...,
        software_version: str | None = ...,
    ) -> None: ...

class CheckReachabilityRequest(_message.Message):
    __slots__ = ("peer_id", "multiaddrs")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: str | None = ..., multiaddrs: _Iterable[str] | None = ...) -> None: ...

class CheckReachabilityResponse(_message.Message):
    __slots__ = ("observed_ip", "reached", "tried", "detail", "relays")
    OBSERVED_IP_FIELD_NUMBER: _ClassVar[int]
    REACHED_FIELD_NUMBER: _ClassVar[int]
    TRIED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    observed_ip: str
    reached: _containers.RepeatedScalarFieldContainer[str]
    tried: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    relays: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        observed_ip: str | None = ...,
        reached: _Iterable[str] | None = ...,
        tried: _Iterable[str] | None = ...,
        detail: str | None = ...,
        relays: _Iterable[str] | None = ...,
    ) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterEntry(_message.Message):
    __slots__ = ("version", "parents", "round_id", "created_at", "eval_loss_before", "eval_loss_after", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: str
    parents: _containers.RepeatedScalarFieldContainer[str]
    round_id: str
    created_at: float
    eval_loss_before: float
    eval_loss_after: float
    sha256: str
    def __init__(
        self,
        version: str | None = ...,
        parents: _Iterable[str] | None = ...,
        round_id: str | None = ...,
        created_at: float | None = ...,
        eval_loss_before: float | None = ...,
        eval_loss_after: float | None = ...,
        sha256: str | None = ...,
    ) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterEntry]
    def __init__(self, adapters: _Iterable[AdapterEntry | _Mapping] | None = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: str | None = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("file_name", "offset", "data", "file_size", "version")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    data: bytes
    file_size: int
    version: str
    def __init__(
        self,
        file_name: str | None = ...,
        offset: int | None = ...,
        data: bytes | None = ...,
        file_size: int | None = ...,
        version: str | None = ...,
    ) -> None: ...

class UploadSpanStateRequest(_message.Message):
    __slots__ = ("peer_id", "round_id", "span", "epoch", "safetensors", "samples", "credential")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round_id: str
    span: Span
    epoch: int
    safetensors: bytes
    samples: int
    credential: str
    def __init__(
        self,
        peer_id: str | None = ...,
        round_id: str | None = ...,
        span: Span | _Mapping | None = ...,
        epoch: int | None = ...,
        safetensors: bytes | None = ...,
        samples: int | None = ...,
        credential: str | None = ...,
    ) -> None: ...

class UploadSpanStateResponse(_message.Message):
    __slots__ = ("ok", "sha256", "size_bytes")
    OK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    sha256: str
    size_bytes: int
    def __init__(self, ok: bool | None = ..., sha256: str | None = ..., size_bytes: int | None = ...) -> None: ...

class ReportEvalRequest(_message.Message):
    __slots__ = (
        "peer_id",
        "round_id",
        "adapter_version",
        "epoch",
        "eval_loss",
        "eval_tokens",
        "credential",
        "candidate_sha256",
    )
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round_id: str
    adapter_version: str
    epoch: int
    eval_loss: float
    eval_tokens: int
    credential: str
    candidate_sha256: str
    def __init__(
        self,
        peer_id: str | None = ...,
        round_id: str | None = ...,
        adapter_version: str | None = ...,
        epoch: int | None = ...,
        eval_loss: float | None = ...,
        eval_tokens: int | None = ...,
        credential: str | None = ...,
        candidate_sha256: str | None = ...,
    ) -> None: ...

class ReportEvalResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: bool | None = ...) -> None: ...
