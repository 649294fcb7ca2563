"""The paged KV cache tensors: one preallocated, block-aligned pool per engine.

``k`` and ``v`` are ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``: block ``b`` of layer ``l`` is
``k[l, b]``, a ``[block_size, KVH, D]`` tile, and a request's positions live in the blocks its block table lists
(:class:`~server.block_pool.BlockPool` hands the ids out). Keys are stored after the rotary embedding.
"""

from __future__ import annotations

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers: ``2 * layers * kv_heads * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def model_kv_shape(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a Hugging Face Llama-family config."""
    kvh = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return int(config.num_hidden_layers), kvh, hd


class KVPool:
    """The K/V tensors, zero-initialised.

    Args:
        num_blocks, block_size: pool geometry (blocks, token positions per block).
        num_layers, num_kv_heads, head_dim: model geometry.
        dtype, device: storage.
    """

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def slots_of(self, block_table: list[int], num_positions: int) -> torch.Tensor:
        """Flat slot ids ``[num_positions]`` (``block * block_size + offset``) of positions ``0..num_positions-1``
        of a sequence with ``block_table`` (tests and debugging)."""
        b = torch.tensor(block_table, dtype=torch.long)
        offs = torch.arange(self.block_size)
        return (b[:, None] * self.block_size + offs[None]).reshape(-1)[:num_positions]
