"""Generation and task listing: ``POST /v1/tasks/{task}/generate``, ``POST /v1/generate``, ``GET /v1/tasks``.

Input text is tokenized with the tokenizer's defaults and nothing else is added: the task's virtual tokens come
first (positions ``0..n-1``), then the text. A request with an empty input is served when the task has a prompt-
tuning or p-tuning prompt (the virtual tokens alone are the prompt) or the tokenizer adds a BOS token; a prefix-
tuned task's virtual tokens are KV only, so an empty input to it, like an empty input with no task, gets a 422
``empty_input``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.sse import EventSourceResponse

from prompt_store.registry import SoftPrompt
from server.api.deps import State, get_engine
from server.api.errors import error_body
from server.api.schemas import GenerateParameters, GenerateRequest, GenerateResponse, TaskInfo, TaskList, Usage
from server.api.service import build_request, collect, lookup_task, note_finish, note_task, sse, submit
from server.engine import Engine, RequestOutput
from server.request import Request, SamplingParams

router = APIRouter(tags=["generate"])
EngineDep = Annotated[Engine, Depends(get_engine)]


def to_sampling(p: GenerateParameters, default_max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or default_max_new_tokens,
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=tuple(p.stop or ()),
    )


def _usage(out: RequestOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, virtual_tokens=out.num_virtual_tokens,
                 completion_tokens=out.num_output_tokens)


async def _generate(state, engine: Engine, prompt: SoftPrompt | None, body: GenerateRequest, http: HTTPRequest):
    note_task(http, prompt)
    req = await build_request(state, engine, prompt, body.inputs,
                              to_sampling(body.parameters, state.settings.default_max_new_tokens),
                              timeout=body.parameters.timeout)
    stream = submit(engine, req)
    if body.stream:
        return EventSourceResponse(_sse(engine, prompt, req, stream, http))
    text, last = await collect(engine, req, stream, http)
    note_finish(http, last.finish_reason)
    return GenerateResponse(
        generated_text=text,
        finish_reason=last.finish_reason or "stop",
        task=prompt.task if prompt else None,
        prompt_version=prompt.version if prompt else None,
        usage=_usage(last),
    )


async def _sse(engine: Engine, prompt: SoftPrompt | None, req: Request, stream, http: HTTPRequest):
    """Events: ``{"text", "token_ids"}`` per text delta, then a final ``{"text", "token_ids", "finish_reason",
    "usage", "task", "prompt_version"}`` (``finish_reason`` "timeout" or "shutdown" when the server ended it early);
    an error after the stream started is an ``event: error``. When the client goes away, the generator is closed and
    the request aborted."""
    finished = False
    pending: list[int] = []  # ids whose text is still held back (part of a character or of a stop string)
    try:
        async for out in stream:
            pending.extend(out.new_token_ids)
            if out.finish_reason == "error":
                finished = True
                note_finish(http, "engine_error", failed=True)
                yield sse(error_body(f"generation failed: {out.error}", "server_error", "engine_error"), "error")
                return
            if out.finished:
                finished = True
                note_finish(http, out.finish_reason)
                yield sse({
                    "text": out.text, "token_ids": pending, "finish_reason": out.finish_reason,
                    "usage": _usage(out).model_dump(), "task": prompt.task if prompt else None,
                    "prompt_version": prompt.version if prompt else None,
                })
                return
            if out.text:
                yield sse({"text": out.text, "token_ids": pending})
                pending = []
    finally:
        if not finished:
            engine.abort(req.request_id)


@router.post("/v1/tasks/{task}/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate_task(task: str, body: GenerateRequest, state: State, engine: EngineDep, http: HTTPRequest):
    """Generate with ``task``'s soft prompt prepended. 404 for an unknown task, 422 for bad parameters.
    ``"stream": true`` returns Server-Sent Events."""
    prompt = lookup_task(state, task)
    return await _generate(state, engine, prompt, body, http)


@router.post("/v1/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate_base(body: GenerateRequest, state: State, engine: EngineDep, http: HTTPRequest):
    """Generate with the plain base model (no soft prompt); these rows share batches with task rows."""
    return await _generate(state, engine, None, body, http)


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(state: State) -> TaskList:
    """The servable tasks, sorted by name."""
    return TaskList(tasks=[TaskInfo(task=p.task, num_virtual_tokens=p.num_virtual_tokens, version=p.version,
                                    peft_type=p.peft_type, nbytes=p.nbytes) for p in state.registry.list()])
