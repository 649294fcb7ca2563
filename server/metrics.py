"""Prometheus metrics (prometheus-client), one :class:`Metrics` per app on its own registry.

Names follow Prometheus conventions: ``softprompt_`` prefix, base units (seconds), ``_total`` counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports. Thread-safe (prometheus-client's own locking)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.requests = Counter(
            "softprompt_requests", "Generation requests, each counted once when it ends: by task (_base, _unknown), "
            "HTTP status (499: the client left first) and reason (finish reason of a 200, error code otherwise, "
            "cancelled for 499); see server.api.accounting.", ["task", "status", "reason"], registry=r
        )
        self.request_latency = Histogram(
            "softprompt_request_latency_seconds", "End-to-end latency of requests answered 200.", ["task"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "softprompt_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            ["task"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.generated_tokens = Counter(
            "softprompt_generated_tokens", "Generated (completion) tokens.", ["task"], registry=r
        )
        self.prompt_tokens = Counter(
            "softprompt_prompt_tokens", "Text prompt tokens prefilled (virtual tokens excluded).", registry=r
        )
        self.running = Gauge("softprompt_running_requests", "Requests running in the engine.", registry=r)
        self.waiting = Gauge("softprompt_waiting_requests", "Requests queued for admission.", registry=r)
        self.batch_size = Histogram(
            "softprompt_batch_size", "Rows per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "softprompt_batch_distinct_tasks", "Distinct tasks per engine step (the base model counts as one).",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.step_tokens = Histogram(
            "softprompt_step_tokens", "Token positions computed per engine step.",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r,
        )
        self.step_duration = Histogram(
            "softprompt_step_duration_seconds", "Wall time of one engine step (schedule, forward, sample, emit).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10), registry=r,
        )
        self.step_seconds = Counter(
            "softprompt_step_seconds", "Engine step wall time by kind: prefill (no one-token row), decode (only "
            "one-token rows), mixed.", ["kind"], registry=r,
        )
        self.step_tokens_total = Counter(
            "softprompt_step_positions", "Token positions computed, by step kind (see softprompt_step_seconds).",
            ["kind"], registry=r,
        )
        self.queue_wait = Histogram(
            "softprompt_queue_wait_seconds", "Time from arrival to first admission.", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preemptions = Counter(
            "softprompt_preemptions", "Running requests preempted (KV freed, recomputed later).", registry=r
        )
        self.kv_used_blocks = Gauge("softprompt_kv_cache_used_blocks", "KV blocks in use (any owner).", registry=r)
        self.kv_blocks = Gauge(
            "softprompt_kv_cache_blocks", "KV blocks by owner: prompts (shared virtual-token KV), requests (their "
            "own positions), free.", ["owner"], registry=r,
        )
        self.kv_blocks_saved = Gauge(
            "softprompt_kv_cache_blocks_saved", "KV blocks that sharing prompt KV saves now (each running request "
            "beyond the first of a prompt would otherwise hold its own copy).", registry=r,
        )
        self.kv_usage = Gauge(
            "softprompt_kv_cache_usage_perc", "Fraction (0-1) of the KV pool's blocks held by running requests, "
            "their prompts' shared blocks included; cached prompts no request uses are evictable and not counted. "
            "The KV-utilization gauge of the Gateway API Inference Extension's model-server protocol (vLLM: "
            "vllm:kv_cache_usage_perc).", registry=r,
        )
        self.task_requests_info = Gauge(
            "softprompt_task_requests_info", "Tasks of the running and of the waiting requests, as comma-separated "
            "labels, for task-affine routing: the adapter-info gauge of the Gateway API Inference Extension's "
            "model-server protocol (vLLM: vllm:lora_requests_info; a task's soft prompt plays the LoRA adapter's "
            "part). max_lora: most distinct tasks in one batch (= --max-num-seqs). Value: last update, unix seconds.",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r,
        )
        self.prompt_kv_cached = Gauge(
            "softprompt_prompt_kv_cached", "Soft prompts whose virtual-token KV is cached.", registry=r
        )
        self.prompt_kv_tail_bytes = Gauge(
            "softprompt_prompt_kv_tail_bytes", "Bytes of cached prompts' KV tails, kept outside the KV pool.",
            registry=r,
        )
        self.prompt_kv_bytes = Gauge(
            "softprompt_prompt_kv_bytes", "Bytes of cached prompt KV (in use or kept under the budget).", registry=r
        )
        self.prompts_loaded = Gauge("softprompt_prompts_loaded", "Soft prompts servable now.", registry=r)
        self.prompt_load_errors = Counter(
            "softprompt_prompt_load_errors", "Prompt files or uploads refused, by reason.", ["reason"],
            registry=r,
        )
        self.prompt_loads = Counter(
            "softprompt_prompt_loads", "Prompt versions loaded, by action (created/replaced).", ["action"],
            registry=r,
        )
        self.engine_alive = Gauge("softprompt_engine_alive", "1 while the engine loop runs.", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
