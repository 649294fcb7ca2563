"""The PEFT side of ``softprompt train``: which prompt-learning method, its PEFT config, the seeded wrap of the
frozen base model, and the check that only the prompt trains.

Methods (``--method``), all ``task_type=CAUSAL_LM`` and saved as one ``prompt_embeddings`` tensor:

- ``prompt_tuning``: ``PromptTuningConfig``, a ``[n, hidden]`` table prepended to the input embeddings;
- ``p_tuning``: ``PromptEncoderConfig`` (MLP encoder); PEFT saves the encoder's ``[n, hidden]`` *output*;
- ``prefix_tuning``: ``PrefixTuningConfig``, a key/value prefix for every layer. PEFT sets ``token_dim`` to
  ``num_key_value_heads * head_dim`` and ``num_attention_heads`` to ``num_key_value_heads`` (grouped-query
  attention), and saves ``[n, num_layers * 2 * token_dim]`` (SmolLM2-135M: 30 x 2 x 3 x 64 = 11,520), laid out as
  ``(n, 2 * num_layers, kv_heads, head_dim)`` with K of layer ``l`` at block ``2l`` and V at ``2l + 1``, keys
  unrotated. With ``prefix_projection`` the parameters are an ``[n, token_dim]`` embedding and a two-layer tanh MLP
  ``token_dim -> encoder_hidden_size -> num_layers * 2 * token_dim``; PEFT saves the MLP's *output*, the same
  ``[n, num_layers * 2 * token_dim]`` prefix as without projection, so the server sees no difference.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.model_loader import LoadedModel

if TYPE_CHECKING:
    from training.train import TrainConfig

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
#: Default AdamW learning rate per method; prefix tuning with ``prefix_projection`` uses
#: :data:`PREFIX_PROJECTION_LR`. Prefix tuning's values come from 40-step runs on date-format (SmolLM2-135M,
#: batch 16, one run each): without projection 3e-2 beat 1e-2 and 1e-1; with projection (an update of the MLP's
#: weights moves every prefix value at once) 3e-4 was stable on two versions of the data, 1e-3 was faster on one
#: and diverged on the other, and 3e-3 diverged.
DEFAULT_LR = {"prompt_tuning": 3e-2, "p_tuning": 3e-3, "prefix_tuning": 3e-2}
PREFIX_PROJECTION_LR = 3e-4


class TrainingError(RuntimeError):
    """Training cannot run as asked (bad option, or a parameter other than the prompt would train)."""


def default_lr(cfg: TrainConfig) -> float:
    """The learning rate of a run: ``cfg.lr`` if given, else the method's default (see :data:`DEFAULT_LR`)."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.method == "prefix_tuning" and cfg.prefix_projection:
        return PREFIX_PROJECTION_LR
    return DEFAULT_LR.get(cfg.method, 3e-2)


