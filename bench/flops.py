"""A FLOP model of a Llama-family forward pass, and the fp32 ``torch.mm`` peak of this machine.

FLOP model (a multiply-add counts 2; norms, activations, rotary embeddings, biases and softmax are ignored):

- linear layers, per token: ``2 * P * L``, where ``P`` is the non-embedding linear parameters of one layer,
  ``P = h*(n_q*d) + 2*h*(n_kv*d) + (n_q*d)*h + 3*h*i`` (q, k, v, o projections and the gated MLP's gate, up and
  down), ``h`` hidden size, ``i`` intermediate size, ``n_q`` / ``n_kv`` query / key-value heads, ``d`` head
  dimension and ``L`` layers;
- attention, per token and layer: ``4 * n_q * d * c`` for the scores ``QK^T`` and the weighted sum ``AV``,
  where ``c`` is the token's context (the keys it attends to: its position + 1);
- LM head: ``2 * h * V`` (``V`` the vocabulary), only for a row's last prefill token (one per request), the one
  whose logits pick the first generated token.

So a row that prefills positions ``s .. s+n-1`` costs ``n * 2PL + 4 n_q d L * sum_{p=s}^{s+n-1} (p+1) + 2hV``.

For the server's prefill the bench knows the token count (``softprompt_step_tokens_total{kind="prefill"}``)
but not each token's position, so it assumes the workload's layout: a request of ``v`` virtual and ``t`` text
tokens prefills positions ``v-1 .. v+t-1`` (the KV of its first ``v-1`` virtual tokens is the task's cached
prompt KV), a mean context of ``v + t/2``, and ``t + 1`` prefill tokens per LM-head row. Achieved prefill GFLOP/s
is those FLOPs divided by the prefill steps' seconds (``softprompt_step_seconds_total{kind="prefill"}``).

Prefill-only steps may be few (once one row decodes, later prefill chunks share steps with decode rows, kind
``mixed``), so the bench also reports the server's rate over all its steps: every position counted in any step
kind, split into ``D`` decode positions (a request that generated ``n`` tokens fed back ``n - 1`` of them) at
context ``v + t + n/2`` on average, each with an LM head, and ``P = positions - D`` prefill positions costed as
above; those FLOPs divided by the seconds of all steps.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from server.kv_pool import model_kv_shape

PEAK_SHAPES = ((2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576))


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        layers, kv_heads, head_dim = model_kv_shape(cfg)
        return cls(hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size), layers=layers,
                   heads=int(cfg.num_attention_heads), kv_heads=kv_heads, head_dim=head_dim,
                   vocab=int(cfg.vocab_size))

    @property
    def linear_params_per_layer(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

    @property
    def linear_flops_per_token(self) -> int:
        return 2 * self.linear_params_per_layer * self.layers

    def attention_flops(self, context: float) -> float:
        """Attention FLOPs of one token attending to ``context`` keys, all layers."""
        return 4 * self.heads * self.head_dim * context * self.layers

    @property
    def lm_head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def row_prefill_flops(shape: ModelShape, start: int, n: int, lm_head: bool = True) -> float:
    """FLOPs of prefilling positions ``start .. start+n-1`` of one row (exact under the model above)."""
    contexts = n * start + n * (n + 1) // 2  # sum of (p + 1) for p in start .. start+n-1
    return n * shape.linear_flops_per_token + shape.attention_flops(contexts) + (shape.lm_head_flops if lm_head
                                                                                 else 0)


def prefill_flops(shape: ModelShape, tokens: float, mean_context: float, rows: float) -> float:
    """FLOPs of ``tokens`` prefill tokens of mean context ``mean_context`` with ``rows`` LM-head rows."""
    return tokens * (shape.linear_flops_per_token + shape.attention_flops(mean_context)) + rows * shape.lm_head_flops


def server_prefill_flops(shape: ModelShape, tokens: float, virtual: int, text: int) -> float:
    """The server's prefill FLOPs for ``tokens`` counted prefill tokens of a ``virtual`` + ``text`` workload
    (assumptions in the module docstring)."""
    return prefill_flops(shape, tokens, virtual + text / 2, tokens / (text + 1))


def decode_flops(shape: ModelShape, tokens: float, mean_context: float) -> float:
    """FLOPs of ``tokens`` decode positions (one token each, LM head included) of mean context
    ``mean_context``."""
    return tokens * (shape.linear_flops_per_token + shape.attention_flops(mean_context) + shape.lm_head_flops)


def server_all_steps_flops(shape: ModelShape, positions: float, requests: int, generated: int, virtual: int,
                           text: int) -> float:
    """FLOPs of all ``positions`` the server computed for ``requests`` requests of ``virtual`` + ``text`` tokens
    that generated ``generated`` tokens in all (assumptions in the module docstring)."""
    decode = max(0, generated - requests)
    mean_new = generated / requests if requests else 0.0
    return (server_prefill_flops(shape, max(0.0, positions - decode), virtual, text)
            + decode_flops(shape, decode, virtual + text + mean_new / 2))


def matmul_peak(shapes=PEAK_SHAPES, repeats: int = 9, warmup: int = 3) -> dict:
    """GFLOP/s of fp32 ``torch.mm`` for each ``(m, k, n)`` shape (``[m,k] x [k,n]``, median of ``repeats``
    timed runs after ``warmup``), on ``torch.get_num_threads()`` threads; ``peak_gflops_per_s`` is the best
    shape's median."""
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
            for _ in range(warmup):
                torch.mm(a, b)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out.append({"shape": [m, k, n], "median_s": med, "gflops_per_s": 2 * m * k * n / med / 1e9})
    return {"threads": torch.get_num_threads(), "shapes": out,
            "peak_gflops_per_s": max(s["gflops_per_s"] for s in out)}
