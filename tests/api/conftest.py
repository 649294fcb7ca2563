"""Fixtures for the API tests (streaming, stop strings, OpenAI compatibility, client, disconnects).

They build on ``tests/conftest.py`` (``smol_tokenizer``, ``tiny_loaded``, ``smol_loaded``, ``make_client``) and add:
a live uvicorn server on 127.0.0.1 (for real network clients), a tiny model with a longer context (C14 needs
``max_new_tokens`` 500), an SSE parser, a greedy reference by full forward passes, a "scripted" forward pass that
makes the engine emit chosen tokens, and a Prometheus reader. Helpers are handed to tests as fixtures, because
test modules here are not a package.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import make_settings

from server.app import create_app
from server.config import Settings
from server.model_loader import LoadedModel

LIVE_ADMIN_TOKEN = "api-live-admin-token"
LONG_CONTEXT = 1024


def api_settings(prompts: Path | None, **overrides) -> Settings:
    """Settings for a live test server: no watcher, admin token LIVE_ADMIN_TOKEN (see ``make_settings``)."""
    return make_settings(
        prompts, **{"watch": False, "admin_token": LIVE_ADMIN_TOKEN, "log_level": "warning", **overrides}
    )


# ----------------------------------------------------------------------------------------------------- models
def build_llama(vocab_size: int, context: int, seed: int) -> torch.nn.Module:
    """A random 2-layer Llama, hidden 64 (the hidden size of the tiny model of tests/conftest.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_long_loaded(smol_tokenizer) -> LoadedModel:
    """Like ``tiny_loaded`` but with a context of 1024 tokens, so 500 new tokens fit (case C14)."""
    model = build_llama(len(smol_tokenizer), LONG_CONTEXT, seed=1)
    return LoadedModel(
        model=model, tokenizer=smol_tokenizer, model_id="tiny-llama-long", device=torch.device("cpu"),
        dtype=torch.float32, eos_token_ids=(smol_tokenizer.eos_token_id,), max_context=LONG_CONTEXT,
    )


@pytest.fixture
def fresh_tiny_model(smol_tokenizer) -> Callable[[], torch.nn.Module]:
    """``make()`` -> a new tiny Llama of the same shape as ``tiny_loaded``'s (for PEFT, which wraps its model)."""
    return lambda: build_llama(len(smol_tokenizer), 256, seed=0)


# ----------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def _greedy(loaded: LoadedModel, ids: Sequence[int], prompt: torch.Tensor | None, max_new_tokens: int,
            cached: bool = False):
    model = loaded.model
    emb = model.get_input_embeddings()
    eos = set(loaded.eos_token_ids)
    out: list[int] = []
    past = None
    for _ in range(max_new_tokens):
        if past is None:
            x = emb(torch.tensor([list(ids) + out], dtype=torch.long))  # [1, L, H]
            if prompt is not None:
                x = torch.cat([prompt.to(x.dtype)[None], x], dim=1)  # [1, n + L, H]
        else:
            x = emb(torch.tensor([out[-1:]], dtype=torch.long))  # [1, 1, H]
        res = model(inputs_embeds=x, cache=past, use_cache=cached, logits_to_keep=1)
        if cached:
            past = res.cache
        tok = int(res.logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            return out, "stop"
    return out, "length"


@pytest.fixture(scope="session")
def greedy_ref() -> Callable[..., tuple[list[int], str]]:
    """``ref(loaded, ids, prompt=None, max_new_tokens=8, cached=False)`` -> (tokens, finish_reason): greedy
    decoding over ``cat(prompt, embed(ids + generated))``, stopping after an EOS token. By default every step is
    a full forward pass over the whole sequence; ``cached=True`` uses the Hugging Face KV cache instead (for the
    real model, where full passes are slow on the CPU)."""

    def ref(loaded: LoadedModel, ids: Sequence[int], prompt: torch.Tensor | None = None, max_new_tokens: int = 8,
            cached: bool = False):
        return _greedy(loaded, ids, prompt, max_new_tokens, cached)

    return ref


@pytest.fixture(scope="session")
def decode(smol_tokenizer) -> Callable[[Sequence[int]], str]:
    """How the server renders tokens: special tokens (EOS) skipped, no space clean-up."""
    return lambda ids: smol_tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def rand_embeddings() -> Callable[..., torch.Tensor]:
    """``make(n, scale=1.0, seed=0, hidden=64)`` -> ``[n, hidden]`` random soft-prompt embeddings."""

    def make(n: int, scale: float = 1.0, seed: int = 0, hidden: int = 64) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, hidden, generator=g) * scale

    return make


@pytest.fixture(scope="session")
def safetensors_bytes() -> Callable[[torch.Tensor], bytes]:
    return lambda t: safetensors.torch.save({"prompt": t.contiguous()})


