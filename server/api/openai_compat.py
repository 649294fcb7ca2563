"""OpenAI-compatible API: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

The request's ``model`` names a task (its soft prompt is prepended) or the base model's id (no soft prompt), as
vLLM, LoRAX and TGI do for adapters. Supported fields: ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n`` (1 only), ``stream`` (+ ``stream_options.include_usage``), and this server's ``timeout`` (seconds,
capped by ``--request-timeout``); unknown fields are ignored, as OpenAI's own server does for fields it does not use.

``finish_reason`` is "stop" or "length" as OpenAI's, or "timeout" / "shutdown" when the server ended the request
early (its deadline passed; the drain timeout of a shutdown ran out); the text generated until then is returned.

Usage counting rule: ``prompt_tokens`` counts the text (or chat-template) tokens only; a task's virtual tokens are
reported separately as ``usage.virtual_tokens`` and are not billed as prompt tokens; ``total_tokens`` is
``prompt_tokens + completion_tokens``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; an unknown model is 404
``model_not_found``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field

from prompt_store.registry import SoftPrompt
from server.api.deps import State, get_engine
from server.api.errors import APIError, error_body
from server.api.service import (
    build_request,
    collect,
    note_finish,
    note_task,
    sse,
    submit,
)
from server.engine import Engine, RequestOutput
from server.request import SamplingParams

router = APIRouter(tags=["openai"])
EngineDep = Annotated[Engine, Depends(get_engine)]
_DONE = b"data: [DONE]\n\n"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(None, gt=0, description="Deadline in seconds from arrival (at most the server's "
                                  "--request-timeout); past it the request ends with finish_reason 'timeout'.")

    def sampling(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 8:
            raise APIError(422, f"stop: at most 8 stop strings, got {len(stop)}", param="stop")
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=tuple(s for s in stop if s),
        )


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)


def _resolve_model(state, engine: Engine, model: str) -> SoftPrompt | None:
    if model == engine.loaded.model_id:
        return None
    prompt = state.registry.get(model)
    if prompt is None:
        raise APIError(404, f"The model {model!r} does not exist: use the base model "
                       f"{engine.loaded.model_id!r} or a task from GET /v1/models",
                       type="invalid_request_error", code="model_not_found", param="model")
    return prompt


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
            "virtual_tokens": out.num_virtual_tokens}


def _finish(out: RequestOutput) -> str:
    """OpenAI's finish reason: "length", "timeout" and "shutdown" as they are, anything else "stop"."""
    return out.finish_reason if out.finish_reason in ("length", "timeout", "shutdown") else "stop"


@router.get("/v1/models")
async def list_models(state: State, engine: EngineDep) -> dict:
    """The base model, then every servable task (hot-loaded ones appear, deleted ones vanish)."""
    base = engine.loaded.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "softprompt-server"}]
    for p in state.registry.list():
        data.append({"id": p.task, "object": "model", "created": int(p.loaded_at), "owned_by": "softprompt-server",
                     "root": base, "parent": base, "num_virtual_tokens": p.num_virtual_tokens, "version": p.version,
                     "peft_type": p.peft_type, "nbytes": p.nbytes})
    return {"object": "list", "data": data}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, engine: EngineDep, http: HTTPRequest):
    """Text completion; ``prompt`` is one string (or a list holding one)."""
    prompt = _resolve_model(state, engine, body.model)
    note_task(http, prompt)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    req = await build_request(state, engine, prompt, text, body.sampling(state.settings.default_max_new_tokens),
                              param="prompt", timeout=body.timeout)
    return await _respond(engine, body, req, "text_completion", http)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, state: State, engine: EngineDep, http: HTTPRequest):
    """Chat completion: the base model's chat template renders ``messages``, then the task's virtual tokens are
    prepended as for any request."""
    prompt = _resolve_model(state, engine, body.model)
    note_task(http, prompt)
    tok = engine.loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, f"the base model {engine.loaded.model_id!r} has no chat template", param="messages")
    messages = [m.model_dump() for m in body.messages]
    try:  # the template (Jinja) costs about a millisecond and grows with the message count: never on the event loop
        ids = await asyncio.to_thread(_render_chat, tok, messages)
    except Exception as exc:  # noqa: BLE001 - templates raise on message orders they refuse: the client's mistake
        raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc
    req = await build_request(state, engine, prompt, None, body.sampling(state.settings.default_max_new_tokens),
                              token_ids=list(ids), param="messages", timeout=body.timeout)
    return await _respond(engine, body, req, "chat.completion", http)


def _render_chat(tok, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the chat template, with the generation prompt."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


async def _respond(engine: Engine, body: _Common, req, kind: str, http: HTTPRequest):
    rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    stream = submit(engine, req)
    if body.stream:
        return EventSourceResponse(_stream(engine, body, req, stream, kind, rid, created, http))
    text, last = await collect(engine, req, stream, http)
    note_finish(http, last.finish_reason)
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(last),
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": _finish(last), "logprobs": None}
    return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
            "usage": _usage(last)}


async def _stream(engine: Engine, body: _Common, req, stream, kind: str, rid: str, created: int,
                  http: HTTPRequest):
    """OpenAI chunks, then ``data: [DONE]``; the request is aborted if the client goes away."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    finished = False

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}

    try:
        if chat:
            yield sse(chunk(None, None, first=True))
        async for out in stream:
            if out.finish_reason == "error":
                finished = True
                note_finish(http, "engine_error", failed=True)
                yield sse(error_body(f"generation failed: {out.error}", "server_error", "engine_error"))
                yield _DONE
                return
            if out.text:
                yield sse(chunk(out.text, None))
            if out.finished:
                finished = True
                note_finish(http, out.finish_reason)
                yield sse(chunk(None, _finish(out)))
                if include_usage:
                    yield sse({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                               "usage": _usage(out)})
                yield _DONE
                return
    finally:
        if not finished:
            engine.abort(req.request_id)
