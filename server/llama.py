"""The Llama-family layer walk over packed tokens, with attention behind a backend.

Reuses the Hugging Face module's weights and norms (``model_loader.SUPPORTED_MODEL_TYPES``), so there is one
copy of the model in memory; the tests compare it with the Hugging Face and PEFT forward passes. Two changes make
each step cheaper than calling the Hugging Face layers:
- the Q, K and V projections run as one matmul, and so do the MLP's gate and up projections (as vLLM's
  ``QKVParallelLinear`` / ``MergedColumnParallelLinear``): the fused weight is allocated once and the Hugging Face
  modules' weights become views into it, so memory does not grow;
- tokens of every row are packed into one ``[T, hidden_size]`` activation with no padding, and attention reads the
  paged KV cache through :class:`~server.attention.backend.AttentionBackend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.attention.backend import AttentionBackend, write_kv
from server.attention.metadata import AttentionMetadata


def _fuse(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate the weights ``[out_i, in]`` of ``modules`` into one ``[sum(out_i), in]`` tensor and make each
    module's weight a view into it (so the Hugging Face forward still works, with no extra memory)."""
    fused = torch.cat([m.weight.detach() for m in modules], dim=0).contiguous()
    off = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[off : off + n], requires_grad=False)
        off += n
    return fused


def _fused_bias(modules: list[torch.nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([
        m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                                device=m.weight.device)
        for m in modules
    ])


class LlamaLayers:
    """Packed forward of a Llama-family decoder (embedding, layers, final norm, LM head).

    Args:
        hf_model: a loaded ``*ForCausalLM`` (frozen; its projection weights are re-pointed into fused tensors).
        backend: the attention backend.
    """

    def __init__(self, hf_model: torch.nn.Module, backend: AttentionBackend) -> None:
        cfg = hf_model.config
        self.base = hf_model.model
        self.lm_head = hf_model.lm_head
        self.backend = backend
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.layers = list(self.base.layers)
        fused = getattr(hf_model, "_softprompt_fused", None)  # fused once per model, shared by every runner
        if fused is None:
            fused = ([], [])
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                qkv = [a.q_proj, a.k_proj, a.v_proj]
                fused[0].append((_fuse(qkv), _fused_bias(qkv)))
                fused[1].append((_fuse([m.gate_proj, m.up_proj]), _fused_bias([m.gate_proj, m.up_proj])))
            hf_model._softprompt_fused = fused
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None]] = fused[0]
        self.gate_up: list[tuple[torch.Tensor, torch.Tensor | None]] = fused[1]
        self.intermediate = int(self.layers[0].mlp.gate_proj.weight.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hidden_size]`` input embeddings."""
        return self.base.embed_tokens(token_ids)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Run every layer over packed tokens; writes each token's K/V to ``meta.slot_mapping``.

        Args:
            x: ``[T, hidden_size]`` input embeddings (virtual tokens already in place).
            meta: the step's attention metadata (``meta.positions`` drive the rotary embedding).
            k_cache, v_cache: ``[num_layers, num_blocks, block_size, KVH, D]``.
        Returns:
            ``[T, hidden_size]`` hidden states before the final norm.
        """
        T = x.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self.base.rotary_emb(x[None], meta.positions[None])  # [1, T, D] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        nq, nk = H * D, KVH * D
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            w, b = self.qkv[li]
            qkv = F.linear(h, w, b)  # [T, (H + 2 KVH) D]
            q = _rotate(qkv[:, :nq].view(T, H, D), cos, sin)
            k = _rotate(qkv[:, nq : nq + nk].view(T, KVH, D), cos, sin)
            v = qkv[:, nq + nk :].view(T, KVH, D)
            write_kv(k_cache[li], v_cache[li], k, v, meta.slot_mapping)
            o = self.backend.forward(q, k_cache[li], v_cache[li], meta, attn.scaling)  # [T, H, D]
            x = x + attn.o_proj(o.reshape(T, H * D))
            h = layer.post_attention_layernorm(x)
            w, b = self.gate_up[li]
            gu = F.linear(h, w, b)  # [T, 2 I]
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gu[:, : self.intermediate]) * gu[:, self.intermediate :])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden_size]`` last hidden states -> fp32 ``[R, vocab_size]`` logits (final norm + LM head)."""
        return self.lm_head(self.base.norm(hidden)).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``[T, heads, D]`` with ``cos``/``sin`` ``[T, 1, D]``: the same arithmetic as
    Hugging Face's ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
