"""The legs of the device check (``bench/gpu_check.py``), in process: the engine under a closed loop, Hugging Face
``generate`` as one padded batch, and transformers' continuous batching (``generate_batch``).

Every leg runs the same requests: request ``j`` is task ``tasks[j]``'s soft prompt followed by ``ids[j]`` (random
token ids), greedy, exactly ``max_new_tokens`` new tokens (the models have no end token). Units: tokens/s is new
tokens / wall-clock seconds of the leg; TTFT and latency are seconds from a request's submission; step times
are seconds, synchronised by the step's sampled tokens reaching the host.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import deque

import torch

from server.engine import Engine
from server.request import Request, SamplingParams

from .hf_legs import StepClock, padded_batch
from .stats import LegResult, RequestRecord, summarize


def make_requests(prompts: list, tasks: list[int], ids: list[list[int]], max_new_tokens: int) -> list[Request]:
    """Engine requests for the workload (task ``tasks[j]`` of ``prompts``; a task index < 0 means no prompt)."""
    out = []
    for t, row in zip(tasks, ids, strict=True):
        p = prompts[t] if t >= 0 else None
        out.append(Request(uuid.uuid4().hex, list(row), SamplingParams(max_new_tokens=max_new_tokens), p,
                           p.task if p is not None else ""))
    return out


def warm_prompts(engine: Engine, prompts: list) -> int:
    """Compute every prompt's shared KV ahead of traffic, as the server does when prompts are loaded (idle-time
    prefetch). Returns how many were computed."""
    core = engine.core
    for p in prompts:
        core.queue_prefetch(p)
    done = 0
    while core.prefetch_pending:
        n = core.prefetch_some(64)
        done += n
        if n == 0:
            break
    return done


def engine_leg(engine: Engine, requests: list[Request], concurrency: int, name: str) -> dict:
    """Run ``requests`` with at most ``concurrency`` in flight (a new one enters as soon as one finishes), on the
    calling thread, one engine step at a time.

    Returns:
        :func:`bench.stats.summarize`'s figures plus ``steps``, ``decode_step_s_p50`` (median time of steps with
        only decode rows), ``decode_steps`` and the step count by kind.
    """
    pending = deque(enumerate(requests))
    inflight: dict[int, Request] = {}
    records: list[RequestRecord | None] = [None] * len(requests)
    steps: dict[str, list[float]] = {"prefill": [], "decode": [], "mixed": []}
    t0 = time.perf_counter()
    with torch.inference_mode():
        while pending or inflight:
            while pending and len(inflight) < concurrency:
                j, req = pending.popleft()
                req.arrival_time = time.monotonic()
                engine.check(req)
                req.eos_token_ids = engine.eos_token_ids
                engine.core.add(req)
                inflight[j] = req
            s0 = time.perf_counter()
            plan = engine.step()
            if not plan.is_empty:
                steps[plan.kind].append(time.perf_counter() - s0)
            for j, req in list(inflight.items()):
                if req.status.is_finished:
                    ok = req.status.finish_reason in ("length", "stop")
                    ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
                    records[j] = RequestRecord(200 if ok else 500, req.finish_time - req.arrival_time, ttft,
                                               len(req.output_token_ids), error=None if ok else "engine error")
                    del inflight[j]
    wall = time.perf_counter() - t0
    leg = LegResult(name, [r for r in records if r is not None], wall, float("nan"), requests[0].params.max_new_tokens)
    out = summarize(leg)
    out.update(concurrency=concurrency, steps={k: len(v) for k, v in steps.items()},
               decode_step_s_p50=statistics.median(steps["decode"]) if steps["decode"] else None)
    return out


def _generate(model, x: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, StepClock]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out, clock


def hf_padded_leg(model, prompts: list, tasks: list[int], ids: list[list[int]], max_new_tokens: int) -> dict:
    """All requests as one left-padded batch ``[pad][virtual][text]`` of ``inputs_embeds`` through Hugging Face
    ``generate`` (positions from the attention mask), after an untimed one-row warm-up. Every row shares the
    first step, so every TTFT is the first step's time."""
    dev, dt = model.device, model.dtype
    emb = model.get_input_embeddings()
    with torch.inference_mode():
        rows = [torch.cat([prompts[t].embeddings.to(dev, dt), emb(torch.tensor(r, device=dev))]) if t >= 0
                else emb(torch.tensor(r, device=dev)) for t, r in zip(tasks, ids, strict=True)]
    x, mask = padded_batch([r.cpu() for r in rows])
    x, mask = x.to(dev), mask.to(dev)
    _generate(model, x[:1], mask[:1], 2)
    t0 = time.perf_counter()
    out, clock = _generate(model, x, mask, max_new_tokens)
    wall = time.perf_counter() - t0
    off = clock.t0 - t0
    n = out.shape[1]
    records = [RequestRecord(200, wall, clock.times[0] + off, n) for _ in range(x.shape[0])]
    res = summarize(LegResult("hf-padded-batch", records, wall, float("nan"), max_new_tokens))
    res.update(batch_positions=int(mask.numel()), pad_positions=int((mask == 0).sum()))
    return res


def hf_generate_batch_leg(model, ids: list[list[int]], max_new_tokens: int, num_blocks: int | None = None,
                          max_batch_tokens: int | None = None) -> dict:
    """transformers' continuous batching (``model.generate_batch``) on the texts alone (it takes token ids, so no
    soft prompts; ``ids`` should stand in for the virtual tokens' positions too), after an untimed two-request
    run. ``num_blocks`` / ``max_batch_tokens`` size its paged cache (None: transformers sizes it from free
    memory). TTFT where the installed transformers records timestamps, else None."""
    import inspect

    from transformers import GenerationConfig

    params = inspect.signature(model.generate_batch).parameters
    kwargs: dict = {"record_timestamps": True} if "record_timestamps" in params else {}
    sizing = {k: v for k, v in (("num_blocks", num_blocks), ("max_batch_tokens", max_batch_tokens)) if v}

    def config(n: int):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        if sizing and "continuous_batching_config" not in params:  # older transformers: on the GenerationConfig
            for k, v in sizing.items():
                setattr(cfg, k, v)
        return cfg

    if sizing and "continuous_batching_config" in params:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**sizing, page_size=16)
    rows = [list(r) for r in ids]
    with torch.inference_mode():
        model.generate_batch(inputs=rows[:2], generation_config=config(2), **kwargs)  # warm-up, untimed
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=rows, generation_config=config(max_new_tokens), **kwargs)
        wall = time.perf_counter() - t0
    records = []
    for o in outs.values():
        toks = len(getattr(o, "generated_tokens", None) or [])
        stamps = getattr(o, "timestamps", None) or []
        created = getattr(o, "created_time", None)
        ttft = stamps[0] - created if stamps and created is not None else None
        records.append(RequestRecord(200, wall, ttft, toks))
    return summarize(LegResult("hf-generate-batch", records, wall, float("nan"), max_new_tokens))


def roofline(weight_bytes: int, bytes_per_s: float, step_s: float | None) -> dict:
    """The weight-read roofline of one decode step: ``weight_bytes / bytes_per_s`` seconds; the fraction a
    measured ``step_s`` reaches (1.0: the step takes no longer than reading every weight once)."""
    floor = weight_bytes / bytes_per_s
    return {"weight_bytes": weight_bytes, "hbm_bytes_per_s": bytes_per_s, "floor_step_s": floor,
            "floor_tokens_per_s_batch1": 1.0 / floor, "decode_step_s": step_s,
            "fraction": floor / step_s if step_s else None}
