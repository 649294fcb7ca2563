"""Operations: /health, /ready, /metrics (parsed), and failing fast when the engine loop dies."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import Spec, families, make_engine, new_request, rand_tensor, raw_bytes, samples, value

from server.app import create_app


def gen(client, task, text="hello there", n=4, **extra):
    url = f"/v1/tasks/{task}/generate" if task else "/v1/generate"
    return client.post(url, json={"inputs": text, "parameters": {"max_new_tokens": n, **extra}})


def test_health_and_ready(make_client, prompts_dir):
    (prompts_dir / "qa.safetensors").write_bytes(raw_bytes(rand_tensor(3)))
    client = make_client()
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "draining": False, "model": "tiny-llama", "prompts": 1}


def test_ready_is_503_before_startup_and_after_shutdown(tiny_loaded, make_client):
    client = make_client()
    settings = client.app.state.sp.settings
    app = create_app(settings, loaded=tiny_loaded)
    bare = TestClient(app)  # no context manager: the lifespan (start-up) never runs
    r = bare.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert bare.get("/health").json()["status"] == "starting"
    r = bare.post("/v1/generate", json={"inputs": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_metrics_by_task_and_status(make_client, prompts_dir):
    (prompts_dir / "qa.safetensors").write_bytes(raw_bytes(rand_tensor(4, seed=1)))
    (prompts_dir / "zz.safetensors").write_bytes(raw_bytes(rand_tensor(2, seed=2)))
    (prompts_dir / "bad.safetensors").write_bytes(b"not a prompt")
    client = make_client(watch=False)
    results = []

    def go(task, n):
        results.append(gen(client, task, n=n))

    jobs = [("qa", 3), ("qa", 5), ("zz", 2), (None, 4), (None, 6), ("qa", 1)]
    threads = [threading.Thread(target=go, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200] * 6
    assert gen(client, None, text="").status_code == 422  # empty base input
    assert gen(client, "qa", n=300).status_code == 400  # over the context
    completions = sum(r.json()["usage"]["completion_tokens"] for r in results)
    assert completions == 3 + 5 + 2 + 4 + 6 + 1

    fams = families(client)
    assert value(fams, "softprompt_requests", "_total", task="qa", status="200") == 3
    assert value(fams, "softprompt_requests", "_total", task="zz", status="200") == 1
    assert value(fams, "softprompt_requests", "_total", task="_base", status="200") == 2
    assert value(fams, "softprompt_requests", "_total", task="_base", status="422") == 1
    assert value(fams, "softprompt_requests", "_total", task="qa", status="400") == 1
    # generated tokens: per task, and in all equal to the completion tokens the responses report
    assert value(fams, "softprompt_generated_tokens", "_total") == completions
    assert value(fams, "softprompt_generated_tokens", "_total", task="qa") == 3 + 5 + 1
    assert value(fams, "softprompt_generated_tokens", "_total", task="_base") == 4 + 6
    # latency and TTFT histograms: one observation per successful request
    assert value(fams, "softprompt_request_latency_seconds", "_count", task="qa") == 3
    assert value(fams, "softprompt_request_latency_seconds", "_count", task="_base") == 2
    assert value(fams, "softprompt_request_latency_seconds", "_sum") > 0
    assert value(fams, "softprompt_time_to_first_token_seconds", "_count") == 6
    assert value(fams, "softprompt_time_to_first_token_seconds", "_count", task="zz") == 1
    inf = samples(fams, "softprompt_request_latency_seconds", "_bucket", task="qa", le="+Inf")
    assert [s.value for s in inf] == [3]
    # text prompt tokens prefilled
    tok = client.app.state.sp.loaded.tokenizer
    assert value(fams, "softprompt_prompt_tokens", "_total") == 6 * len(tok("hello there")["input_ids"])
    # gauges: nothing running or waiting once all answered
    assert value(fams, "softprompt_running_requests") == 0
    assert value(fams, "softprompt_waiting_requests") == 0
    assert value(fams, "softprompt_kv_cache_used_blocks") == 0
    assert value(fams, "softprompt_engine_alive") == 1
    # batch histograms: every step observed; a step never has more rows than requests, nor more tasks than 3
    steps = value(fams, "softprompt_batch_size", "_count")
    assert steps >= 6 and steps == value(fams, "softprompt_batch_distinct_tasks", "_count")
    assert steps == client.app.state.sp.engine.steps
    assert value(fams, "softprompt_batch_size", "_bucket", le="8.0") == steps
    assert value(fams, "softprompt_batch_distinct_tasks", "_bucket", le="4.0") == steps
    assert value(fams, "softprompt_batch_size", "_sum") >= completions
    # prompts: two loaded, one refused at the scan
    assert value(fams, "softprompt_prompts_loaded") == 2
    assert value(fams, "softprompt_prompt_load_errors", "_total") == 1


def test_running_gauge_returns_to_zero(client):
    fams = families(client)
    assert value(fams, "softprompt_running_requests") == 0
    done = []
    t = threading.Thread(target=lambda: done.append(gen(client, None, n=60)))
    t.start()
    t.join(60)
    assert done[0].status_code == 200
    end = time.monotonic() + 2.0
    while value(families(client), "softprompt_running_requests") != 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert value(families(client), "softprompt_running_requests") == 0


def test_engine_death_fails_fast(client):
    engine = client.app.state.sp.engine
    assert gen(client, None).status_code == 200

    def broken(plan):
        raise RuntimeError("simulated device failure")

    engine.runner.execute = broken
    result: dict = {}

    def call():
        result["r"] = gen(client, None, n=5)

    t = threading.Thread(target=call)
    t.start()
    t.join(15)
    assert not t.is_alive(), "request hung after the engine died"
    r = result["r"]
    assert 500 <= r.status_code < 600
    err = r.json()["error"]
    assert err["type"] == "server_error" and "simulated device failure" in err["message"]
    h = client.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "dead" and "simulated" in h.json()["error"]
    assert client.get("/ready").status_code == 503
    t0 = time.monotonic()
    r = gen(client, None)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert time.monotonic() - t0 < 10  # a deadline against hanging, not a speed check
    assert value(families(client), "softprompt_engine_alive") == 0


def test_gauges_drop_to_zero_after_an_abort(tiny_loaded):
    """An aborted request leaves the running set and frees its KV at once; the running and KV gauges must show
    that within about 2 s, even when no further step runs."""
    engine = make_engine(tiny_loaded)
    engine.start()
    try:
        req = new_request(Spec([5, 6, 7], None, 200))
        stream = engine.submit(req)
        it = stream.iter_sync(timeout=30)
        assert next(it).new_token_ids  # running and decoding
        engine.abort(req.request_id)
        assert [o.finish_reason for o in it][-1] == "abort"
        assert len(engine.scheduler.running) == 0 and engine.core.pool.num_used == 0

        def gauges():
            fams = {f.name: f for f in text_string_to_metric_families(engine.metrics.render().decode())}
            return value(fams, "softprompt_running_requests"), value(fams, "softprompt_kv_cache_used_blocks")

        end = time.monotonic() + 2.0
        while gauges() != (0, 0) and time.monotonic() < end:
            time.sleep(0.05)
        assert gauges() == (0, 0)
    finally:
        engine.stop()


def test_inference_extension_gauges_track_tasks_and_kv_use(tiny_loaded):
    """The Gateway API Inference Extension reads the KV utilization and the adapter-info gauge (tasks as labels)."""
    from srv_helpers import make_prompt, queue_all, run_sync

    engine = make_engine(tiny_loaded, max_num_seqs=2, max_num_batched_tokens=64)
    alpha, beta, gamma = (make_prompt(t, rand_tensor(n, seed=i)) for i, (t, n) in
                          enumerate([("alpha", 20), ("beta", 3), ("gamma", 5)]))

    def read():
        fams = {f.name: f for f in text_string_to_metric_families(engine.metrics.render().decode())}
        info = [(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"], s.labels["max_lora"])
                for s in samples(fams, "softprompt_task_requests_info")]
        return info, value(fams, "softprompt_kv_cache_usage_perc")

    queue_all(engine, [Spec([5, 6, 7], alpha, 6), Spec([5, 6], None, 6), Spec([7, 8], beta, 6),
                       Spec([9], gamma, 6), Spec([4], beta, 6)])
    engine.step()  # alpha and the base request run (2 sequences); beta, gamma, beta wait
    info, usage = read()
    assert info == [("alpha", "beta,gamma", "2")]
    pool, cache = engine.core.pool, engine.core.prompt_cache
    assert usage == (pool.num_used - cache.idle_blocks) / pool.num_blocks and usage > 0
    run_sync(engine, [])
    info, usage = read()
    assert info == [("", "", "2")]  # one child only: the old label sets were removed
    assert usage == 0.0 and pool.num_used > 0  # alpha's prompt blocks stay cached, idle and evictable
