"""vLLM's ``prompt_embeds`` encoding and the vLLM leg against a fake OpenAI server (no vLLM needed)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
import torch

from bench.hf_legs import request_embeds
from bench.vllm_leg import VllmTarget, decode_prompt_embeds, encode_prompt_embeds
from bench.workload import PromptBank, Workload


def test_prompt_embeds_round_trip_with_a_safe_load():
    t = torch.randn(25, 576, generator=torch.Generator().manual_seed(0))
    blob = encode_prompt_embeds(t)
    back = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    assert back.dtype == torch.float32 and back.device.type == "cpu" and torch.equal(back, t)
    assert torch.equal(decode_prompt_embeds(blob), t)


def test_prompt_embeds_are_float32_and_contiguous_whatever_comes_in():
    t = torch.randn(8, 4, dtype=torch.float64).T  # non-contiguous, float64
    back = decode_prompt_embeds(encode_prompt_embeds(t))
    assert back.dtype == torch.float32 and back.is_contiguous() and back.shape == (4, 8)
    assert torch.allclose(back, t.float())


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def test_vllm_leg_sends_prompt_embeds_and_reads_stream(tiny_loaded):
    bank = PromptBank(tiny_loaded.model.get_input_embeddings().weight, 3, seed=0)
    texts = ["hello world", "one two three four"]
    wl = Workload("t", texts, [0, 1], 2, 3, 0, max_new_tokens=4, concurrency=2)
    seen = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        assert body["model"] == "m" and body["temperature"] == 0.0 and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 4
        x = decode_prompt_embeds(body["prompt_embeds"])
        seen.append(x)
        n = x.shape[0]
        return httpx.Response(200, content=_sse(
            {"choices": [{"index": 0, "text": "", "finish_reason": None}]},
            {"choices": [{"index": 0, "text": f"len{n}", "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 3}},
            b"[DONE]"), headers={"content-type": "text/event-stream"})

    target = VllmTarget("http://vllm", "m", timeout=10, transport=httpx.MockTransport(handler))
    leg = asyncio.run(target.run(tiny_loaded, bank, wl, "test"))
    assert len(seen) == 3  # warm-up + 2
    lens = [3 + len(tiny_loaded.tokenizer(t)["input_ids"]) for t in texts]
    assert [r.text for r in leg.records] == [f"len{n}!" for n in lens]
    assert seen[0].shape[0] == lens[0] - 3
    assert all(r.ok and r.tokens == 3 and r.ttft_s <= r.latency_s for r in leg.records)
    assert torch.equal(seen[0], request_embeds(tiny_loaded, bank, wl, 0)[3:])  # warm-up: no soft prompt
    assert torch.equal(seen[2], request_embeds(tiny_loaded, bank, wl, 1))
    assert leg.extra == {"model": "m"}


def test_unreachable_vllm_is_a_clear_refusal():
    with pytest.raises(ValueError, match="not reachable"):
        VllmTarget("http://127.0.0.1:9", None, timeout=1)
