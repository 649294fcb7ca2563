"""The in-memory, thread-safe map from task name to its current, immutable :class:`SoftPrompt`."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prompt_store.formats import ALLOWED_DTYPES, PREFIX_TUNING, ParsedPrompt, validate_task_name


def tensor_sha256(t: torch.Tensor, *, prefix: bool = False) -> str:
    """Content hash of a prompt tensor, as 64 hex digits.

    SHA-256 over the UTF-8 bytes of ``"<dtype>:<d0>x<d1>:"`` (e.g. ``"float32:20x64:"``), preceded by
    ``"PREFIX_TUNING:"`` for a prefix-tuning tensor, followed by the tensor's raw bytes in row-major order and native
    (little-endian on every supported platform) byte order. Two prompts hash equal exactly when kind (input
    embeddings or per-layer KV), dtype, shape and every bit of every value are equal: the same bytes served as
    embeddings and as a prefix (possible when ``hidden_size == num_layers * 2 * kv_heads * head_dim``) are different
    prompts with different KV.
    """
    t = t.detach().to("cpu").contiguous()
    dtype = ALLOWED_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    domain = (f"{PREFIX_TUNING}:" if prefix else "") + f"{dtype}:{'x'.join(str(int(s)) for s in t.shape)}:"
    h = hashlib.sha256(domain.encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@dataclass(frozen=True)
class SoftPrompt:
    """One task's soft prompt as served. Immutable: a replacement is a new object.

    Attributes:
        task: task name (matches :data:`prompt_store.formats.TASK_NAME_RE`).
        embeddings: ``[num_virtual_tokens, width]``, CPU, contiguous, dtype as stored: input embeddings
            (``width`` = the model's hidden size) or, for ``PREFIX_TUNING``, per-layer keys and values (``width =
            num_layers * 2 * num_key_value_heads * head_dim``). Read-only by convention: never modify it in place
            (requests holding this object rely on it).
        num_virtual_tokens: ``embeddings.shape[0]``.
        hidden_size: ``embeddings.shape[1]``, the row width (the KV width above for prefix tuning).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        sha256: :func:`tensor_sha256` of ``embeddings`` (kind + dtype name + shape + raw bytes); the prompt-KV
            cache's key.
        version: per task, 1 for the first content, +1 on every change of content; never goes backwards for a
            task within the process, even across remove and re-add. A store with a prompt directory keeps
            versions across restarts too (:mod:`prompt_store.versions`): the same content comes back with the
            same version.
        source: the file or directory path it was loaded from, or ``"upload"`` for in-memory uploads.
        peft_type: ``"PROMPT_TUNING"``, ``"P_TUNING"``, ``"PREFIX_TUNING"`` or ``"RAW"``.
        loaded_at: when this content was registered, unix seconds.
        nbytes: bytes of ``embeddings`` (``numel * element_size``).
    """

    task: str
    embeddings: torch.Tensor
    num_virtual_tokens: int
    hidden_size: int
    dtype: str
    sha256: str
    version: int
    source: str
    peft_type: str
    loaded_at: float
    nbytes: int

    @property
    def is_prefix(self) -> bool:
        """Whether the rows are per-layer KV (prefix tuning): the virtual tokens then have no input position."""
        return self.peft_type == PREFIX_TUNING

    def to_dict(self) -> dict[str, Any]:
        """JSON-able metadata: every attribute except ``embeddings``."""
        return {
            "task": self.task,
            "num_virtual_tokens": self.num_virtual_tokens,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "sha256": self.sha256,
            "version": self.version,
            "source": self.source,
            "peft_type": self.peft_type,
            "loaded_at": self.loaded_at,
            "nbytes": self.nbytes,
        }


class PromptRegistry:
    """Thread-safe map task -> :class:`SoftPrompt`, holding each tensor once (memory ~ the tensors' bytes).

    All methods take one :class:`threading.Lock` briefly; :meth:`put` hashes and clones outside it.
    """

    def __init__(self) -> None:
        """Create an empty registry."""
        self._lock = threading.Lock()
        self._prompts: dict[str, SoftPrompt] = {}
        self._high_water: dict[str, int] = {}  # task -> highest version ever issued in this process
        self._total_bytes = 0

    def get(self, task: str) -> SoftPrompt | None:
        """Return the current prompt of ``task``, or ``None`` when it is not registered."""
        with self._lock:
            return self._prompts.get(task)

    def put(
        self, task: str, parsed: ParsedPrompt, source: str, *, digest: str | None = None,
        version: Callable[[str, int], int] | None = None,
    ) -> tuple[SoftPrompt, str]:
        """Register ``parsed`` as the prompt of ``task``.

        The tensor is cloned, so later changes to ``parsed.embeddings`` cannot reach served prompts.

        Args:
            task: task name; validated with :func:`prompt_store.formats.validate_task_name`.
            parsed: a validated prompt (``[num_virtual_tokens, width]``, see :class:`SoftPrompt`).
            source: where it came from (a path, or ``"upload"``).
            digest: :func:`tensor_sha256` of ``parsed`` when the caller already has it (saves hashing twice).
            version: ``version(digest, high_water)`` -> the version to issue to new content, called under the
                lock (keep it cheap); ``high_water`` is the highest version issued to the task in this process
                (0 if none), and the result must exceed it. Default: ``high_water + 1``. The version book
                (:mod:`prompt_store.versions`) uses this to keep versions across restarts.

        Returns:
            ``(prompt, action)`` where ``action`` is ``"created"`` (task was absent, version =
            high-water + 1), ``"replaced"`` (content changed, version + 1; holders of the old object keep it)
            or ``"unchanged"`` (same :func:`tensor_sha256`: the existing object is returned as is, no
            version bump).

        Raises:
            PromptError: reason ``"bad_name"`` for an invalid task name.
            ValueError: ``version`` returned a version that is not above the task's high-water mark.
        """
        validate_task_name(task)
        if digest is None:
            digest = tensor_sha256(parsed.embeddings, prefix=parsed.is_prefix)
        with self._lock:
            old = self._prompts.get(task)
        if old is not None and old.sha256 == digest:
            return old, "unchanged"
        emb = parsed.embeddings.detach().to("cpu").contiguous().clone()
        with self._lock:
            old = self._prompts.get(task)
            if old is not None and old.sha256 == digest:
                return old, "unchanged"
            high = self._high_water.get(task, 0)
            issued = high + 1 if version is None else version(digest, high)
            if not isinstance(issued, int) or issued <= high:
                raise ValueError(f"version for task {task!r}: expected an integer above {high}, got {issued!r}")
            prompt = SoftPrompt(
                task=task,
                embeddings=emb,
                num_virtual_tokens=int(emb.shape[0]),
                hidden_size=int(emb.shape[1]),
                dtype=ALLOWED_DTYPES.get(emb.dtype, str(emb.dtype).removeprefix("torch.")),
                sha256=digest,
                version=issued,
                source=source,
                peft_type=parsed.peft_type,
                loaded_at=time.time(),
                nbytes=emb.numel() * emb.element_size(),
            )
            self._high_water[task] = issued
            self._prompts[task] = prompt
            self._total_bytes += prompt.nbytes - (old.nbytes if old is not None else 0)
            return prompt, ("created" if old is None else "replaced")

    def remove(self, task: str) -> SoftPrompt | None:
        """Unregister ``task``; return the removed prompt, or ``None`` if it was not registered.

        Its version high-water mark is kept, so a later re-add gets a higher version.
        """
        with self._lock:
            prompt = self._prompts.pop(task, None)
            if prompt is not None:
                self._total_bytes -= prompt.nbytes
            return prompt

    def list(self) -> list[SoftPrompt]:
        """All registered prompts, sorted by task name."""
        with self._lock:
            return [self._prompts[t] for t in sorted(self._prompts)]

    def total_bytes(self) -> int:
        """Sum of ``nbytes`` over registered prompts: the bytes of their tensors."""
        with self._lock:
            return self._total_bytes

    def __len__(self) -> int:
        """Number of registered tasks."""
        with self._lock:
            return len(self._prompts)

    def __contains__(self, task: object) -> bool:
        """Whether ``task`` is registered."""
        with self._lock:
            return task in self._prompts
