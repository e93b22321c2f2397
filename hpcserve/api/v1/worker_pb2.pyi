from hpcserve.api.v1 import serving_pb2 as _serving_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "step_outputs", "load_report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    step_outputs: StepOutputs
    load_report: LoadReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., step_outputs: _Optional[_Union[StepOutputs, _Mapping]] = ..., load_report: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("welcome", "add_request", "abort_requests", "shutdown", "start_kv_send")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ADD_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ABORT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    START_KV_SEND_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    add_request: AddRequest
    abort_requests: AbortRequests
    shutdown: Shutdown
    start_kv_send: StartKvSend
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., add_request: _Optional[_Union[AddRequest, _Mapping]] = ..., abort_requests: _Optional[_Union[AbortRequests, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., start_kv_send: _Optional[_Union[StartKvSend, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("rank", "replica_id", "role", "world_size", "secret", "hostname", "pid", "max_model_len", "num_kv_blocks", "block_size", "num_ranks")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    replica_id: int
    role: _serving_pb2.ReplicaRole
    world_size: int
    secret: str
    hostname: str
    pid: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    num_ranks: int
    def __init__(self, rank: _Optional[int] = ..., replica_id: _Optional[int] = ..., role: _Optional[_Union[_serving_pb2.ReplicaRole, str]] = ..., world_size: _Optional[int] = ..., secret: _Optional[str] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., max_model_len: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., num_ranks: _Optional[int] = ...) -> None: ...

class RequestStepOutput(_message.Message):
    __slots__ = ("request_id", "new_token_ids", "new_logprobs", "is_finished", "finish_reason", "num_cached_tokens", "new_text", "error_code", "error_message", "kv_event")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KV_EVENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    new_logprobs: _containers.RepeatedCompositeFieldContainer[_serving_pb2.TokenLogprob]
    is_finished: bool
    finish_reason: _serving_pb2.FinishReason
    num_cached_tokens: int
    new_text: str
    error_code: str
    error_message: str
    kv_event: KvEvent
    def __init__(self, request_id: _Optional[str] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., new_logprobs: _Optional[_Iterable[_Union[_serving_pb2.TokenLogprob, _Mapping]]] = ..., is_finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_serving_pb2.FinishReason, str]] = ..., num_cached_tokens: _Optional[int] = ..., new_text: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., kv_event: _Optional[_Union[KvEvent, _Mapping]] = ...) -> None: ...

class StepOutputs(_message.Message):
    __slots__ = ("outputs", "step_time_s", "shares", "token_time")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TIME_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[RequestStepOutput]
    step_time_s: float
    shares: _containers.RepeatedCompositeFieldContainer[StepShare]
    token_time: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[RequestStepOutput, _Mapping]]] = ..., step_time_s: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[StepShare, _Mapping]]] = ..., token_time: _Optional[float] = ...) -> None: ...

class StepShare(_message.Message):
    __slots__ = ("request_id", "num_tokens", "useful_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USEFUL_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    useful_s: float
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., useful_s: _Optional[float] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("num_running", "num_waiting", "num_free_kv_blocks", "num_kv_blocks", "recent_step_time_s", "num_preemptions", "num_steps", "num_output_tokens_interactive", "num_output_tokens_batch", "busy_time_s", "kv")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RECENT_STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_INTERACTIVE_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_BATCH_FIELD_NUMBER: _ClassVar[int]
    BUSY_TIME_S_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    num_free_kv_blocks: int
    num_kv_blocks: int
    recent_step_time_s: float
    num_preemptions: int
    num_steps: int
    num_output_tokens_interactive: int
    num_output_tokens_batch: int
    busy_time_s: float
    kv: _serving_pb2.KvHandoffInfo
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_free_kv_blocks: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., recent_step_time_s: _Optional[float] = ..., num_preemptions: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_output_tokens_interactive: _Optional[int] = ..., num_output_tokens_batch: _Optional[int] = ..., busy_time_s: _Optional[float] = ..., kv: _Optional[_Union[_serving_pb2.KvHandoffInfo, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("replica_id", "config_json")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    replica_id: int
    config_json: str
    def __init__(self, replica_id: _Optional[int] = ..., config_json: _Optional[str] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "request_class", "eos_token_ids", "prefill_only", "remote_prefill", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILL_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _serving_pb2.SamplingParams
    request_class: _serving_pb2.RequestClass
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_only: bool
    remote_prefill: RemotePrefill
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_serving_pb2.SamplingParams, _Mapping]] = ..., request_class: _Optional[_Union[_serving_pb2.RequestClass, str]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., prefill_only: _Optional[bool] = ..., remote_prefill: _Optional[_Union[RemotePrefill, _Mapping]] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class RemotePrefill(_message.Message):
    __slots__ = ("src_rank", "src_block_ids", "num_tokens", "num_cached_tokens")
    SRC_RANK_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    src_rank: int
    src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    num_cached_tokens: int
    def __init__(self, src_rank: _Optional[int] = ..., src_block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class StartKvSend(_message.Message):
    __slots__ = ("request_id", "meta_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    meta_json: str
    def __init__(self, request_id: _Optional[str] = ..., meta_json: _Optional[str] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("ready", "recv_meta_json", "result")
    READY_FIELD_NUMBER: _ClassVar[int]
    RECV_META_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ready: KvReady
    recv_meta_json: str
    result: KvTransferResult
    def __init__(self, ready: _Optional[_Union[KvReady, _Mapping]] = ..., recv_meta_json: _Optional[str] = ..., result: _Optional[_Union[KvTransferResult, _Mapping]] = ...) -> None: ...

class KvReady(_message.Message):
    __slots__ = ("block_ids", "num_tokens", "num_cached_tokens")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    num_cached_tokens: int
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class KvTransferResult(_message.Message):
    __slots__ = ("is_send", "success", "nbytes", "seconds", "error", "checksum_verified", "peer_rank")
    IS_SEND_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    PEER_RANK_FIELD_NUMBER: _ClassVar[int]
    is_send: bool
    success: bool
    nbytes: int
    seconds: float
    error: str
    checksum_verified: bool
    peer_rank: int
    def __init__(self, is_send: _Optional[bool] = ..., success: _Optional[bool] = ..., nbytes: _Optional[int] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ..., checksum_verified: _Optional[bool] = ..., peer_rank: _Optional[int] = ...) -> None: ...

class AbortRequests(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...
