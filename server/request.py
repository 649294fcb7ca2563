"""Request state: what the scheduler and engine know about one generation request.

Modelled on vLLM v1: an ordered status enum whose finished states map to API finish reasons. Positions of a
request's sequence are ``[virtual tokens][text tokens][generated tokens]``; virtual tokens take positions
``0..n-1`` and text starts at ``n`` (design notes, section 2).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prompt_store.registry import SoftPrompt
    from server.prompt_cache import PromptKV


GREEDY_BELOW = 1e-5


def cached_prompt_positions(prompt: SoftPrompt | None) -> int:
    """Virtual positions of ``prompt`` served from the shared prompt-KV cache.

    An embedding prompt (prompt tuning, p-tuning, RAW) of ``n`` virtual tokens: ``n - 1``; the last virtual token
    is computed with each request's text, so a request with empty text still has an input position. A prefix
    prompt (prefix tuning): all ``n``; its virtual tokens are pure KV with no input position, so its requests need
    at least one text token. No prompt: 0.
    """
    if prompt is None:
        return 0
    return prompt.num_virtual_tokens if prompt.is_prefix else max(prompt.num_virtual_tokens - 1, 0)


class RequestStatus(enum.IntEnum):
    """Ordered: every status greater than RUNNING is finished. A preempted request goes back to WAITING."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2  # EOS or a stop string -> "stop"
    FINISHED_LENGTH = 3  # max_new_tokens reached -> "length"
    FINISHED_ABORTED = 4  # the client went away -> "abort"
    FINISHED_TIMEOUT = 5  # its deadline passed -> "timeout"
    FINISHED_SHUTDOWN = 6  # the server's drain timeout ran out -> "shutdown"
    FINISHED_ERROR = 7  # the engine failed -> "error"

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_TIMEOUT: "timeout",
    RequestStatus.FINISHED_SHUTDOWN: "shutdown",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request (validated by the API layer).

    Attributes:
        max_new_tokens: generated tokens at most, >= 1.
        temperature: 0 (or anything below 1e-5) means greedy (argmax); otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        seed: seeds this request's own generator, so its samples do not depend on the batch; None = random.
        stop: stop strings; the text is cut before the first one, matched across token boundaries.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy: dividing logits by them overflows fp32."""
        return self.temperature < GREEDY_BELOW


@dataclass(eq=False)
class Request:
    """One generation request as the scheduler tracks it. Holds no tensors: per-request device state (sampling
    generators, KV contents) belongs to the model runner, detokenizer state to the output processor.

    Attributes:
        request_id: unique id.
        prompt_token_ids: text token ids (no virtual tokens), ``[num_text_tokens]``.
        params: decoding parameters.
        soft_prompt: the task's prompt version this request was admitted with (held even if the task's file is
            replaced or deleted mid-generation), or None for the plain base model.
        task: task name for metrics ("" for the base model).
        eos_token_ids: ids that end generation.
        output_token_ids: generated ids so far.
        num_computed_tokens: positions whose KV is in the cache.
        block_table: KV block ids holding positions ``0, 1, ...`` in order; shared prompt blocks come first.
        prompt_kv: the shared prompt-KV entry this request holds while running, if any.
        num_preemptions: times the request was preempted (its KV freed, to be recomputed).
        deadline: ``time.monotonic()`` seconds past which the engine ends the request (finish reason "timeout"),
            or None for no deadline.
        arrival_time, admit_time, first_token_time, finish_time: ``time.monotonic()`` seconds.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    soft_prompt: SoftPrompt | None = None
    task: str = ""
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    prompt_kv: PromptKV | None = None
    num_preemptions: int = 0
    deadline: float | None = None
    admit_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.soft_prompt is None else self.soft_prompt.num_virtual_tokens

    @property
    def num_prompt_positions(self) -> int:
        """Virtual + text positions."""
        return self.num_virtual_tokens + len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """All known positions: virtual + text + generated."""
        return self.num_prompt_positions + len(self.output_token_ids)

    @property
    def max_positions(self) -> int:
        """Positions the request can ever hold: virtual + text + max_new_tokens."""
        return self.num_prompt_positions + self.params.max_new_tokens

    @property
    def num_shared_prefix(self) -> int:
        """Virtual positions served from the prompt-KV cache (:func:`cached_prompt_positions`)."""
        return cached_prompt_positions(self.soft_prompt)

    @property
    def num_input_positions(self) -> int:
        """Prompt positions the request computes itself (text, plus the last virtual token of an embedding
        prompt); 0 means there is no position to take first logits from."""
        return self.num_prompt_positions - self.num_shared_prefix

    def token_ids_for(self, start: int, end: int) -> list[int]:
        """Token ids of positions ``[start, end)``; virtual positions read as 0 (their embeddings come from the
        soft prompt)."""
        nv, nt = self.num_virtual_tokens, len(self.prompt_token_ids)
        out = [0] * max(min(end, nv) - start, 0)
        lo, hi = max(start - nv, 0), max(end - nv, 0)  # indices into text + generated
        if lo < nt:
            out += self.prompt_token_ids[lo : min(hi, nt)]
        if hi > nt:
            out += self.output_token_ids[max(lo - nt, 0) : hi - nt]
        return out
