"""The Llama-family layer walk over packed tokens, with attention behind a backend.

Reuses the Hugging Face module's weights and norms (``model_loader.SUPPORTED_MODEL_TYPES``), so there is one
copy of the model in memory; the tests compare it with the Hugging Face and PEFT forward passes. Two changes make
each step cheaper than calling the Hugging Face layers:
- the Q, K and V projections run as one matmul, and so do the MLP's gate and up projections (as vLLM's
  ``QKVParallelLinear`` / ``MergedColumnParallelLinear``): the fused weight is allocated once and the Hugging Face
  modules' weights become views into it, so memory does not grow;
- on the CPU in fp32, every projection (and the LM head) runs on MKL's packed-weight GEMM
  (``torch.ops.mkl._mkl_linear``, what torch's inductor uses for frozen fp32 linears): the weights are reordered
  once for small batches (decode steps) and once for large ones (prefill); the results equal ``F.linear``'s
  bit for bit from two rows on (checked in the tests), and were measured here 1.25-2x faster at 16-64 rows and
  about 1.05x at 1,344 rows (``python -m bench.linear_bench``). It costs two extra copies of the linear weights
  in memory (``packed_weights``);
- tokens of every row are packed into one ``[T, hidden_size]`` activation with no padding, and attention reads the
  paged KV cache through :class:`~server.attention.backend.AttentionBackend`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from server.attention.backend import AttentionBackend, write_kv
from server.attention.metadata import AttentionMetadata
from server.kv_pool import model_kv_shape

#: Per model (weakly held, so a model's copies and its garbage collection are unaffected): fused weights, and the
#: :class:`Linear` objects per ``packed_weights`` setting.
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Row counts the packed weights are reordered for; a call with at most ``SMALL_BATCH_MAX`` rows uses the first.
PACK_ROWS = (64, 1024)
SMALL_BATCH_MAX = 256


class Linear:
    """``y = x @ weight.T + bias`` for 2-D ``x`` ``[M, in]`` -> ``[M, out]``, on MKL packed weights when possible.

    Args:
        weight: ``[out, in]``; kept (the packed copies are made from it).
        bias: ``[out]`` or None.
        pack: reorder the weight for MKL's packed GEMM when on the CPU, fp32 and MKL is available.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight, self.bias = weight, bias
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None
        if pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available():
            reorder = torch.ops.mkl._mkl_reorder_linear_weight
            self.packed = (reorder(weight, PACK_ROWS[0]), reorder(weight, PACK_ROWS[1]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        m = x.shape[0]
        w = self.packed[0] if m <= SMALL_BATCH_MAX else self.packed[1]
        return torch.ops.mkl._mkl_linear(x, w, self.weight, self.bias, m)

    @property
    def nbytes_packed(self) -> int:
        return 0 if self.packed is None else sum(p.nbytes for p in self.packed)


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
        packed_weights: use MKL packed weights (see the module docstring) where they apply.
    """

    def __init__(self, hf_model: torch.nn.Module, backend: AttentionBackend, packed_weights: bool = True) -> None:
        cfg = hf_model.config
        self.base = hf_model.model
        self.lm_head = hf_model.lm_head
        self.backend = backend
        self.num_heads = int(cfg.num_attention_heads)
        _, self.num_kv_heads, self.head_dim = model_kv_shape(cfg)
        self.layers = list(self.base.layers)
        fused = _FUSED.get(hf_model)  # fused once per model, shared by every runner
        if fused is None:
            fused = ([], [])
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                qkv = [a.q_proj, a.k_proj, a.v_proj]
                fused[0].append((_fuse(qkv), _fused_bias(qkv)))
                fused[1].append((_fuse([m.gate_proj, m.up_proj]), _fused_bias([m.gate_proj, m.up_proj])))
            _FUSED[hf_model] = fused
        cache = _LINEARS.setdefault(hf_model, {})  # packed once per model and setting
        if packed_weights not in cache:
            cache[packed_weights] = (
                [Linear(w, b, packed_weights) for w, b in fused[0]],
                [Linear(w, b, packed_weights) for w, b in fused[1]],
                [_module_linear(layer.self_attn.o_proj, packed_weights) for layer in self.layers],
                [_module_linear(layer.mlp.down_proj, packed_weights) for layer in self.layers],
                _module_linear(self.lm_head, packed_weights),
            )
        self.qkv, self.gate_up, self.o_proj, self.down, self.head = cache[packed_weights]
        self.intermediate = int(self.layers[0].mlp.gate_proj.weight.shape[0])

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight copies (0 when not packed)."""
        lins = self.qkv + self.gate_up + self.o_proj + self.down + [self.head]
        return sum(lin.nbytes_packed for lin in lins)

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
            x: ``[T, hidden_size]`` input embeddings (virtual tokens already in place); used as the residual
                stream, so it is updated in place.
            meta: the step's attention metadata (``meta.positions`` drive the rotary embedding).
            k_cache, v_cache: ``[num_layers, num_blocks, block_size, KVH, D]``.
        Returns:
            ``[T, hidden_size]`` hidden states before the final norm.
        """
        T = x.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self.base.rotary_emb(x[None], meta.positions[None])  # [1, T, D] each
        half = D // 2
        cos = cos[0, :, None]  # [T, 1, D]
        sin = torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)  # rotate_half's sign folded in
        nqk = (H + KVH) * D
        prepare = getattr(self.backend, "prepare", None)  # optional per-step hook of the backend
        if prepare is not None:
            prepare(meta, k_cache, v_cache)
        I = self.intermediate  # noqa: E741 - the MLP's intermediate size, as in the papers
        for li, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_layernorm)
            qkv = self.qkv[li](h)  # [T, (H + 2 KVH) D]
            qk = _rotate(qkv[:, :nqk].view(T, H + KVH, D), cos, sin)  # queries and keys in one pass
            v = qkv[:, nqk:].view(T, KVH, D)
            write_kv(k_cache[li], v_cache[li], qk[:, H:], v, meta.slot_mapping)
            o = self.backend.forward(qk[:, :H], k_cache[li], v_cache[li], meta, layer.self_attn.scaling)
            x += self.o_proj[li](o.reshape(T, H * D))
            gu = self.gate_up[li](_rms_norm(x, layer.post_attention_layernorm))  # [T, 2 I]
            x += self.down[li](layer.mlp.act_fn(gu[:, :I]) * gu[:, I:])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden_size]`` last hidden states -> fp32 ``[R, vocab_size]`` logits (final norm + LM head)."""
        return self.head(_rms_norm(hidden, self.base.norm)).float()


def _module_linear(module: torch.nn.Linear, pack: bool) -> Linear:
    return Linear(module.weight.detach(), None if module.bias is None else module.bias.detach(), pack)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``[T, heads, D]`` with ``cos`` ``[T, 1, D]`` and ``sin`` ``[T, 1, D]`` whose first
    half is negated: the same values as Hugging Face's ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``,
    ``rotate_half(x) = cat(-x2, x1)``), since moving the sign from ``x2`` to ``sin`` is exact."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """A Hugging Face ``*RMSNorm`` module's computation (``weight * (x * rsqrt(mean(x^2) + eps))``, in fp32 for fp32
    models) without its dtype round trips; other dtypes use the module itself."""
    if x.dtype != torch.float32 or getattr(norm, "variance_epsilon", None) is None:
        return norm(x)
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
