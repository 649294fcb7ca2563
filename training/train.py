"""Train a soft prompt with PEFT on the frozen base model, save it as a PEFT adapter directory the server loads
unchanged, and optionally upload it through the admin API.

The base model is loaded by :func:`server.model_loader.load_model`, the server's own loader, so the prompt is
trained on exactly the weights it will be served with. The prompt is a PEFT ``PromptTuningConfig`` (a table of
``num_virtual_tokens x hidden_size`` parameters), ``PromptEncoderConfig`` (p-tuning: an MLP encoder whose
*output* PEFT saves) or ``PrefixTuningConfig`` (a key/value prefix per layer, optionally through a projection MLP
whose output PEFT saves); ``task_type`` is ``CAUSAL_LM``; see :mod:`training.peft_setup`. Only the prompt (or its
encoder) trains: anything else with ``requires_grad`` raises :class:`TrainingError` before the first step.

Data and template: see :mod:`training.data`. The loop is plain: batches padded on the right with attention masks,
the loss is the mean token cross-entropy over the output tokens, as ``PeftModel(input_ids, attention_mask,
labels).loss`` computes it (PEFT prepends the virtual tokens to ids, mask and labels), but with the virtual tokens
run once per batch as a KV prefix (prefix tuning: the prefix *is* the KV) and the LM head only where an output token
is predicted (:func:`output_loss`), AdamW on the prompt parameters, gradient-norm clipping, linear warm-up then
linear decay of the learning rate to 10%. Never PEFT ``generate`` (broken with transformers
5.24; design notes, section 2).

Determinism: ``torch.manual_seed(seed)`` before the prompt is created, and the data order comes from a
``torch.Generator`` seeded with ``seed`` (a fresh permutation per epoch), so the same seed, data, model and device
give the same adapter tensor.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.model_loader import LoadedModel
from training.adapter import save_adapter
from training.data import DataError, Encoded, collate, encode_rows, end_of_turn_id, eos_id, read_rows
from training.peft_setup import (  # noqa: F401 - re-exported: the training API lives here
    DEFAULT_LR,
    METHODS,
    PREFIX_PROJECTION_LR,
    TrainingError,
    build_peft_model,
    check_only_prompt_trains,
    default_lr,
    is_prefix_tuning,
    saved_width,
)


@dataclass
class TrainConfig:
    """Options of one training run.

    Attributes:
        task: task name (used for the upload and the metadata).
        data: JSONL training file (see :mod:`training.data`).
        out: output directory of the PEFT adapter (created; files in it are overwritten).
        method: ``"prompt_tuning"``, ``"p_tuning"`` (MLP encoder) or ``"prefix_tuning"`` (KV prefix per layer).
        num_virtual_tokens: prompt length in virtual tokens.
        init: ``"text:<words>"`` (PEFT TEXT: embeddings of the text's tokens, repeated or cut to length),
            ``"random"`` (PEFT RANDOM: ``nn.Embedding`` default, N(0, 1)) or ``"vocab"`` (PEFT SAMPLE_VOCAB:
            embeddings of random vocabulary tokens); None = ``"vocab"``. Prompt tuning only: p-tuning's encoder
            starts random and ignores it; prefix tuning refuses any value (PEFT's random init).
        steps: optimizer steps; or ``epochs`` (passes over the data, may be fractional): exactly one is used;
            neither means 100 steps.
        lr: AdamW learning rate; None = the method's default (:func:`training.peft_setup.default_lr`).
        batch_size: rows per step.
        seed: seeds the prompt's initialisation and the data order.
        chat_template: train on the chat template (see :mod:`training.data`).
        warmup_steps: linear warm-up steps; None = 10% of the steps, at most 20.
        max_grad_norm: gradient clipping (L2 norm); 0 disables it.
        encoder_hidden_size: MLP width of p-tuning or of prefix tuning's projection; None = the model's hidden
            size.
        prefix_projection: prefix tuning through PEFT's two-layer MLP (``prefix_projection=True``); the saved
            tensor is the MLP's output, shaped as without it.
        progress: show a tqdm bar.
    """

    task: str
    data: Path
    out: Path
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    chat_template: bool = False
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    """What a run did. ``losses``: the loss of every step (mean cross-entropy per output token, nats).
    ``trainable_params``: parameters that trained (the prompt table, p-tuning's embedding + MLP, or the prefix
    and its projection MLP);
    ``saved_params``: numbers in the saved ``prompt_embeddings`` tensor; ``wall_s``: seconds of the loop;
    ``peft_model``: the trained PEFT model (wrapping the caller's base model)."""

    out: Path
    steps: int
    losses: list[float]
    trainable_params: int
    total_params: int
    saved_params: int
    wall_s: float
    tokens: int
    meta: dict = field(default_factory=dict)
    peft_model: object = field(default=None, repr=False)


def batch_order(num_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices of every step: successive permutations from a ``torch.Generator`` seeded with ``seed``, cut
    into batches of ``batch_size`` (a batch may span two epochs). Returns ``steps`` lists."""
    g = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    need = steps * batch_size
    while len(stream) < need:
        stream.extend(torch.randperm(num_rows, generator=g).tolist())
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _num_steps(cfg: TrainConfig, num_rows: int) -> int:
    if cfg.steps is not None and cfg.epochs is not None:
        raise TrainingError("give --steps or --epochs, not both")
    if cfg.epochs is not None:
        if cfg.epochs <= 0:
            raise TrainingError(f"--epochs must be > 0; got {cfg.epochs}")
        return max(1, math.ceil(cfg.epochs * num_rows / cfg.batch_size))
    steps = 100 if cfg.steps is None else cfg.steps
    if steps < 1:
        raise TrainingError(f"--steps must be >= 1; got {steps}")
    return steps


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(steps - warmup, 1)
        return 1.0 - 0.9 * min(step - warmup, span) / span

    return f


def prepare_data(loaded: LoadedModel, cfg: TrainConfig) -> list[Encoded]:
    """Read, validate and encode ``cfg.data``.

    Raises:
        training.data.DataError: a bad file (see :func:`training.data.encode_rows`), or, for prefix tuning, rows
            whose input encodes to no token: a prefix's virtual tokens have no input position, so the server refuses
            such inputs (422 ``empty_input``) and the first output token could not be learned.
    """
    rows = read_rows(cfg.data)
    tok = loaded.tokenizer
    end = end_of_turn_id(tok, loaded.eos_token_ids) if cfg.chat_template else eos_id(tok, loaded.eos_token_ids)
    encoded = encode_rows(cfg.data, rows, tok, end_id=end, num_virtual_tokens=cfg.num_virtual_tokens,
                          max_context=loaded.max_context, chat_template=cfg.chat_template)
    if cfg.method == "prefix_tuning":
        empty = [(row.line, "empty input: prefix tuning needs at least one input token (the server answers an "
                  "empty input to a prefix-tuned task with 422 empty_input)")
                 for row, e in zip(rows, encoded, strict=True) if e.num_output == len(e.input_ids)]
        if empty:
            raise DataError(cfg.data, empty[:20], total=len(empty))
    return encoded


def train(loaded: LoadedModel, cfg: TrainConfig, log=print) -> TrainResult:
    """Train a soft prompt on ``loaded`` (frozen) and save it to ``cfg.out``.

    PEFT wraps ``loaded.model`` for the run without changing its weights (prompt learning injects no layers), so
    the same ``loaded`` can serve afterwards.

    Raises:
        training.data.DataError: a bad data file (line numbers in the message).
        TrainingError: bad options or a non-prompt trainable parameter.
    """
    from tqdm.auto import tqdm

    if cfg.batch_size < 1 or cfg.num_virtual_tokens < 1:
        raise TrainingError("--batch-size and --num-virtual-tokens must be >= 1")
    encoded = prepare_data(loaded, cfg)
    steps = _num_steps(cfg, len(encoded))
    lr = default_lr(cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(20, steps // 10)
    order = batch_order(len(encoded), cfg.batch_size, steps, cfg.seed)
    peft_model, trainable, total = build_peft_model(loaded, cfg)
    log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    pad = loaded.tokenizer.pad_token_id
    pad = eos_id(loaded.tokenizer, loaded.eos_token_ids) if pad is None else int(pad)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    nv = cfg.num_virtual_tokens
    peft_model.eval()  # the frozen base model stays in eval mode; only the prompt encoder trains
    peft_model.prompt_encoder.train()
    losses: list[float] = []
    tokens = 0
    bar = tqdm(total=steps, disable=not cfg.progress, unit="step", desc=f"train {cfg.task}")
    t0 = time.perf_counter()
    try:
        for idx in order:
            batch = {k: v.to(loaded.device) for k, v in collate([encoded[i] for i in idx], pad).items()}
            loss = output_loss(peft_model, batch, nv)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum()) + nv * len(idx)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    saved = nv * saved_width(peft_model)
    pcfg = peft_model.active_peft_config
    meta = dict(
        task=cfg.task, method=cfg.method, num_virtual_tokens=nv,
        init=(cfg.init or "vocab") if cfg.method == "prompt_tuning" else None,
        prefix_projection=cfg.prefix_projection if cfg.method == "prefix_tuning" else None,
        encoder_hidden_size=getattr(pcfg, "encoder_hidden_size", None) if cfg.method == "p_tuning"
        or cfg.prefix_projection else None,
        steps=steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=warmup, seed=cfg.seed,
        template="chat" if cfg.chat_template else "plain", data=str(cfg.data), data_sha256=_sha256(cfg.data),
        rows=len(encoded), model_id=loaded.model_id, device=str(loaded.device), torch_threads=torch.get_num_threads(),
        trainable_params=trainable, total_params=total, saved_params=saved, wall_s=round(wall, 1),
        seconds_per_step=round(wall / steps, 3), tokens=tokens, first_loss=losses[0],
        final_loss=sum(losses[-10:]) / len(losses[-10:]),
    )
    save_adapter(peft_model, cfg.out, loaded, meta)
    return TrainResult(cfg.out, steps, losses, trainable, total, saved, wall, tokens, meta, peft_model)


def output_loss(peft_model, batch: dict[str, torch.Tensor], num_virtual_tokens: int) -> torch.Tensor:
    """Mean cross-entropy (nats per token) over the output tokens of a right-padded batch.

    Equal to ``peft_model(**batch).loss`` (PEFT prepends the virtual tokens with ``-100`` labels; transformers
    shifts labels by one and averages over the labelled tokens; ``test_train_loop.py`` checks that the two agree),
    computed the way the server computes a prompt (design notes, section 2):

    1. the virtual tokens run once, alone (batch 1, positions ``0..n-1``), into a KV cache that keeps its graph;
    2. the cache is repeated to the batch and the text runs on it at positions ``n, n+1, ...``, with the LM head
       only at positions that predict an output token of some row (``logits_to_keep`` as an index tensor).

    Every row's virtual tokens see only each other (causal attention), so step 1 is exact; it saves ``B - 1``
    copies of the virtual tokens per step, and step 2 saves the LM head (about a fifth of SmolLM2's compute) at
    positions without a label. An output token right after an empty input is predicted by the last virtual
    token, from step 1's logits.

    Prefix tuning has no step 1: PEFT's ``get_prompt(B)`` is already the per-layer KV cache (a ``DynamicCache``
    of ``[B, kv_heads, n, head_dim]`` keys and values that carries the gradient), exactly what PEFT's own forward
    passes as ``past_key_values``. The text then runs at positions ``n, n+1, ...`` with the mask extended over the
    ``n`` virtual tokens, as in PEFT. No position predicts an output token after an empty input (there are no
    virtual-token logits), so that label does not count, as in ``peft_model(**batch).loss``.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]`` (see :func:`training.data.collate`).
    """
    base = peft_model.get_base_model()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b = ids.shape[0]
    if is_prefix_tuning(peft_model):
        pre = None
        cache = peft_model.get_prompt(batch_size=b)
    else:
        prompts = peft_model.get_prompt(batch_size=1)  # [1, n, H], carries the prompt's gradient
        emb_dtype = base.get_input_embeddings().weight.dtype
        pre = base(inputs_embeds=prompts.to(emb_dtype), use_cache=True, logits_to_keep=1)
        cache = pre.cache if getattr(pre, "cache", None) is not None else pre.past_key_values
        for layer in cache.layers:
            layer.batch_repeat_interleave(b)
    target = labels[:, 1:]  # text position j predicts token j + 1
    keep = (target != -100).any(dim=0).nonzero().squeeze(1)  # [K] text positions, shared by the batch
    full_mask = torch.cat([mask.new_ones((b, num_virtual_tokens)), mask], dim=1)  # [B, n + L]
    out = base(input_ids=ids, attention_mask=full_mask, use_cache=True, logits_to_keep=keep,
               **{_cache_kwarg(base): cache})
    logits = out.logits.float()  # [B, K, vocab]
    tgt = target[:, keep]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    count = (tgt != -100).sum()
    first = labels[:, 0]  # labelled only after an empty input: predicted by the last virtual token
    if pre is not None and bool((first != -100).any()):
        last = pre.logits[:, -1].float().expand(b, -1)  # [B, vocab]
        total = total + torch.nn.functional.cross_entropy(last, first, ignore_index=-100, reduction="sum")
        count = count + (first != -100).sum()
    return total / count


def _cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 on, ``past_key_values``
    before (a wrong name would be swallowed by ``**kwargs`` and the prefix silently dropped)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def result_summary(res: TrainResult) -> str:
    """One line per fact, for the CLI."""
    m = res.meta
    nv = m["num_virtual_tokens"]
    return (f"saved {res.out} ({nv} virtual tokens x {res.saved_params // nv} = {res.saved_params:,} numbers)\n"
            f"steps {res.steps}, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f} (mean of last 10), "
            f"{res.wall_s:.1f} s, {res.tokens / max(res.wall_s, 1e-9):.0f} tokens/s\n"
            f"trainable params {res.trainable_params:,} of {res.total_params:,}")


