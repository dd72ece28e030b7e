"""RPC settings: every limit the service enforces, with the reason for its default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RpcConfig(BaseModel):
    """Limits and knobs of one `RpcService`. Both peers should agree on `max_message_size`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_size: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest single message (bytes) sent or accepted; bigger data is a stream "
        "of messages. Receiving allocates at most this much per message.",
    )
    max_concurrent_calls: int = Field(
        1024, gt=0, description="Inbound calls (streams) served at once, over all peers."
    )
    max_concurrent_calls_per_peer: int = Field(
        128, gt=0, description="Inbound calls served at once for one peer; more are refused."
    )
    max_outbound_calls: int = Field(
        1024, gt=0, description="Calls this node may have in flight at once; more are refused."
    )
    sync_handler_threads: int = Field(
        8, gt=0, description="Thread pool for plain (blocking) `def` handlers."
    )
    stream_buffer_messages: int = Field(
        2,
        gt=0,
        description="Request messages buffered between the network and a streaming handler; "
        "with the stream window this bounds memory per call.",
    )
    default_timeout: float | None = Field(
        None, gt=0, description="Deadline (seconds) for calls that pass no `timeout`."
    )
    deadline_grace: float = Field(
        0.25,
        ge=0,
        description="How long past its deadline the caller waits for the server's own "
        "DEADLINE_EXCEEDED status before resetting the stream itself.",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds an inbound stream may take to send its call header."
    )
    idempotent_retries: int = Field(
        2,
        ge=0,
        description="How often `call(..., idempotent=True)` is sent again when the path under "
        "it dies mid-call (the host's next path takes it).",
    )
    request_idle_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a caller may send nothing while the server still waits for its "
        "call's arguments; then the call ends (DEADLINE_EXCEEDED) and frees its slot. Without "
        "it, a peer could hold calls open forever by sending headers alone.",
    )
    status_timeout: float = Field(
        10.0,
        gt=0,
        description="How long the server tries to deliver a call's final status to a caller "
        "that does not read, before resetting the stream.",
    )
    read_size: int = Field(
        1024 * 1024, gt=0, description="Largest single read from a stream (bytes)."
    )
    bulk_from: int = Field(
        1024 * 1024,
        ge=0,
        description="Calls whose first message is at least this large, and calls that stream "
        "requests, ask the host for its fastest path to the peer (`open_stream(bulk=True)`).",
    )
    coalesce_below: int = Field(
        64 * 1024,
        ge=0,
        description="Messages smaller than this are written as one joined buffer (fewer "
        "writes); larger ones are written buffer by buffer, never copied.",
    )
