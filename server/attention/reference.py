"""Reference attention backend: gathers each row's K/V from the paged cache and runs causal SDPA per row.

Slow and simple; the tests compare every other backend with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.attention.metadata import AttentionMetadata


class ReferenceBackend:
    """Per-row gather + ``torch.nn.functional.scaled_dot_product_attention`` with an explicit causal mask."""

    name = "reference"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        qsl = [0]
        for n in meta.query_lens:
            qsl.append(qsl[-1] + n)
        for r, (qlen, slen, table) in enumerate(zip(meta.query_lens, meta.seq_lens_list, meta.block_tables_list,
                                                    strict=True)):
            blocks = torch.tensor(table, dtype=torch.long, device=q.device)
            k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:slen]  # [S, KVH, D]
            v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:slen]
            start = slen - qlen
            mask = torch.ones(qlen, slen, dtype=torch.bool, device=q.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(
                q[qsl[r] : qsl[r + 1]].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # [1, H, qlen, D]
            out[qsl[r] : qsl[r + 1]] = o[0].transpose(0, 1)
        return out
