"""Hugging Face ``generate`` peers, run in the bench process on the same model, prompts and texts, greedy.

- **sequential** (the floor): one request at a time, ``inputs_embeds = cat(prompt, embed(text_ids))``.
- **padded batch**: every request of the workload in one left-padded batch, layout ``[pad][virtual][text]``, with
  an ``attention_mask`` that is 0 on the pads; ``generate`` derives ``position_ids`` from the mask
  (``cumsum - 1``), so each row's positions start at 0 on its first virtual token, as the server's do.

Timing: a logits processor records the time of every generation step; it runs right after that step's forward
pass, before the token is picked, so step 0's time is the time to the first token (TTFT), and a row's latency is
the time of the step that picked its last token (its EOS, or token ``max_new_tokens``). In the padded batch every
row shares the first step, so they share one TTFT. With ``inputs_embeds`` and no ``input_ids``, a decoder-only
model's ``generate`` returns only the new tokens. Tokens after a row's EOS are padding and are not counted;
texts are decoded as the server decodes them (EOS dropped, special tokens skipped).
"""

from __future__ import annotations

import time

import torch

from .driver import announce
from .stats import LegResult, RequestRecord
from .workload import PromptBank, Workload


class StepClock:
    """A ``LogitsProcessor`` that records ``perf_counter() - t0`` at every generation step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter() - self.t0)
        return scores


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if cut is None else tokens[: cut + 1]  # EOS counted, as the server counts it


def request_embeds(loaded, bank: PromptBank, workload: Workload, j: int) -> torch.Tensor:
    """``[virtual + text, hidden]`` float32: request ``j``'s soft prompt followed by its text's embeddings."""
    ids = torch.tensor(loaded.tokenizer(workload.texts[j])["input_ids"])
    with torch.no_grad():
        text = loaded.model.get_input_embeddings()(ids).float()
    return torch.cat([bank[workload.tasks[j]], text]).contiguous()


def _generate(loaded, x: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, StepClock]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    with torch.no_grad():
        out = loaded.model.generate(inputs_embeds=x.to(loaded.dtype), attention_mask=mask, max_new_tokens=max_new,
                                    do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return out, clock


def hf_sequential(loaded, bank: PromptBank, workload: Workload, n: int, scenario: str) -> LegResult:
    """Requests ``0..n-1`` of ``workload`` one at a time (after request 0 once, untimed, as a warm-up)."""
    tok, eos = loaded.tokenizer, set(loaded.eos_token_ids)
    x0 = request_embeds(loaded, bank, workload, 0)[None]
    # warm-up, untimed: a whole request (a short one leaves the first timed request several times slower)
    _generate(loaded, x0, torch.ones(x0.shape[:2], dtype=torch.long), workload.max_new_tokens)
    load1 = announce(scenario, "hf-sequential", f"{n} of {workload.num_requests} requests, one at a time")
    cpu0, t0 = time.process_time(), time.perf_counter()
    records = []
    for j in range(n):
        t1 = time.perf_counter()
        x = request_embeds(loaded, bank, workload, j)[None]
        out, clock = _generate(loaded, x, torch.ones(x.shape[:2], dtype=torch.long), workload.max_new_tokens)
        new = _cut_at_eos(out[0].tolist(), eos)
        text = tok.decode([t for t in new if t not in eos], skip_special_tokens=True)
        ttft = clock.times[0] + (clock.t0 - t1) if clock.times else None
        records.append(RequestRecord(200, time.perf_counter() - t1, ttft, len(new), text))
    wall = time.perf_counter() - t0
    return LegResult("hf-sequential", records, wall, load1, workload.max_new_tokens,
                     extra={"cpu_cores_used": (time.process_time() - cpu0) / wall if wall > 0 else None})


def padded_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[len_i, hidden]`` rows into ``x [B, L, hidden]`` (zeros on pads) and ``mask [B, L]``."""
    width = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, width - r.shape[0]:] = r
        mask[b, width - r.shape[0]:] = 1
    return x, mask


def hf_padded_batch(loaded, bank: PromptBank, workload: Workload, scenario: str) -> LegResult:
    """All requests of ``workload`` as one left-padded mixed-task batch (after an untimed 1-row warm-up)."""
    tok, eos = loaded.tokenizer, set(loaded.eos_token_ids)
    rows = [request_embeds(loaded, bank, workload, j) for j in range(workload.num_requests)]
    x, mask = padded_batch(rows)
    _generate(loaded, x[:1], mask[:1], workload.max_new_tokens)  # warm-up, untimed: one row
    load1 = announce(scenario, "hf-padded-batch", f"{x.shape[0]} rows x {x.shape[1]} positions in one batch")
    t0 = time.perf_counter()
    out, clock = _generate(loaded, x, mask, workload.max_new_tokens)
    wall = time.perf_counter() - t0
    offset = clock.t0 - t0
    records = []
    for b in range(x.shape[0]):
        new = _cut_at_eos(out[b].tolist(), eos)
        text = tok.decode([t for t in new if t not in eos], skip_special_tokens=True)
        last = clock.times[min(len(new), len(clock.times)) - 1] + offset
        records.append(RequestRecord(200, last, clock.times[0] + offset, len(new), text))
    pads = int((mask == 0).sum())
    return LegResult("hf-padded-batch", records, wall, load1, workload.max_new_tokens,
                     extra={"first_step_s": clock.times[0] + offset, "batch_positions": int(mask.numel()),
                            "pad_positions": pads})
