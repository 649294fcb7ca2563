"""Helpers for the server tests: the tiny model, soft prompts, greedy references, and a synchronous engine driver.

The references never use ``generate`` (PEFT 0.21's is wrong with transformers 5.24, design notes section 2): they
run the whole sequence through a forward pass at every step and take the argmax of the last logits.
"""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

from prompt_store.formats import ParsedPrompt
from prompt_store.registry import PromptRegistry, SoftPrompt
from server.config import Settings
from server.engine import Engine, EngineConfig
from server.model_loader import LoadedModel
from server.request import Request, SamplingParams

TINY_HIDDEN = 64
TINY_CONTEXT = 256
EOS_ID = 2


# ----------------------------------------------------------------------------------------------------- models
def build_tiny_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """The tiny random Llama of the tests: 2 layers, hidden 64, 4 heads (2 KV heads), context 256, fp32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.requires_grad_(False)
    return model


def wrap_loaded(model: torch.nn.Module, tokenizer, eos: Sequence[int] = (EOS_ID,)) -> LoadedModel:
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id="tiny-llama", device=torch.device("cpu"),
        dtype=torch.float32, eos_token_ids=tuple(eos),
        max_context=int(model.config.max_position_embeddings),
    )


# ----------------------------------------------------------------------------------------------------- prompts
def make_prompt(task: str, tensor: torch.Tensor, peft_type: str = "RAW") -> SoftPrompt:
    """A registered SoftPrompt holding ``tensor`` (``[n, hidden]``), version 1."""
    prompt, action = PromptRegistry().put(task, ParsedPrompt(tensor, peft_type), "test")
    assert action == "created"
    return prompt


def rand_tensor(n: int, scale: float = 1.0, seed: int = 0, hidden: int = TINY_HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g) * scale


def raw_bytes(tensor: torch.Tensor, key: str = "prompt") -> bytes:
    """A one-tensor safetensors file."""
    return safetensors.torch.save({key: tensor.contiguous()})


def zip_dir(directory: Path, root: str = "") -> bytes:
    """A zip of every file in ``directory`` (optionally under a top-level folder ``root``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                zf.write(p, f"{root}/{p.name}" if root else p.name)
    return buf.getvalue()


def tar_gz_dir(directory: Path, root: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                tf.add(p, arcname=f"{root}/{p.name}" if root else p.name)
    return buf.getvalue()


def zip_members(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def greedy_reference(
    model: torch.nn.Module,
    ids: Sequence[int],
    prompt: torch.Tensor | None = None,
    max_new_tokens: int = 8,
    eos: Sequence[int] = (EOS_ID,),
) -> tuple[list[int], str]:
    """Greedy decoding by full forward passes: ``inputs_embeds = cat(P, embed(ids + generated))``.

    Returns ``(tokens, finish_reason)`` with finish_reason "stop" (an EOS was emitted; it is the last token) or
    "length".
    """
    emb = model.get_input_embeddings()
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = emb(torch.tensor([list(ids) + out], dtype=torch.long))  # [1, L, H]
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype)[None], x], dim=1)
        logits = model(inputs_embeds=x, logits_to_keep=1).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            return out, "stop"
    return out, "length"


