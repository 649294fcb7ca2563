"""The device check on the CPU: ``python -m bench.gpu_check --tiny`` runs every section on a tiny model in seconds,
plus its pieces: the roofline, weight bytes, the pytest summary parser, the models and the stand-in tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check
from bench.gpu_legs import engine_leg, make_requests, roofline
from bench.gpu_model import (
    LLAMA_1B,
    TINY,
    IdTokenizer,
    build_model,
    loaded_model,
    random_ids,
    random_prompts,
    weight_bytes_per_decode_step,
)
from server.engine import Engine, EngineConfig


def test_tiny_run_writes_every_section(tmp_path):
    assert gpu_check.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    s = data["sections"]
    assert data["errors"] == {}
    assert "tests" not in s  # no CUDA here
    for c, n in zip([1, 4, 8], [2, 4, 8], strict=True):
        leg = s[f"engine/flex/c{c}"]
        assert leg["requests"] == n and leg["failed_requests"] == 0 and leg["completion_tokens"] == 6 * n
        assert leg["tokens_per_s"] > 0 and 0 < leg["ttft_p50_s"] <= leg["latency_p50_s"]
    assert "engine/cpu/c1" not in s  # the fallback backend runs only when the first one fails
    assert s["engine/flex/c1"]["roofline"]["weight_bytes"] == weight_bytes_per_decode_step(build_model(TINY))
    assert {s[f"engine/flex/tasks{n}"]["tasks"] for n in (1, 16)} == {1, 16}
    for peer in ("hf-padded-batch", "hf-generate-batch"):
        assert s[peer]["completion_tokens"] == 6 * 8, peer
    assert set(s["summary"]) >= {"tokens_per_s_top", "vs_padded_batch", "roofline_fraction_batch1",
                                 "many_vs_one_task"}
    assert s["summary"]["backend"] == "flex"


def test_a_failing_backend_falls_back_to_the_next(tmp_path, monkeypatch):
    def broken(name, args):
        if name == "flex":
            raise RuntimeError("no kernel")
        return gpu_check.make_backend.__wrapped__(name, args)

    broken.__wrapped__ = gpu_check.make_backend
    monkeypatch.setattr(gpu_check, "make_backend", broken)
    code = gpu_check.main(["--tiny", "--out", str(tmp_path), "--skip-hf", "--concurrency", "2",
                           "--requests", "2", "--task-levels", "1"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and "no kernel" in data["errors"]["engine/flex"]
    assert data["sections"]["engine/cpu/c2"]["completion_tokens"] == 12
    assert data["sections"]["summary"]["backend"] == "cpu"


def test_requests_must_match_concurrency():
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--concurrency", "1,2", "--requests", "3"])


def test_roofline_and_llama_1b_weight_bytes():
    with torch.device("meta"):
        model = build_model(LLAMA_1B, "meta", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    h, inter, layers, vocab, kv = 2048, 8192, 16, 128256, 8 * 64
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    assert params == vocab * h + layers * per_layer + h == 1_235_814_400  # Llama-3.2-1B, embedding tied to the head
    wb = weight_bytes_per_decode_step(model)
    assert wb == 2 * params
    r = roofline(wb, 4.8e12, 2 * wb / 4.8e12)
    assert r["fraction"] == pytest.approx(0.5) and r["floor_step_s"] == pytest.approx(wb / 4.8e12)
    assert roofline(wb, 4.8e12, None)["fraction"] is None


def test_untied_input_embedding_is_not_counted():
    model = build_model({**TINY, "tie_word_embeddings": False})
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes_per_decode_step(model) == total - emb.numel() * emb.element_size()


def test_pytest_summary_parser():
    text = "EQUIV backend=flex: 12/12 rows\n.....\n3 passed, 1 failed, 2 skipped in 9.1s\n"
    assert gpu_check.parse_pytest_summary(text) == {
        "counts": {"passed": 3, "failed": 1, "skipped": 2}, "equivalence": ["EQUIV backend=flex: 12/12 rows"]}


def test_models_prompts_and_tokenizer():
    model = build_model(TINY, seed=1)
    assert model.generation_config.eos_token_id is None and model.config.eos_token_id is None
    loaded = loaded_model(model, "tiny")
    assert loaded.eos_token_ids == () and loaded.max_context == TINY["max_position_embeddings"]
    assert IdTokenizer(9).decode([1, 22]) == " t1 t22" and len(loaded.tokenizer) == TINY["vocab_size"]
    prompts = random_prompts(model, 3, 5, seed=2)
    assert [p.task for p in prompts] == ["task-00000", "task-00001", "task-00002"]
    assert prompts[0].embeddings.shape == (5, TINY["hidden_size"]) and prompts[0].embeddings.device.type == "cpu"
    assert random_ids(2, 4, 10, 0) == random_ids(2, 4, 10, 0) and len(random_ids(2, 4, 10, 0)[1]) == 4


def test_engine_leg_counts_steps_and_keeps_concurrency():
    model = build_model(TINY, seed=1)
    loaded = loaded_model(model, "tiny")
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=2**20, prompt_kv_cache_bytes=2**20, max_num_seqs=8))
    prompts = random_prompts(model, 2, 3)
    reqs = make_requests(prompts, [0, 1, -1, 0, 1], random_ids(5, 6, TINY["vocab_size"], 1), 4)
    leg = engine_leg(engine, reqs, 2, "t")
    assert leg["requests"] == 5 and leg["completion_tokens"] == 20 and leg["concurrency"] == 2
    assert leg["steps"]["decode"] + leg["steps"]["mixed"] + leg["steps"]["prefill"] >= 4 * 3 // 2
    assert all(r.status.finish_reason == "length" for r in reqs)


def test_run_tests_records_the_summary_and_the_output(tmp_path, monkeypatch):
    import subprocess
    from types import SimpleNamespace

    seen = {}

    def fake_run(cmd, **kw):
        seen.update(cmd=cmd, **kw)
        return SimpleNamespace(stdout="EQUIV backend=flex: 9/12\n2 passed, 1 failed in 3.0s\n", stderr="",
                               returncode=1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    report = gpu_check.Report(str(tmp_path))
    gpu_check.run_tests(report, gpu_check.resolve(gpu_check.build_parser().parse_args(["--out", str(tmp_path)])))
    assert seen["cmd"][-1] == "tests/server/test_cuda.py" and "cuda" in seen["cmd"] and seen["timeout"] == 150.0
    assert (seen["cwd"] / "tests/server/test_cuda.py").exists()
    t = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["tests"]
    assert t["exit"] == 1 and t["counts"] == {"passed": 2, "failed": 1}
    assert t["equivalence"] == ["EQUIV backend=flex: 9/12"]
    assert "2 passed" in (tmp_path / "pytest_cuda.txt").read_text()
