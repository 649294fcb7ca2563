"""vLLM as a peer: a running vLLM OpenAI server started with ``--enable-prompt-embeds``.

vLLM has no soft prompts, so each request carries its own ``prompt_embeds``: base64 of ``torch.save`` of the
float32 CPU tensor ``cat(prompt, embed(text_ids))``, ``[virtual + text, hidden]``, built here with the same
model, prompts and texts as the other legs. It goes to ``POST /v1/completions`` with ``max_tokens``,
``temperature 0`` and ``stream: true`` (``stream_options.include_usage``): TTFT is the time to the first SSE
chunk that carries text (to the first chunk if none does), latency the time to ``[DONE]``; completion tokens
come from the final usage chunk (re-tokenizing the text when the server sends no usage). vLLM therefore
recomputes every request's virtual tokens in its prefill.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import torch

from .driver import announce, client, drive, sse_events
from .hf_legs import request_embeds
from .stats import LegResult, RequestRecord
from .workload import PromptBank, Workload


def encode_prompt_embeds(t: torch.Tensor) -> str:
    """base64 of ``torch.save`` of ``t`` as a contiguous float32 CPU tensor (what vLLM's ``prompt_embeds``
    takes; vLLM reads it back with ``torch.load(weights_only=True)``)."""
    buf = io.BytesIO()
    torch.save(t.detach().to("cpu", torch.float32).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_prompt_embeds(blob: str) -> torch.Tensor:
    """The inverse of :func:`encode_prompt_embeds` (safe load: tensors only)."""
    return torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)


def discover_model(url: str, timeout: float = 10.0) -> str:
    """The first model id a vLLM server lists at ``/v1/models``."""
    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"vLLM at {url} lists no models")
    return str(data[0]["id"])


class VllmTarget:
    """A running vLLM server; ``model`` defaults to the first id at ``/v1/models``."""

    def __init__(self, url: str, model: str | None, *, timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        try:
            self.model = model or discover_model(self.url)
        except httpx.HTTPError as exc:
            raise ValueError(f"vLLM at {self.url} is not reachable ({exc!r}); start it with "
                             "--enable-prompt-embeds (see /v1/models)") from exc
        self.timeout = timeout
        self.transport = transport  # tests inject an httpx.MockTransport

    async def run(self, loaded, bank: PromptBank, workload: Workload, scenario: str) -> LegResult:
        """Encode every request's embeddings up front (not timed), warm up with one untimed request, send the
        load."""
        blobs = [encode_prompt_embeds(request_embeds(loaded, bank, workload, j))
                 for j in range(workload.num_requests)]
        # the warm-up sends request 0's text without a soft prompt: it shares no prefix with a timed request
        warm_blob = encode_prompt_embeds(request_embeds(loaded, bank, workload, 0)[bank.num_virtual:])
        tok = loaded.tokenizer
        conns = min(workload.concurrency, workload.num_requests) + 4
        async with client(self.url, conns, self.timeout, self.transport) as cli:

            async def send(j: int) -> RequestRecord:
                blob = warm_blob if j < 0 else blobs[j]
                body = {"model": self.model, "prompt_embeds": blob, "max_tokens": workload.max_new_tokens,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                first_any = first_text = None
                parts, usage, finish = [], None, None
                async with cli.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        return RequestRecord(resp.status_code, time.perf_counter() - t0,
                                             error=f"HTTP {resp.status_code}: {resp.text[:200]}")
                    async for _event, data in sse_events(resp):
                        now = time.perf_counter() - t0
                        if data == "[DONE]":
                            break
                        obj = json.loads(data)
                        if "error" in obj:
                            return RequestRecord(599, now, error=f"stream error: {str(obj['error'])[:200]}")
                        first_any = now if first_any is None else first_any
                        for ch in obj.get("choices") or []:
                            if ch.get("text"):
                                parts.append(ch["text"])
                                first_text = now if first_text is None else first_text
                            finish = ch.get("finish_reason") or finish
                        usage = obj.get("usage") or usage
                lat = time.perf_counter() - t0
                text = "".join(parts)
                if finish is None and usage is None:
                    return RequestRecord(599, lat, first_any, error="stream ended without a finish")
                tokens = (int(usage["completion_tokens"]) if usage
                          else len(tok(text, add_special_tokens=False)["input_ids"]))
                return RequestRecord(200, lat, first_text if first_text is not None else first_any, tokens, text)

            warm = await send(-1)
            if not warm.ok:
                raise httpx.HTTPError(f"vLLM warm-up request failed: {warm.error}")
            load1 = announce(scenario, "vllm", f"{workload.num_requests} requests with prompt_embeds, "
                             + ("Poisson arrivals" if workload.arrivals else f"concurrency {workload.concurrency}"))
            records, wall = await drive(workload, send)
        return LegResult("vllm", records, wall, load1, workload.max_new_tokens, extra={"model": self.model})