# ----------------------------------------------------------------------------------------------------- SSE
def parse_sse_text(text: str) -> list[tuple[str | None, object]]:
    """``[(event, data)]`` of an SSE body; ``data`` is JSON-decoded unless it is ``[DONE]``; comments skipped."""
    events: list[tuple[str | None, object]] = []
    event: str | None = None
    data: list[str] = []
    for line in text.split("\n"):
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                raw = "\n".join(data)
                events.append((event, raw if raw == "[DONE]" else json.loads(raw)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    assert not data, f"SSE body ends inside an event: {data!r}"
    return events


@pytest.fixture(scope="session")
def parse_sse() -> Callable[[str], list[tuple[str | None, object]]]:
    return parse_sse_text


# ----------------------------------------------------------------------------------------------------- scripted model
@pytest.fixture
def script_engine(monkeypatch) -> Callable[..., list[int]]:
    """``script(engine, num_prompt_positions, tokens)``: from now on, the engine's model emits ``tokens`` one by
    one (then EOS) for any row whose prompt has ``num_prompt_positions`` positions; the real forward pass still
    runs (KV is written), only the logits are replaced. Returns a list that records the forward calls' row
    counts."""

    def script(engine, num_prompt_positions: int, tokens: Sequence[int]) -> list[int]:
        runner = engine.runner
        real_forward, real_logits = runner._forward, runner.model.logits
        eos = min(engine.eos_token_ids)
        calls: list[int] = []
        sampling: list = []

        def forward(rows):
            calls.append(len(rows))
            sampling[:] = [r for r in rows if r.completes_prompt]
            return real_forward(rows)

        def logits(hidden):
            real = real_logits(hidden)  # [num_sampling_rows, vocab]
            out = torch.full(tuple(real.shape), float("-inf"))
            for i, r in enumerate(sampling):
                k = r.start + r.num_tokens - num_prompt_positions  # index of the token sampled next
                out[i, tokens[k] if 0 <= k < len(tokens) else eos] = 0.0
            return out

        monkeypatch.setattr(runner, "_forward", forward)
        monkeypatch.setattr(runner.model, "logits", logits)
        return calls

    return script


# ----------------------------------------------------------------------------------------------------- metrics
def metric_from_text(text: str, sample: str, labels: dict[str, str] | None = None) -> float:
    """The sum of Prometheus samples named ``sample`` (e.g. ``softprompt_generated_tokens_total``) whose labels
    include ``labels``; 0.0 when a labelled child does not exist yet."""
    found, total = False, 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                found, total = True, total + float(s.value)
    if found or labels:
        return total
    raise AssertionError(f"metric {sample} not exported")


# ----------------------------------------------------------------------------------------------------- live server
@dataclass
class LiveServer:
    """A uvicorn server on 127.0.0.1 in a background thread."""

    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread
    admin_token: str | None
    http: httpx.Client  # for /metrics polling (one client: creating one per call costs ~0.1 s)

    @property
    def state(self):
        return self.app.state.sp

    @property
    def engine(self):
        return self.state.engine

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def metric(self, sample: str, labels: dict[str, str] | None = None) -> float:
        resp = self.http.get(f"{self.url}/metrics", timeout=10)
        resp.raise_for_status()
        return metric_from_text(resp.text, sample, labels)


@pytest.fixture
def live_server(tiny_loaded: LoadedModel, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """``start(loaded=None, prompts=<tmp dir>, **settings)`` -> a started :class:`LiveServer` (tiny model by
    default, admin token ``LIVE_ADMIN_TOKEN`` unless overridden); every server is shut down after the test."""
    started: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []
    clients: list[httpx.Client] = []

    def start(loaded: LoadedModel | None = None, prompts: Path | None | str = "default", **overrides) -> LiveServer:
        if prompts == "default":
            prompts = tmp_path / f"prompts{len(started)}"
            prompts.mkdir()
        settings = api_settings(prompts, **overrides)
        app = create_app(settings, loaded=loaded or tiny_loaded)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}",
                                  daemon=True)
        thread.start()
        started.append((server, thread, sock))
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "uvicorn thread died during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
            time.sleep(0.02)
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        clients.append(httpx.Client())
        return LiveServer(f"http://127.0.0.1:{port}", app, server, thread, token, clients[-1])

    yield start
    for client in clients:
        client.close()
    for server, _, _ in started:
        server.should_exit = True
    for server, thread, sock in started:
        thread.join(15)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        with contextlib.suppress(OSError):
            sock.close()


@pytest.fixture
def slow_live_server(live_server, tiny_long_loaded, monkeypatch) -> Callable[..., LiveServer]:
    """``start(step_delay_s, **settings)`` -> a :class:`LiveServer` on the long-context tiny model whose forward pass
    sleeps ``step_delay_s`` seconds per engine step (the tiny model finishes hundreds of tokens in a moment)."""

    def start(step_delay_s: float, **settings) -> LiveServer:
        srv = live_server(loaded=tiny_long_loaded, **settings)
        real = srv.engine.runner._forward

        def forward(rows):
            time.sleep(step_delay_s)
            return real(rows)

        monkeypatch.setattr(srv.engine.runner, "_forward", forward)
        return srv

    return start
