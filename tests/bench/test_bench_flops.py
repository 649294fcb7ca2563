"""The FLOP model (bench/flops.py) on a tiny hand-computed config, and the matmul peak's shape."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from bench.flops import (
    ModelShape,
    decode_flops,
    matmul_peak,
    prefill_flops,
    row_prefill_flops,
    server_all_steps_flops,
    server_prefill_flops,
)

# hidden 8, intermediate 16, 2 layers, 2 query heads of dim 4, 1 KV head, vocabulary 10
TINY = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_tiny_config_by_hand():
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 + MLP 3*8*16 = 64 + 32 + 32 + 64 + 384
    assert TINY.linear_params_per_layer == 576
    assert TINY.linear_flops_per_token == 2 * 576 * 2 == 2304
    assert TINY.attention_flops(5) == 4 * 2 * 4 * 5 * 2 == 320
    assert TINY.lm_head_flops == 2 * 8 * 10 == 160


def test_row_prefill_flops_by_hand():
    # positions 0, 1, 2: contexts 1 + 2 + 3 = 6
    assert row_prefill_flops(TINY, 0, 3) == 3 * 2304 + 64 * 6 + 160 == 7456
    # positions 2, 3: contexts 3 + 4 = 7; no LM head
    assert row_prefill_flops(TINY, 2, 2, lm_head=False) == 2 * 2304 + 64 * 7 == 5056


def test_server_estimate_equals_the_exact_row_sum_for_the_workload_layout():
    # a request of v virtual + t text tokens prefills positions v-1 .. v+t-1 (t + 1 tokens, one LM head)
    v, t = 4, 20
    exact = row_prefill_flops(TINY, v - 1, t + 1)
    assert server_prefill_flops(TINY, t + 1, v, t) == pytest.approx(exact) == pytest.approx(67360)
    assert server_prefill_flops(TINY, 10 * (t + 1), v, t) == pytest.approx(10 * exact)
    assert prefill_flops(TINY, 3, 2.0, 0) == 3 * (2304 + 64 * 2)


def test_all_steps_split_decode_and_prefill_positions():
    # 2 requests of 4 virtual + 20 text tokens, 5 generated each: 2 * 21 prefill + 2 * 4 decode positions
    assert decode_flops(TINY, 8, 26.5) == 8 * (2304 + 64 * 26.5 + 160) == 33280
    assert server_all_steps_flops(TINY, 50, 2, 10, 4, 20) == pytest.approx(2 * 67360 + 33280)


def test_shape_from_config_smollm2_135m():
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)
    s = ModelShape.from_config(cfg)
    assert (s.head_dim, s.kv_heads) == (64, 3)
    assert s.linear_params_per_layer == 3_538_944
    assert s.linear_flops_per_token == 212_336_640


def test_matmul_peak_reports_each_shape():
    r = matmul_peak(shapes=((16, 8, 4), (8, 8, 8)), repeats=3, warmup=1)
    assert r["threads"] >= 1 and [s["shape"] for s in r["shapes"]] == [[16, 8, 4], [8, 8, 8]]
    assert r["peak_gflops_per_s"] == max(s["gflops_per_s"] for s in r["shapes"]) > 0