def check_method_options(cfg: TrainConfig) -> None:
    """Refuse option combinations that would be silently ignored.

    Raises:
        TrainingError: an unknown method; ``prefix_projection`` without ``prefix_tuning``; an explicit ``init``
            with ``prefix_tuning`` (its prefix starts from PEFT's random init: ``nn.Embedding``'s N(0, 1), through
            the MLP's default init with projection; PEFT has no text or vocabulary init of keys and values);
            ``encoder_hidden_size`` with ``prefix_tuning`` but no projection (there is no MLP then).
    """
    if cfg.method not in METHODS:
        raise TrainingError(f"--method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    if cfg.prefix_projection and cfg.method != "prefix_tuning":
        raise TrainingError(f"--prefix-projection applies to --method prefix_tuning only, not {cfg.method}")
    if cfg.method == "prefix_tuning":
        if cfg.init is not None:
            raise TrainingError(f"--init applies to prompt tuning only; prefix tuning starts from PEFT's random "
                                f"prefix: drop --init {cfg.init}")
        if cfg.encoder_hidden_size is not None and not cfg.prefix_projection:
            raise TrainingError("--encoder-hidden-size with --method prefix_tuning needs --prefix-projection "
                                "(without it there is no MLP)")


def _init_spec(init: str) -> tuple[str, str | None]:
    """``"text:..."`` -> ("TEXT", text); ``"random"`` -> ("RANDOM", None); ``"vocab"`` -> ("SAMPLE_VOCAB", None).

    Raises:
        TrainingError: any other value, or ``text:`` with no text.
    """
    if init.startswith("text:"):
        text = init[len("text:"):]
        if not text.strip():
            raise TrainingError("--init text: needs some text after 'text:'")
        return "TEXT", text
    if init in ("random", "vocab"):
        return ("RANDOM" if init == "random" else "SAMPLE_VOCAB"), None
    raise TrainingError(f"--init must be text:\"...\", random or vocab; got {init!r}")


def _tokenizer_dir(loaded: LoadedModel, keep: list) -> str:
    """A directory PEFT's TEXT initialisation can load the tokenizer from: the loaded model's directory, or the
    tokenizer's own, or (for in-memory models, as in tests) a temporary copy kept alive by ``keep``."""
    for cand in (getattr(loaded.model, "name_or_path", ""), getattr(loaded.tokenizer, "name_or_path", "")):
        if cand and Path(cand).is_dir() and any((Path(cand) / f).is_file() for f in ("tokenizer.json",
                                                                                      "tokenizer_config.json")):
            return str(cand)
    tmp = tempfile.TemporaryDirectory(prefix="softprompt-tok-")
    keep.append(tmp)
    loaded.tokenizer.save_pretrained(tmp.name)
    return tmp.name


def build_peft_model(loaded: LoadedModel, cfg: TrainConfig):
    """Wrap ``loaded.model`` in a PEFT prompt-learning model (seeded with ``cfg.seed``) and check that only the
    prompt trains.

    ``encoder_hidden_size`` (p-tuning, and prefix tuning with projection) defaults to the model's hidden size.

    Returns:
        ``(peft_model, trainable_params, total_params)``; total counts the base model and the prompt.

    Raises:
        TrainingError: unknown method or init, options that do not apply to the method
            (:func:`check_method_options`), or a non-prompt parameter requires grad.
    """
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    check_method_options(cfg)
    hidden = loaded.hidden_size
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens, token_dim=hidden,
                  num_transformer_submodules=1)
    keep: list = []
    if cfg.method == "prompt_tuning":
        kind, text = _init_spec(cfg.init if cfg.init is not None else "vocab")
        extra = {}
        if kind == "TEXT":
            extra = dict(prompt_tuning_init_text=text, tokenizer_name_or_path=_tokenizer_dir(loaded, keep))
        pcfg = PromptTuningConfig(prompt_tuning_init=kind, **extra, **common)
    elif cfg.method == "p_tuning":
        pcfg = PromptEncoderConfig(encoder_reparameterization_type="MLP",
                                   encoder_hidden_size=cfg.encoder_hidden_size or hidden, **common)
    else:  # prefix_tuning; PEFT fills num_layers and narrows token_dim / num_attention_heads to the KV heads
        pcfg = PrefixTuningConfig(prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=(cfg.encoder_hidden_size or hidden) if cfg.prefix_projection
                                  else None, **common)
    loaded.model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():  # PEFT 0.21 calls an API transformers 5 deprecated; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(loaded.model, pcfg)
    for tmp in keep:
        tmp.cleanup()
    trainable, total = check_only_prompt_trains(peft_model)
    return peft_model, trainable, total


def is_prefix_tuning(peft_model) -> bool:
    """Whether ``peft_model``'s active adapter is prefix tuning (its prompt is a KV cache, not embeddings)."""
    return str(getattr(peft_model.active_peft_config.peft_type, "value", "")) == "PREFIX_TUNING"


def saved_width(peft_model) -> int:
    """Columns of the ``prompt_embeddings`` tensor PEFT saves: ``num_layers * 2 * token_dim`` for prefix tuning
    (``token_dim`` as PEFT narrowed it to the KV heads), else ``token_dim`` (the hidden size)."""
    pcfg = peft_model.active_peft_config
    if is_prefix_tuning(peft_model):
        return int(pcfg.num_layers) * 2 * int(pcfg.token_dim)
    return int(pcfg.token_dim)


def check_only_prompt_trains(peft_model) -> tuple[int, int]:
    """Count parameters and check that every trainable one belongs to the prompt encoder: the prompt table
    (prompt tuning), the embedding + MLP (p-tuning), or the prefix embedding + optional projection MLP (prefix
    tuning), all under ``prompt_encoder.``; nothing of the base model.

    Returns:
        ``(trainable, total)`` parameter counts.

    Raises:
        TrainingError: naming the first few trainable parameters outside ``prompt_encoder``, or when nothing
            trains at all.
    """
    trainable = total = 0
    stray: list[str] = []
    for name, p in peft_model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if not name.startswith("prompt_encoder."):
                stray.append(name)
    if stray:
        raise TrainingError(f"only the soft prompt may train, but these parameters require grad too: {stray[:5]}"
                            f"{' ...' if len(stray) > 5 else ''}")
    if trainable == 0:
        raise TrainingError("no parameter requires grad: the soft prompt would not train")
    return trainable, total
