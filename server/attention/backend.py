"""The attention-backend interface: one call per layer, reading the paged KV cache in place.

The KV cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]`` (K and V).
Keys are stored after the rotary embedding. A backend first writes the step's new K/V at
``meta.slot_mapping`` (:func:`write_kv`), then computes causal attention of each query token over its row's
positions ``0..position`` (grouped-query attention: query head ``h`` reads KV head ``h // (H / KVH)``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ``[T, KVH, D]`` at slots ``[T]`` of caches ``[num_blocks, block_size, KVH, D]``."""
    nb, bs = k_cache.shape[:2]
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


class AttentionBackend(Protocol):
    """How a layer's attention is computed. Implementations: :mod:`server.attention.cpu` (SDPA prefill + paged
    decode kernel), :mod:`server.attention.flex` (FlexAttention, compiled on CUDA), :mod:`server.attention.reference`
    (gather-based, for tests).

    A backend may also define ``prepare(meta, k_pool, v_pool)``: the layer walk then calls it once per step, before
    the first layer, with the whole pool (``[layers, num_blocks, block_size, KVH, D]``).
    """

    name: str

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """Attention output for every query token.

        Args:
            q: ``[T, H, D]`` queries after rotary embedding.
            k_cache, v_cache: ``[num_blocks, block_size, KVH, D]`` this layer's cache, already holding the step's
                new K/V (see :func:`write_kv`).
            meta: the step's metadata.
            scale: softmax scale (usually ``D ** -0.5``).
        Returns:
            ``[T, H, D]``.
        """
        ...
