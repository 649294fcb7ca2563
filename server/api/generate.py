"""Generation and task listing: ``POST /v1/tasks/{task}/generate``, ``POST /v1/generate``, ``GET /v1/tasks``.

Input text is tokenized with the tokenizer's defaults and nothing else is added: the task's virtual tokens come
first (positions ``0..n-1``), then the text. A request with an empty input is served when the task has a soft
prompt (the virtual tokens alone are the prompt) or the tokenizer adds a BOS token; with no position at all it
gets a 422.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends

from prompt_store.registry import SoftPrompt
from server.api.deps import State, get_engine
from server.api.errors import APIError
from server.api.schemas import GenerateParameters, GenerateRequest, GenerateResponse, TaskInfo, TaskList, Usage
from server.engine import Engine, EngineDeadError, EngineOverloadedError, RequestOutput, RequestRejectedError
from server.request import Request, SamplingParams

router = APIRouter(tags=["generate"])
EngineDep = Annotated[Engine, Depends(get_engine)]


def lookup_task(state, task: str) -> SoftPrompt:
    """The servable prompt of ``task``; 404 if there is none."""
    prompt = state.registry.get(task)
    if prompt is None:
        raise APIError(404, f"unknown task {task!r}: GET /v1/tasks lists the servable tasks",
                       type="not_found_error", code="task_not_found", param="task")
    return prompt


def build_request(state, engine: Engine, prompt: SoftPrompt | None, text: str, params: SamplingParams) -> Request:
    """Tokenize and check a request; 422/400 for what the engine can never run."""
    ids = list(engine.loaded.tokenizer(text)["input_ids"])
    req = Request(uuid.uuid4().hex, ids, params, prompt, prompt.task if prompt else "")
    try:
        engine.check(req)
    except RequestRejectedError as exc:
        status = 422 if exc.code == "empty_input" else 400
        raise APIError(status, str(exc), code=exc.code, param="inputs") from exc
    return req


def submit(engine: Engine, req: Request):
    """Queue ``req``; 503 when the engine is dead or the queue is full."""
    try:
        return engine.submit(req)
    except EngineOverloadedError as exc:
        raise APIError(503, str(exc), type="server_error", code="overloaded") from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_dead") from exc


async def collect(engine: Engine, req: Request, stream) -> tuple[list[int], RequestOutput]:
    """Wait for every token of ``req``. If the caller is cancelled (client gone), the request is aborted so its
    row and KV are freed at the next engine step."""
    tokens: list[int] = []
    last: RequestOutput | None = None
    try:
        async for out in stream:
            tokens.extend(out.new_token_ids)
            last = out
    finally:
        if last is None or not last.finished:
            engine.abort(req.request_id)
    if last is None or last.finish_reason == "error":
        raise APIError(503, f"generation failed: {last.error if last else 'no output'}", type="server_error",
                       code="engine_error")
    return tokens, last


def to_sampling(p: GenerateParameters, default_max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or default_max_new_tokens,
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
    )


def decode(engine: Engine, tokens: list[int]) -> str:
    """Text of generated tokens; EOS and other special tokens are left out."""
    eos = engine.eos_token_ids
    return engine.loaded.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)


async def _generate(state, engine: Engine, prompt: SoftPrompt | None, body: GenerateRequest) -> GenerateResponse:
    task = prompt.task if prompt else "_base"
    t0 = time.monotonic()
    try:
        req = build_request(state, engine, prompt, body.inputs,
                            to_sampling(body.parameters, state.settings.default_max_new_tokens))
        tokens, last = await collect(engine, req, submit(engine, req))
    except APIError as exc:
        state.metrics.requests.labels(task, str(exc.status)).inc()
        raise
    state.metrics.requests.labels(task, "200").inc()
    state.metrics.request_latency.labels(task).observe(time.monotonic() - t0)
    return GenerateResponse(
        generated_text=decode(engine, tokens),
        finish_reason=last.finish_reason or "stop",
        task=prompt.task if prompt else None,
        prompt_version=prompt.version if prompt else None,
        usage=Usage(prompt_tokens=last.num_prompt_tokens, virtual_tokens=last.num_virtual_tokens,
                    completion_tokens=last.num_output_tokens),
    )


@router.post("/v1/tasks/{task}/generate", response_model=GenerateResponse)
async def generate_task(task: str, body: GenerateRequest, state: State, engine: EngineDep) -> GenerateResponse:
    """Generate with ``task``'s soft prompt prepended. 404 for an unknown task, 422 for bad parameters."""
    prompt = lookup_task(state, task)
    return await _generate(state, engine, prompt, body)


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate_base(body: GenerateRequest, state: State, engine: EngineDep) -> GenerateResponse:
    """Generate with the plain base model (no soft prompt); these rows share batches with task rows."""
    return await _generate(state, engine, None, body)


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(state: State) -> TaskList:
    """The servable tasks, sorted by name."""
    return TaskList(tasks=[TaskInfo(task=p.task, num_virtual_tokens=p.num_virtual_tokens, version=p.version)
                           for p in state.registry.list()])
