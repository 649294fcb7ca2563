"""The engine loop's body: one :meth:`EngineCore.step` is schedule -> execute -> update -> emit.

Owns the KV accounting (:class:`~server.block_pool.BlockPool`, :class:`~server.prompt_cache.PromptKVCache`), the
scheduler, the model runner and the output processor, and sizes the KV pool from :class:`EngineConfig`. Runs on
the engine thread only; :class:`server.engine.Engine` is the thread-safe front.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from server.attention.backend import AttentionBackend
from server.block_pool import BlockPool
from server.engine_config import EngineConfig
from server.kv_pool import KVPool, kv_bytes_per_token, model_kv_shape
from server.metrics import Metrics
from server.model_loader import LoadedModel
from server.model_runner import ModelRunner
from server.outputs import OutputProcessor, RequestOutput, make_output
from server.prompt_cache import PromptKVCache
from server.prompt_kv_tier import HostPromptKV
from server.request import Request, RequestStatus, SamplingParams, cached_prompt_positions
from server.scheduler import Scheduler, SchedulerOutput


class EngineCore:
    """Scheduler + runner + output processor over one KV pool.

    The pool holds ``(kv_cache_bytes + prompt_kv_cache_bytes) // block_bytes`` blocks (at least one), where
    ``block_bytes = block_size * 2 * layers * kv_heads * head_dim * dtype_bytes``.

    Args:
        loaded: the frozen base model.
        config: limits.
        metrics: where to report.
        backend: attention backend (the runner's default for the device if None).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig, metrics: Metrics,
                 backend: AttentionBackend | None = None) -> None:
        layers, kvh, hd = model_kv_shape(loaded.model.config)
        self.bytes_per_token = kv_bytes_per_token(layers, kvh, hd, loaded.dtype)
        bs = config.block_size
        num_blocks = max((config.kv_cache_bytes + config.prompt_kv_cache_bytes) // (self.bytes_per_token * bs), 1)
        self.config = config
        self.metrics = metrics
        self.pool = BlockPool(num_blocks, bs)
        self.prompt_cache = PromptKVCache(self.pool, config.prompt_kv_cache_bytes, self.bytes_per_token)
        self.scheduler = Scheduler(self.pool, self.prompt_cache, config.max_num_seqs, config.max_num_batched_tokens)
        host_tier = HostPromptKV(config.prompt_kv_host_bytes, pin_memory=loaded.device.type == "cuda") \
            if config.prompt_kv_host_bytes else None
        self.runner = ModelRunner(loaded, KVPool(num_blocks, bs, layers, kvh, hd, loaded.dtype, loaded.device),
                                  backend, config.attention_kernel, config.packed_weights,
                                  config.attention_backend, host_tier)
        self.outputs = OutputProcessor(loaded.tokenizer, frozenset(loaded.eos_token_ids), metrics)
        self.steps = 0
        self._prefetch: OrderedDict[str, object] = OrderedDict()  # prompt key -> SoftPrompt, waiting for idle time
        self._task_labels: tuple[str, str, str] | None = None  # softprompt_task_requests_info's current labels

    def add(self, req: Request) -> None:
        """Queue a request (its text pipeline starts once the scheduler took it).

        Raises:
            ValueError: the scheduler refuses it (its KV can never fit the pool).
        """
        self.scheduler.add(req)
        self.outputs.add(req)

    def abort(self, req: Request) -> RequestOutput | None:
        """Finish ``req`` as aborted and free its KV; its final output, or None if it had already finished."""
        return self.end(req, RequestStatus.FINISHED_ABORTED)

    def end(self, req: Request, status: RequestStatus, refresh: bool = True) -> RequestOutput | None:
        """Finish ``req`` now with ``status`` (aborted, timeout or shutdown) and free its KV. Returns its final output
        (carrying the text held back so far, except for an abort, whose client is gone), or None if it had already
        finished. ``refresh=False`` leaves the gauges to the caller (ending many requests at once)."""
        if req.status.is_finished:
            return None
        self.scheduler.finish(req, status)
        if refresh:
            self.refresh_gauges()
        text = "" if status == RequestStatus.FINISHED_ABORTED else self.outputs.flush(req)
        return self.outputs.finish_or_keep(req, make_output(req, text=text))

    def expire(self, now: float) -> list[RequestOutput]:
        """End every request whose deadline is at or before ``now`` (``time.monotonic()`` seconds) with finish
        reason "timeout"; their final outputs."""
        outs = [self.end(r, RequestStatus.FINISHED_TIMEOUT, refresh=False) for r in self.scheduler.past_deadline(now)]
        if outs:
            self.refresh_gauges()
        return [o for o in outs if o is not None]

    def end_all(self, status: RequestStatus) -> list[RequestOutput]:
        """End every running and waiting request with ``status``; their final outputs."""
        outs = [self.end(r, status, refresh=False) for r in self.scheduler.unfinished()]
        if outs:
            self.refresh_gauges()
        return [o for o in outs if o is not None]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ prompt-KV prefetch
    def queue_prefetch(self, prompt) -> None:
        """Compute ``prompt``'s virtual-token KV (a :class:`~prompt_store.registry.SoftPrompt`) when the engine is
        idle, so its first request does not pay for it. Best effort: see :meth:`prefetch_some`."""
        if cached_prompt_positions(prompt) > 0:
            self._prefetch[prompt.sha256] = prompt

    @property
    def prefetch_pending(self) -> int:
        return len(self._prefetch)

    def prefetch_some(self, max_prompts: int = 16) -> int:
        """Fill up to ``max_prompts`` queued prompts' KV (embedding prompts in one packed pass, prefix prompts
        written as they are); only while no request waits or runs, only into free blocks, and only while the cache
        stays within its byte budget (a prefetch never evicts another prompt). A queued prompt that does not fit is
        dropped. Returns how many were filled."""
        cache, pool = self.prompt_cache, self.pool
        todo, temp = [], []
        while self._prefetch and len(todo) < max_prompts and not self.scheduler.has_work():
            key, prompt = self._prefetch.popitem(last=False)
            n = cached_prompt_positions(prompt)
            full, tail = divmod(n, pool.block_size)
            if key in cache:
                continue
            if cache.nbytes + n * self.bytes_per_token > cache.budget_bytes or pool.num_free < full + (tail > 0):
                continue
            entry, _ = cache.acquire(key, n)
            stand_in = Request(f"prefetch-{key[:16]}", [], SamplingParams(max_new_tokens=1), soft_prompt=prompt)
            stand_in.block_table = list(entry.full_blocks) + (pool.allocate(1) if tail else [])
            todo.append((entry, stand_in))
            temp.append(stand_in.block_table[len(entry.full_blocks):])
        if todo:
            self.runner.execute(SchedulerOutput(prompts_to_compute=todo, evicted_prompts=cache.drain_evicted()))
        for (entry, _), blocks in zip(todo, temp, strict=True):
            cache.mark_computed(entry)
            pool.release(list(entry.full_blocks) + blocks)  # the stand-in's references; the cache keeps its own
            cache.release(entry)
        self.refresh_gauges()
        return len(todo)

    def step(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """One engine step: plan, run the model, apply the results, produce each request's output. Returns the
        plan and the outputs."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        stopped = self.outputs.detokenize(result.sampled)
        self.scheduler.update_from_output(plan, result.sampled, stopped, result.failed)
        outs = self.outputs.outputs(plan, result.sampled, result.failed)
        self.steps += not plan.is_empty
        self.outputs.observe_step(plan, time.perf_counter() - t0)
        self.refresh_gauges()
        return plan, outs

    def _publish_tasks(self) -> None:
        """``softprompt_task_requests_info``: one child whose labels list the running and the waiting requests'
        tasks (sorted, comma-separated; base-model requests are not a task), replaced when the lists change."""
        sched = self.scheduler
        running = ",".join(sorted({r.task for r in sched.running if r.task}))
        waiting = ",".join(sorted({r.task for r in sched.waiting if r.task}))
        labels = (running, waiting, str(self.config.max_num_seqs))
        gauge = self.metrics.task_requests_info
        if labels != self._task_labels:
            gauge.clear()
            self._task_labels = labels
        gauge.labels(*labels).set(time.time())

    def refresh_gauges(self) -> None:
        """Running/waiting requests and KV blocks by owner (shared prompt blocks vs requests' own)."""
        m, pool = self.metrics, self.pool
        prompt_blocks = self.prompt_cache.num_blocks
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_used_blocks.set(pool.num_used)
        m.kv_blocks.labels("prompts").set(prompt_blocks)
        m.kv_blocks.labels("requests").set(pool.num_used - prompt_blocks)
        m.kv_blocks.labels("free").set(pool.num_free)
        m.kv_blocks_saved.set(self.prompt_cache.blocks_saved)
        m.kv_usage.set((pool.num_used - self.prompt_cache.idle_blocks) / pool.num_blocks)
        self._publish_tasks()
        m.prompt_kv_cached.set(len(self.prompt_cache))
        m.prompt_kv_bytes.set(self.prompt_cache.nbytes)
        m.prompt_kv_tail_bytes.set(self.runner.tail_bytes)