@torch.no_grad()
def save_peft_adapters(model: torch.nn.Module, configs: dict, root: Path, seed: int,
                       perturb: float = 0.0) -> dict[str, tuple[torch.nn.Module, Path]]:
    """PEFT 0.21 prompt-learning adapters on deep copies of ``model``, saved with ``save_pretrained`` under
    ``root/<name>``: ``{name: (peft_model, dir)}``. Each is built after ``torch.manual_seed(seed + i)``; with
    ``perturb`` > 0 its prompt encoder's parameters get Gaussian noise of that scale, so the prompt is far from PEFT's
    init (which for prefix tuning is small)."""
    import copy
    import warnings

    from peft import get_peft_model

    out = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(seed + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation noise inside peft
            pm = get_peft_model(copy.deepcopy(model), cfg).eval()
        if perturb:
            with torch.no_grad():
                for p in pm.prompt_encoder.parameters():
                    p.add_(torch.randn_like(p) * perturb)
        pm.save_pretrained(root / name)
        out[name] = (pm, root / name)
    return out


def peft_greedy_reference(
    peft_model, ids: Sequence[int], max_new_tokens: int = 8, eos: Sequence[int] = (EOS_ID,)
) -> tuple[list[int], str]:
    """Greedy decoding by full forward passes through a PEFT prompt-learning model (PEFT prepends the prompt)."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        inp = torch.tensor([list(ids) + out], dtype=torch.long)
        logits = peft_model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            return out, "stop"
    return out, "length"


# ----------------------------------------------------------------------------------------------------- engine
def make_engine(loaded: LoadedModel, **cfg) -> Engine:
    """An engine whose loop is NOT started: tests drive it with :func:`run_sync` step by step."""
    base = dict(kv_cache_bytes=16 * 1024**2, prompt_kv_cache_bytes=8 * 1024**2)
    base.update(cfg)
    return Engine(loaded, EngineConfig(**base))


@dataclass
class Spec:
    """One request for :func:`run_sync`."""

    ids: list[int]
    prompt: SoftPrompt | None = None
    max_new_tokens: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def params(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)


def new_request(spec: Spec) -> Request:
    return Request(uuid.uuid4().hex, list(spec.ids), spec.params(), spec.prompt,
                   spec.prompt.task if spec.prompt else "")


def queue_all(engine: Engine, specs: Sequence[Spec]) -> list[Request]:
    """Check and queue every spec (in order) into the engine's scheduler without stepping; the queued requests."""
    reqs = []
    for spec in specs:
        req = new_request(spec)
        engine.check(req)
        req.eos_token_ids = engine.eos_token_ids
        engine.scheduler.add(req)
        reqs.append(req)
    return reqs


def run_sync(engine: Engine, specs: Sequence[Spec], max_steps: int = 10_000) -> list[Request]:
    """Queue every spec (in order) into the engine's scheduler, then step until all are done.

    All requests are queued before the first step, so they share steps as far as the limits allow.
    """
    reqs = queue_all(engine, specs)
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return reqs


def run_alone(engine: Engine, spec: Spec) -> tuple[list[int], str]:
    (req,) = run_sync(engine, [spec])
    return list(req.output_token_ids), req.status.finish_reason


def submit_and_wait(engine: Engine, specs: Sequence[Spec], timeout: float = 120.0):
    """Submit every spec to a *started* engine (all before waiting), then wait for each.

    Returns ``[(tokens, last RequestOutput), ...]`` in spec order.
    """
    streams = [engine.submit(new_request(s)) for s in specs]
    results = []
    for st in streams:
        toks: list[int] = []
        last = None
        for out in st.iter_sync(timeout=timeout):
            toks.extend(out.new_token_ids)
            last = out
        results.append((toks, last))
    return results


def decode_text(tokenizer, tokens: Sequence[int], eos: Sequence[int] = (EOS_ID,)) -> str:
    """The text a response must carry for ``tokens``: end tokens left out, special tokens skipped, no clean-up."""
    return tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


def make_settings(prompts: Path | None, **overrides) -> Settings:
    """Settings for a test app: every field that matters is given explicitly, so SOFTPROMPT_* variables in the
    environment never leak in; ``overrides`` win."""
    kw: dict = dict(
        prompts=prompts,
        kv_cache_bytes=64 * 1024**2,
        prompt_kv_cache_bytes=16 * 1024**2,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_virtual_tokens=128,
        max_prompt_bytes=16 * 1024 * 1024,
        default_max_new_tokens=64,
        max_waiting=1024,
        torch_threads=None,
        device="cpu",
        dtype="float32",
    )
    kw.update(overrides)
    return Settings(**kw)


# ------------------------------------------------------------------------------------------------ HTTP checks
def assert_error(r, status: int, *, code: str | None = None, param: str | None = None, contains=()) -> dict:
    """``r`` is ``status`` with the one error shape (and the given code, param and message parts); its error."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    for s in contains:
        assert s in err["message"], (s, err["message"])
    return err


def families(client) -> dict:
    """``GET /metrics`` of a test client, parsed: metric family name -> family."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(fams, name: str, suffix: str = "", **labels) -> list:
    """Samples of family ``name`` named ``name + suffix`` whose labels include ``labels``."""
    return [s for s in fams[name].samples
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]


def value(fams, name: str, suffix: str = "", **labels) -> float:
    """Sum of the matching samples' values (0 when none match)."""
    return sum(s.value for s in samples(fams, name, suffix, **labels))
