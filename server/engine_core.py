"""The engine loop's body: one :meth:`EngineCore.step` is schedule -> execute -> update -> emit.

Owns the KV accounting (:class:`~server.block_pool.BlockPool`, :class:`~server.prompt_cache.PromptKVCache`), the
scheduler, the model runner and the output processor, and sizes the KV pool from :class:`EngineConfig`. Runs on
the engine thread only; :class:`server.engine.Engine` is the thread-safe front.
"""

from __future__ import annotations

import time

from server.attention.backend import AttentionBackend
from server.block_pool import BlockPool
from server.engine_config import EngineConfig
from server.host import tune_malloc
from server.kv_pool import KVPool, kv_bytes_per_token, model_kv_shape
from server.metrics import Metrics
from server.model_loader import LoadedModel
from server.model_runner import ModelRunner
from server.outputs import OutputProcessor, RequestOutput, make_output
from server.prompt_cache import PromptKVCache
from server.request import Request, RequestStatus
from server.scheduler import Scheduler, SchedulerOutput


class EngineCore:
    """Scheduler + runner + output processor over one KV pool.

    On the CPU it raises glibc's malloc thresholds for the process (:func:`server.host.tune_malloc`). The pool
    holds ``(kv_cache_bytes + prompt_kv_cache_bytes) // block_bytes`` blocks (at least one), where
    ``block_bytes = block_size * 2 * layers * kv_heads * head_dim * dtype_bytes``.

    Args:
        loaded: the frozen base model.
        config: limits.
        metrics: where to report.
        backend: attention backend (the runner's default for the device if None).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig, metrics: Metrics,
                 backend: AttentionBackend | None = None) -> None:
        if loaded.device.type == "cpu":
            tune_malloc()
        layers, kvh, hd = model_kv_shape(loaded.model.config)
        self.bytes_per_token = kv_bytes_per_token(layers, kvh, hd, loaded.dtype)
        bs = config.block_size
        num_blocks = max((config.kv_cache_bytes + config.prompt_kv_cache_bytes) // (self.bytes_per_token * bs), 1)
        self.config = config
        self.metrics = metrics
        self.pool = BlockPool(num_blocks, bs)
        self.prompt_cache = PromptKVCache(self.pool, config.prompt_kv_cache_bytes, self.bytes_per_token)
        self.scheduler = Scheduler(self.pool, self.prompt_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(loaded, KVPool(num_blocks, bs, layers, kvh, hd, loaded.dtype, loaded.device),
                                  backend, config.attention_kernel, config.packed_weights)
        self.outputs = OutputProcessor(loaded.tokenizer, frozenset(loaded.eos_token_ids), metrics)
        self.steps = 0

    def add(self, req: Request) -> None:
        """Queue a request (its text pipeline starts now)."""
        self.outputs.add(req)
        self.scheduler.add(req)

    def abort(self, req: Request) -> RequestOutput | None:
        """Finish ``req`` as aborted and free its KV; its final output, or None if it had already finished."""
        if req.status.is_finished:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.refresh_gauges()
        return self.outputs.finish_or_keep(req, make_output(req))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

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
        m.prompt_kv_cached.set(len(self.prompt_cache))
        m.prompt_kv_bytes.set(self.prompt_cache.nbytes)
