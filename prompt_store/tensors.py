"""Soft-prompt tensors: the limits they must fit, their validation, and safetensors parsing (never a pickle).

Two kinds of tensor, both ``[num_virtual_tokens, width]``:

* **embedding prompts** (prompt tuning, p-tuning, RAW files): ``width`` is the model's hidden size; the rows are
  input embeddings of the virtual tokens;
* **prefix prompts** (PEFT ``PREFIX_TUNING``, P-tuning v2): ``width = num_layers * 2 * num_key_value_heads *
  head_dim``; the rows are each virtual token's key and value at every layer (layout: ``README.md``,
  "Soft-prompt files").
"""

from __future__ import annotations

from dataclasses import dataclass

import safetensors.torch
import torch

from prompt_store.errors import PromptError

MIB = 1024 * 1024
ALLOWED_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
#: ``peft_type`` of prompts whose tensor is per-layer KV rather than input embeddings.
PREFIX_TUNING = "PREFIX_TUNING"


@dataclass(frozen=True)
class Limits:
    """What a soft prompt must fit: the served model's shapes and the size caps.

    Attributes:
        hidden_size: the model's embedding width; every embedding prompt must be ``[n, hidden_size]``.
        max_virtual_tokens: the largest ``n`` (number of virtual tokens) accepted.
        max_bytes: cap, in bytes, on a safetensors file or upload (16 MiB by default).
        model_dtype: the served model's dtype, or None. When given, values must also stay finite once cast to
            it (an fp32 value of 1e5 is finite but is inf in float16, and would turn every logit NaN).
        num_layers, num_key_value_heads, head_dim: the model's KV shape (transformer layers, KV heads, size of
            one head). All three are needed to accept prefix-tuning prompts; None refuses them.
    """

    hidden_size: int
    max_virtual_tokens: int = 128
    max_bytes: int = 16 * MIB
    model_dtype: torch.dtype | None = None
    num_layers: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for field in ("hidden_size", "max_virtual_tokens", "max_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{field} must be a positive int; got {value!r}")
        for field in ("num_layers", "num_key_value_heads", "head_dim"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Limits.{field} must be a positive int or None; got {value!r}")

    @property
    def prefix_width(self) -> int | None:
        """Row width of a prefix prompt, ``num_layers * 2 * num_key_value_heads * head_dim``, or None when the
        KV shape is unknown."""
        if self.num_layers is None or self.num_key_value_heads is None or self.head_dim is None:
            return None
        return self.num_layers * 2 * self.num_key_value_heads * self.head_dim

    def describe_prefix_width(self) -> str:
        """``"11520 = num_layers 30 x 2 x num_key_value_heads 3 x head_dim 64"`` (for error messages)."""
        return (f"{self.prefix_width} = num_layers {self.num_layers} x 2 x num_key_value_heads "
                f"{self.num_key_value_heads} x head_dim {self.head_dim}")


@dataclass(frozen=True)
class ParsedPrompt:
    """A validated soft prompt, not yet registered.

    Attributes:
        embeddings: ``[num_virtual_tokens, width]``, CPU, contiguous, dtype as stored (float16 / bfloat16 /
            float32), owning its memory. ``width`` is the hidden size, or for ``PREFIX_TUNING``
            ``num_layers * 2 * num_key_value_heads * head_dim`` (the per-layer keys and values).
        peft_type: ``"PROMPT_TUNING"``, ``"P_TUNING"``, ``"PREFIX_TUNING"`` (PEFT directory) or ``"RAW"`` (one
            safetensors file of input embeddings).
        config: the parsed ``adapter_config.json`` for PEFT, ``None`` for RAW.
    """

    embeddings: torch.Tensor
    peft_type: str
    config: dict | None = None

    @property
    def num_virtual_tokens(self) -> int:
        """Number of virtual tokens, ``embeddings.shape[0]``."""
        return int(self.embeddings.shape[0])

    @property
    def is_prefix(self) -> bool:
        """Whether the rows are per-layer KV (prefix tuning) rather than input embeddings."""
        return self.peft_type == PREFIX_TUNING


def shape_str(t: torch.Tensor) -> str:
    """``"[8, 576]"``: a tensor's shape as error messages write it."""
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def validate_embeddings(t: torch.Tensor, limits: Limits, *, prefix: bool = False) -> torch.Tensor:
    """Check a prompt tensor against ``limits`` and return it as a contiguous CPU tensor.

    Checks, in order: a :class:`torch.Tensor`; exactly 2-D ``[num_virtual_tokens, width]``; dtype float16,
    bfloat16 or float32 (kept as is); ``width == limits.hidden_size`` (embedding prompts) or
    ``width == limits.prefix_width`` (``prefix=True``); ``1 <= n <= limits.max_virtual_tokens``; every value
    finite, also once cast to ``limits.model_dtype``.

    Returns:
        The tensor detached, on CPU and contiguous (the same object when it already is).

    Raises:
        PromptError: ``"bad_kind"`` (not a tensor), ``"bad_shape"`` (message names the expected ``[n, width]``
            and the actual shape, e.g. ``expected shape [n, 576], got [8, 640]``; for a prefix prompt the width's
            factors), ``"unsupported_peft_type"`` (a prefix prompt while ``limits`` has no KV shape),
            ``"bad_dtype"``, ``"non_finite"`` (message gives the NaN and inf counts).
    """
    if not isinstance(t, torch.Tensor):
        raise PromptError(f"expected a torch.Tensor, got {type(t).__name__}", reason="bad_kind")
    if prefix and limits.prefix_width is None:
        raise PromptError("prefix-tuning prompts need the model's KV shape, which this loader was not given",
                          reason="unsupported_peft_type")
    width = limits.prefix_width if prefix else limits.hidden_size
    what = "num_layers * 2 * num_key_value_heads * head_dim" if prefix else "hidden_size"
    if t.ndim != 2:
        raise PromptError(
            f"expected a 2-D tensor [num_virtual_tokens, {what}] = [n, {width}], "
            f"got a {t.ndim}-D tensor of shape {shape_str(t)}",
            reason="bad_shape",
        )
    if t.dtype not in ALLOWED_DTYPES:
        raise PromptError(
            f"expected dtype float16, bfloat16 or float32, got {str(t.dtype).removeprefix('torch.')}",
            reason="bad_dtype",
        )
    if t.shape[1] != width:
        raise PromptError(_width_message(t, limits, prefix), reason="bad_shape")
    if not 1 <= t.shape[0] <= limits.max_virtual_tokens:
        raise PromptError(
            f"expected 1 to {limits.max_virtual_tokens} virtual tokens, got {t.shape[0]} (shape {shape_str(t)})",
            reason="bad_shape",
        )
    t = t.detach().to("cpu").contiguous()
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise PromptError(
            f"expected all values finite, got {n_nan} NaN and {n_inf} inf among {t.numel()} values "
            f"(shape {shape_str(t)})",
            reason="non_finite",
        )
    if limits.model_dtype is not None and limits.model_dtype != t.dtype:
        n_over = int((~torch.isfinite(t.to(limits.model_dtype))).sum())
        if n_over:
            raise PromptError(
                f"expected values that fit the model's dtype {str(limits.model_dtype).removeprefix('torch.')}, "
                f"got {n_over} values that overflow it (max |value| {float(t.abs().max()):.3g})",
                reason="non_finite",
            )
    return t


def _width_message(t: torch.Tensor, limits: Limits, prefix: bool) -> str:
    got = int(t.shape[1])
    if prefix:
        return (f"expected shape [n, {limits.describe_prefix_width()}], got {shape_str(t)}: the prefix was made "
                "for a model with another number of layers, KV heads or head size")
    msg = (f"expected shape [n, {limits.hidden_size}], got {shape_str(t)}: the prompt was made for a model with "
           f"hidden size {got}, this model's is {limits.hidden_size}")
    if limits.prefix_width is not None and got == limits.prefix_width:
        msg += ("; that width is this model's prefix-tuning width: upload prefix tuning as a PEFT adapter "
                "directory (adapter_config.json says PREFIX_TUNING)")
    return msg


def check_size(nbytes: int, cap: int, what: str) -> None:
    """Refuse ``nbytes`` outside ``1..cap``.

    Raises:
        PromptError: ``"empty"`` (0 bytes) or ``"too_large"`` (names both byte counts).
    """
    if nbytes == 0:
        raise PromptError(f"{what} is empty: expected 1 to {cap} bytes, got 0", reason="empty")
    if nbytes > cap:
        raise PromptError(f"{what} is {nbytes} bytes; the limit is {cap} bytes", reason="too_large")


def parse_safetensors_bytes(data: bytes, limits: Limits, *, key: str | None = None,
                            prefix: bool = False) -> torch.Tensor:
    """Parse safetensors bytes into one validated prompt tensor ``[num_virtual_tokens, width]``.

    Args:
        data: the whole file (safetensors format: 8-byte header length, JSON header, raw little-endian data).
        limits: see :class:`Limits`; ``len(data)`` is checked against ``limits.max_bytes`` first.
        key: ``None`` for the RAW form, which must hold exactly one tensor under any key; for PEFT,
            ``"prompt_embeddings"``, which must exist (other keys are ignored).
        prefix: validate as a prefix-tuning tensor (see :func:`validate_embeddings`).

    Returns:
        A CPU tensor owning its memory, checked by :func:`validate_embeddings`.

    Raises:
        PromptError: ``"empty"``, ``"too_large"`` (names both byte counts), ``"bad_safetensors"`` (unparsable,
            wrong tensor count or missing key, listing the keys found), or any reason of
            :func:`validate_embeddings`.
    """
    check_size(len(data), limits.max_bytes, "safetensors data")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as exc:  # the Rust parser raises SafetensorError; unknown dtypes raise others
        raise PromptError(f"not a valid safetensors file: {exc}", reason="bad_safetensors") from exc
    if key is None:
        if len(tensors) != 1:
            raise PromptError(
                f"expected exactly 1 tensor in a raw prompt file, got {len(tensors)} "
                f"(keys {sorted(tensors)})",
                reason="bad_safetensors",
            )
        (t,) = tensors.values()
    else:
        if key not in tensors:
            raise PromptError(
                f"expected tensor key {key!r} in the safetensors file, found keys {sorted(tensors)}",
                reason="bad_safetensors",
            )
        t = tensors[key]
    return validate_embeddings(t, limits, prefix=prefix).clone()
