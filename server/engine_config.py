"""Engine limits, in one place: :class:`EngineConfig`'s defaults are the defaults of the matching server
settings (:class:`server.config.Settings` reads them from here) and of every engine built without a config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits.

    Attributes:
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: most token positions computed in one step (chunked prefill splits longer work).
        kv_cache_bytes: KV pool for the running requests' own positions, bytes.
        prompt_kv_cache_bytes: budget for soft prompts' shared virtual-token KV kept while no request uses it,
            bytes; the pool is sized to hold this on top of ``kv_cache_bytes``. The default (1 GiB) holds 1,226
            SmolLM2-135M fp32 prompts of 20 virtual tokens: each keeps 19 positions x 46,080 bytes = 855 KiB. For
            another model, one prompt costs ``(n - 1) * 2 * layers * kv_heads * head_dim * dtype_bytes`` (``n``
            instead of ``n - 1`` for prefix tuning).
        prompt_kv_host_bytes: the host tier of the prompt-KV cache (:mod:`server.prompt_kv_tier`): evicted prompts'
            KV kept in CPU memory up to this many bytes and copied back instead of recomputed. 0 (the default)
            turns it off; it pays on an accelerator, where it replaces a forward pass by a host-to-device copy.
        block_size: token positions per KV block.
        max_virtual_tokens: largest soft prompt accepted, tokens.
        max_waiting: most queued requests before new ones are refused (HTTP 429).
        max_waiting_tokens: most prompt positions (virtual + text tokens) queued before new requests are refused
            (HTTP 429); a bound on the queue's prefill work, so a few huge requests cannot fill it.
        attention_backend: ``auto`` (``cpu`` on the CPU, ``flex`` on CUDA), ``cpu`` (:mod:`server.attention.cpu`:
            paged decode kernel + grouped SDPA; its pure-torch path on CUDA), ``flex``
            (:mod:`server.attention.flex`: FlexAttention over the paged pool, Triton-compiled on CUDA, eager and
            slow on the CPU) or ``reference`` (per-row gather + SDPA, tests).
        attention_kernel: with the ``cpu`` backend on the CPU, run decode attention in the compiled paged kernel;
            False uses the pure-torch path.
        packed_weights: on the CPU in fp32, run the projections on MKL packed weights (:mod:`server.llama`; two
            extra copies of the linear weights in memory, 1.25-2x faster decode matmuls).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int = 1024**3
    prompt_kv_cache_bytes: int = 1024**3
    prompt_kv_host_bytes: int = 0
    block_size: int = 16
    max_virtual_tokens: int = 128
    max_waiting: int = 1024
    max_waiting_tokens: int = 256 * 1024
    attention_backend: str = "auto"
    attention_kernel: bool = True
    packed_weights: bool = True
