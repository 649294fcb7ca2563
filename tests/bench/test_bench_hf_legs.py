"""The Hugging Face peers on the tiny model: padded layout, and padded batch == sequential (positions skip pads)."""

from __future__ import annotations

import torch

from bench.hf_legs import hf_padded_batch, hf_sequential, padded_batch
from bench.workload import PromptBank, Workload


def test_padded_batch_layout_is_pad_then_row():
    a, b = torch.ones(2, 3), 2 * torch.ones(4, 3)
    x, mask = padded_batch([a, b])
    assert x.shape == (2, 4, 3)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(x[0, :2], torch.zeros(2, 3)) and torch.equal(x[0, 2:], a) and torch.equal(x[1], b)


def test_padded_batch_gives_the_sequential_texts(tiny_loaded):
    bank = PromptBank(tiny_loaded.model.get_input_embeddings().weight, 3, seed=0)
    texts = ["hello", "a somewhat longer input with several more words in it", "two words"]
    wl = Workload("t", texts, [0, 1, 0], 2, 3, 0, max_new_tokens=6, concurrency=3)
    seq = hf_sequential(tiny_loaded, bank, wl, 3, "test")
    batch = hf_padded_batch(tiny_loaded, bank, wl, "test")
    assert [r.text for r in batch.records] == [r.text for r in seq.records]
    assert [r.tokens for r in batch.records] == [r.tokens for r in seq.records]
    assert all(1 <= r.tokens <= 6 and r.ttft_s <= r.latency_s for r in batch.records + seq.records)
    assert batch.extra["pad_positions"] > 0
