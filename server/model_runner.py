"""The model runner: one forward pass per engine step over every scheduled row, whatever its task.

How per-row virtual tokens enter the batch (README, "Design"): rows are *packed*, not padded. All rows' new
tokens are concatenated into one ``[num_tokens, hidden_size]`` activation, so every matmul (QKV, MLP, LM head)
is batched across rows and tasks; attention reads each row's own KV from the paged pool. A row's virtual tokens
are positions ``0..n-1`` of its sequence and its text starts at ``n``; there is never padding between them, so a
row's result does not depend on its neighbours (design notes, section 2).

Virtual tokens enter as embeddings: the row's ``SoftPrompt.embeddings`` replace the embedding lookup at those
positions. The first ``n-1`` are not recomputed per request: their KV is computed once per prompt content
(:class:`~server.kv_cache.PrefixCache`) and copied into the request's slots at admission. The last virtual token
is computed with the text, so a request whose text is empty still has one input position for its first logits.

Attention: decode rows (one new token each) share one batched SDPA call per layer over their gathered KV,
padded to the longest row and masked; prefill rows (several tokens) each get their own causal SDPA call.

The forward pass reuses the Hugging Face module's own weights and submodules (norms, projections, MLP, rotary
embedding, ``apply_rotary_pos_emb``) of Llama-family models (``model_loader.SUPPORTED_MODEL_TYPES``); the tests
compare it with the Hugging Face and PEFT forward passes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.kv_cache import KVPool, PrefixCache, PrefixKV, kv_bytes_per_token
from server.model_loader import LoadedModel

#: How many longest-allowed soft prompts the scratch slots hold, i.e. how many new prompts' virtual-token KV one
#: forward pass can compute.
PREFIX_BATCH = 8


@dataclass
class RowInput:
    """One row's work for a step.

    Attributes:
        slots: ``[capacity]`` KV slot id of each position of the row's sequence.
        start: first position computed now; positions ``[0, start)`` are already in the KV pool.
        token_ids: ids for positions ``[start, start + len(token_ids))`` (entries at virtual positions ignored).
        virtual: ``[k, hidden_size]`` embeddings for the first ``k`` positions of this step (virtual tokens), or
            None when the step holds only text.
        need_logits: whether to return next-token logits after the last position.
    """

    slots: torch.Tensor
    start: int
    token_ids: list[int]
    virtual: torch.Tensor | None = None
    need_logits: bool = True


class ModelRunner:
    """Runs packed forward passes of a frozen Llama-family model over a paged KV pool. Engine thread only.

    Args:
        loaded: the frozen model.
        num_blocks, block_size: KV pool size (see :class:`~server.kv_cache.KVPool`).
        max_virtual_tokens: sizes the scratch space for computing prompt prefixes (``PREFIX_BATCH`` prompts of
            this many tokens at once).
        prefix_cache_bytes: budget of the virtual-token KV cache, bytes.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_virtual_tokens: int = 128,
        prefix_cache_bytes: int = 256 * 1024**2,
    ) -> None:
        lm = loaded.model
        cfg = lm.config
        self.loaded = loaded
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.base = lm.model
        self.lm_head = lm.lm_head
        self.layers = list(self.base.layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.vocab_size = int(cfg.vocab_size)
        self._apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.pool = KVPool(
            num_blocks, block_size, PREFIX_BATCH * max_virtual_tokens, len(self.layers), self.num_kv_heads,
            self.head_dim, self.dtype, self.device,
        )
        self.prefix_cache = PrefixCache(prefix_cache_bytes)

    @staticmethod
    def bytes_per_token(loaded: LoadedModel) -> int:
        """KV bytes one token position takes across all layers of ``loaded``'s model."""
        cfg = loaded.model.config
        kvh = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return kv_bytes_per_token(int(cfg.num_hidden_layers), kvh, hd, loaded.dtype)

    # ------------------------------------------------------------------ soft prompts
    def prefix_for(self, key: str, embeddings: torch.Tensor) -> PrefixKV | None:
        """KV of all but the last virtual token of a soft prompt, computed alone and cached by ``key``.

        Args:
            key: content hash of the prompt (``SoftPrompt.sha256``).
            embeddings: ``[num_virtual_tokens, hidden_size]``.
        Returns:
            None for a 1-token prompt, else KV for positions ``0..n-2``.
        """
        return self.prefixes_for([(key, embeddings)])[0]

    def prefixes_for(self, prompts: list[tuple[str, torch.Tensor]]) -> list[PrefixKV | None]:
        """:meth:`prefix_for` for many prompts at once: the cache misses (each distinct key once) are computed as
        rows of as few packed forward passes as the scratch slots allow, each row alone at positions ``0..p-1``.

        Args:
            prompts: ``(key, embeddings [num_virtual_tokens, hidden_size])`` pairs.
        Returns:
            one entry per pair, in order.
        """
        found: dict[str, PrefixKV | None] = {}
        todo: list[tuple[str, torch.Tensor]] = []
        for key, emb in prompts:
            if key in found or emb.shape[0] <= 1:
                continue
            found[key] = self.prefix_cache.get(key)
            if found[key] is None:
                todo.append((key, emb))
        scratch = self.pool.scratch
        group: list[tuple[str, torch.Tensor, int]] = []  # (key, embeddings, first scratch index)
        used = 0
        for key, emb in todo:
            p = emb.shape[0] - 1
            if group and used + p > scratch.shape[0]:
                self._compute_prefixes(group, found)
                group, used = [], 0
            group.append((key, emb, used))
            used += p
        if group:
            self._compute_prefixes(group, found)
        return [found.get(key) if emb.shape[0] > 1 else None for key, emb in prompts]

    def _compute_prefixes(self, group: list[tuple[str, torch.Tensor, int]], out: dict) -> None:
        scratch = self.pool.scratch
        rows = [
            RowInput(scratch[off : off + emb.shape[0] - 1], 0, [0] * (emb.shape[0] - 1), virtual=emb[:-1],
                     need_logits=False)
            for _, emb, off in group
        ]
        self.forward(rows)
        for (key, _, _), row in zip(group, rows, strict=True):
            item = PrefixKV(self.pool.k[:, row.slots], self.pool.v[:, row.slots])  # advanced indexing copies
            self.prefix_cache.put(key, item)
            out[key] = item

    def load_prefix(self, slots: torch.Tensor, prefix: PrefixKV) -> None:
        """Copy a prompt's virtual-token KV into a request's first ``prefix.num_tokens`` slots."""
        idx = slots[: prefix.num_tokens]
        self.pool.k[:, idx] = prefix.k
        self.pool.v[:, idx] = prefix.v

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        """One packed forward pass; writes each row's new K/V into its slots.

        Returns:
            fp32 logits ``[num_rows_with_need_logits, vocab_size]``, in the order of those rows.
        Raises:
            ValueError: a row has no tokens or runs past its slots.
        """
        dev = self.device
        offsets: list[int] = []  # [num_rows] first packed index of each row
        ids: list[int] = []  # [num_tokens]
        positions: list[int] = []  # [num_tokens]
        for r in rows:
            c = len(r.token_ids)
            if c == 0 or r.start + c > r.slots.shape[0]:
                raise ValueError(f"row of {c} tokens from position {r.start} exceeds {r.slots.shape[0]} slots")
            offsets.append(len(ids))
            ids.extend(r.token_ids)
            positions.extend(range(r.start, r.start + c))
        T = len(ids)
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)  # [T]
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        new_slots = torch.cat([r.slots[r.start : r.start + len(r.token_ids)] for r in rows])  # [T]
        x = self.base.embed_tokens(ids_t)  # [T, hidden]
        for r, off in zip(rows, offsets, strict=True):
            if r.virtual is not None:
                x[off : off + r.virtual.shape[0]] = r.virtual.to(device=dev, dtype=x.dtype)
        cos, sin = self.base.rotary_emb(x[None], pos_t[None])  # [1, T, head_dim] each

        # Decode rows share one attention call: gather index [B, Lmax] and key mask [B, 1, 1, Lmax].
        dec = [i for i, r in enumerate(rows) if len(r.token_ids) == 1]
        dec_q = torch.tensor([offsets[i] for i in dec], dtype=torch.long, device=dev)  # [B]
        dec_gather, dec_mask = self._decode_index(rows, dec)
        pre = [
            (offsets[i], len(r.token_ids), r.slots[: r.start + len(r.token_ids)], self._causal_mask(r.start, r))
            for i, r in enumerate(rows)
            if len(r.token_ids) > 1
        ]

        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(T, H, D).transpose(0, 1)[None]  # [1, H, T, D]
            k = attn.k_proj(h).view(T, KVH, D).transpose(0, 1)[None]  # [1, KVH, T, D]
            v = attn.v_proj(h).view(T, KVH, D)  # [T, KVH, D]
            q, k = self._apply_rotary(q, k, cos, sin)
            pk, pv = self.pool.k[li], self.pool.v[li]  # [num_slots, KVH, D]
            pk.index_copy_(0, new_slots, k[0].transpose(0, 1))
            pv.index_copy_(0, new_slots, v)
            q = q[0].transpose(0, 1)  # [T, H, D]
            out = torch.empty(T, H, D, dtype=x.dtype, device=dev)  # [T, H, D]
            if dec:
                kk = pk[dec_gather].transpose(1, 2)  # [B, KVH, Lmax, D]
                vv = pv[dec_gather].transpose(1, 2)
                o = F.scaled_dot_product_attention(
                    q[dec_q][:, :, None], kk, vv, attn_mask=dec_mask, scale=attn.scaling, enable_gqa=True
                )  # [B, H, 1, D]
                out[dec_q] = o[:, :, 0]
            for off, c, sl, mask in pre:
                o = F.scaled_dot_product_attention(
                    q[off : off + c].transpose(0, 1)[None],
                    pk[sl].transpose(0, 1)[None],
                    pv[sl].transpose(0, 1)[None],
                    attn_mask=mask,
                    scale=attn.scaling,
                    enable_gqa=True,
                )  # [1, H, c, D]
                out[off : off + c] = o[0].transpose(0, 1)
            x = x + attn.o_proj(out.view(T, H * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))

        last = [off + len(r.token_ids) - 1 for r, off in zip(rows, offsets, strict=True) if r.need_logits]
        if not last:
            return torch.empty(0, self.vocab_size)
        hidden = self.base.norm(x[torch.tensor(last, device=dev)])  # [num_rows_with_logits, hidden]
        return self.lm_head(hidden).float()

    def _decode_index(self, rows: list[RowInput], dec: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather index ``[B, Lmax]`` of decode rows' slots (padding reads the zeroed pad slot) and a bool key mask
        ``[B, 1, 1, Lmax]`` (None when every row has the same length)."""
        if not dec:
            return torch.empty(0, 0, dtype=torch.long), None
        lengths = [rows[i].start + 1 for i in dec]
        lmax = max(lengths)
        gather = torch.full((len(dec), lmax), self.pool.pad_slot, dtype=torch.long, device=self.device)
        for b, i in enumerate(dec):
            gather[b, : lengths[b]] = rows[i].slots[: lengths[b]]
        if min(lengths) == lmax:
            return gather, None
        ln = torch.tensor(lengths, device=self.device)
        mask = torch.arange(lmax, device=self.device)[None] < ln[:, None]  # [B, Lmax]
        return gather, mask[:, None, None]

    def _causal_mask(self, start: int, r: RowInput) -> torch.Tensor:
        """``[c, start + c]`` bool mask: query ``i`` (position ``start+i``) sees keys ``0..start+i``."""
        c = len(r.token_ids)
        return torch.ones(c, start + c, dtype=torch.bool, device=self.device).tril(diagonal=start)
