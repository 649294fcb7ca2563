"""The host tier of the prompt-KV cache: evicted prompts' KV kept in CPU memory, so they come back without
recomputation.

The device tier (:mod:`server.prompt_cache`) keeps each cached prompt's KV in pool blocks under a byte budget and
evicts the least recently used unused entry when it needs room. With a host tier, the runner copies an evicted
entry's positions out of the pool before those blocks are written again, and when the same prompt (same content
hash) is admitted later it copies them back into the new entry's blocks instead of running the prompt pass (an
embedding prompt) or rewriting it (a prefix prompt). On CUDA that is a host-to-device copy of
``p * bytes_per_token`` bytes instead of a forward pass over ``p`` positions; on the CPU it would only duplicate
memory, so the tier is meant for accelerators (its byte budget is 0, off, unless configured).

Entries are LRU under ``budget_bytes``; an entry is removed when taken back (it lives in the device tier again).
Engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class HostPromptKV:
    """Evicted prompts' KV on the host, LRU under a byte budget.

    Args:
        budget_bytes: most bytes kept; 0 keeps nothing.
        pin_memory: allocate page-locked host memory (faster, asynchronous copies to and from CUDA).
    """

    def __init__(self, budget_bytes: int, pin_memory: bool = False) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0; got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.stores = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Keep a copy of one prompt's KV, ``k`` and ``v`` each ``[num_layers, p, num_kv_heads, head_dim]`` (any
        device), evicting the least recently stored entries to stay within the budget. Returns whether it was
        kept (an entry larger than the whole budget is not)."""
        size = k.nbytes + v.nbytes
        if size > self.budget_bytes:
            return False
        self._drop(key)
        while self.nbytes + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        pin = self.pin_memory and k.device.type == "cuda"
        copies = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
                       for t in (k, v))
        self._entries[key] = copies  # type: ignore[assignment]
        self.nbytes += size
        self.stores += 1
        return True

    def take(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Remove and return ``(k, v)`` of ``key`` (host tensors ``[num_layers, p, num_kv_heads, head_dim]``), or
        None when it is not kept."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[0].nbytes + entry[1].nbytes
        self.hits += 1
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[0].nbytes + entry[1].nbytes
