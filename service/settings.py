"""Server settings: environment variables prefixed `GRADSERVE_`, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gradserve" / "jax"


class Settings(BaseSettings):
    """Everything an operator can set. Each field `foo` reads `GRADSERVE_FOO`."""

    model_config = SettingsConfigDict(env_prefix="GRADSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Extra model files or modules, comma-separated in the environment.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    builtin_models: bool = True
    x64: bool = False
    log_level: str = "info"
    # The HTTP server (service/shutdown.py, service/granian_server.py); Ray Serve has its own.
    server: Literal["uvicorn", "granian"] = "uvicorn"

    # Limits: each refused with its PROTOCOL.md status before any compute.
    max_body_bytes: int = 512 * 2**20
    # uvicorn: bodies declaring at least this many bytes are received whole into one buffer
    # (service/whole_body.py): no pieces, no pauses, no copies.
    large_body_bytes: int = Field(2**20, ge=1)
    max_npz_members: int = 4096
    max_transform_depth: int = 8
    max_output_elements: int = 2**27
    request_timeout_s: float = 60.0
    # Engine (service/engine/): devices, queues, batching, compile caches.
    cpu_devices: int | None = Field(None, ge=1, description="CPU devices to expose to JAX")
    workers_per_device: int = Field(2, ge=1)
    max_overdue_workers: int = Field(
        8, ge=0, description="threads per device started to replace workers stuck past deadlines"
    )
    max_queue: int = Field(256, ge=1, description="queued requests per device before 429")
    max_batch_size: int = Field(32, ge=1, description="1 turns dynamic batching off")
    max_batch_delay_ms: float = Field(2.0, ge=0)
    batch_patience_ms: float = Field(
        100.0,
        ge=0,
        description="longest a worker waits for companions that recent concurrency says are "
        "coming (at most one run of the batch it holds; 0: only for requests being decoded)",
    )
    batches_in_flight: int | None = Field(
        None,
        ge=1,
        description="batches of one model running at once per device (None: 1 on CPU, 2 on GPU)",
    )
    compile_cache_size: int = Field(512, ge=1, description="compiled executables kept (LRU)")
    max_shapes_per_model: int = Field(32, ge=1, description="distinct input shapes kept per model")
    compile_cache_dir: Path | None = Field(default_factory=_default_cache_dir)
    # None: allocate GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false); a fraction
    # preallocates that share of each GPU instead (XLA_PYTHON_CLIENT_MEM_FRACTION).
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    warmup: bool = True

    # Derivative sessions (service/sessions.py): bytes of residuals per device (None: a share
    # of the device's memory, see service/engine), the TTL (default and cap), and live
    # sessions per API key before that key's least recently used one is evicted.
    session_memory: int | None = Field(None, ge=0)
    session_ttl_s: float = Field(300.0, gt=0)
    session_max_per_key: int = Field(256, ge=1)

    # Counted from the body's bytes before parsing (service/limits.py): 413.
    max_json_depth: int = Field(64, ge=2, le=1000)
    max_json_elements: int = 2**22
    # JSON bodies over this many bytes: 413 naming npz (a JSON float costs ~10 bytes and ~15
    # ns to parse, an npz float 4 bytes and nothing). Above `json_offload_bytes` JSON is parsed
    # and printed in a helper process (service/json_offload.py) so the event loop never stalls.
    max_json_bytes: int = Field(64 * 2**20, ge=1)
    json_offload_bytes: int = Field(2**20, ge=0, description="0 keeps all JSON in-process")
    max_batch_tangents: int = 1024
    # New (uncached) argument shapes a model may take per minute; each costs a compile: 429.
    max_shapes_per_minute: int = 60

    # Authentication (service/auth.py). Keys are `key[:scope+scope]`, comma-separated; the file
    # holds sha256 hashes. With neither, only loopback binds are allowed unless `insecure`.
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    insecure: bool = False
    # Per-key quotas (service/quotas.py), only with keys; 0 is "no limit". Requests per second
    # (token bucket of `quota_burst`), and requests computing at once, per key. Per scope,
    # e.g. {"metrics": "rate=10 burst=20"}; a keys-file line may carry its own.
    quota_rate: float = Field(200.0, ge=0)
    quota_burst: float = Field(400.0, ge=0)
    quota_concurrent: int = Field(64, ge=0)
    scope_quotas: dict[str, str] = Field(default_factory=lambda: {"metrics": "rate=10 burst=20"})

    # SIGTERM: readyz 503 and new work refused for `shutdown_drain_s` (so load balancers
    # notice), then stop accepting and give in-flight work `shutdown_grace_s` to finish.
    # Idle keep-alive connections are closed after this. uvicorn's 5 s default races pooled
    # clients that reuse a connection just as the server drops it (a "lost" request).
    keep_alive_s: int = Field(75, ge=1)
    # The connection itself (service/transport.py, uvicorn): a request head past these bytes
    # or headers gets 431, a longer request line 414; a head slower than `header_timeout_s`,
    # or a body slower than `body_min_rate` bytes/s over `body_window_s`, is closed. Past
    # `max_connections` (None: 3/4 of the file limit) new connections get 503.
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    max_request_line: int = Field(8 * 1024, ge=256)
    header_timeout_s: float = Field(10.0, gt=0)
    body_min_rate: float = Field(1024.0, ge=0)
    body_window_s: float = Field(10.0, gt=0)
    max_connections: int | None = Field(None, ge=1)
    shutdown_drain_s: float = Field(1.0, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _empty_disables_cache(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
