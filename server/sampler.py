"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a per-request generator.

Each row samples from its own logits with its own ``torch.Generator``, so a seeded request's output does not depend
on which other rows share its batch.
"""

from __future__ import annotations

import torch

from server.request import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick one token per row.

    Args:
        logits: fp32 ``[num_rows, vocab_size]``.
        params: one per row.
        generators: one per row (None allowed for greedy rows).
    Returns:
        ``num_rows`` token ids.
    """
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, generators[i])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Temperature, then top-k, then top-p (the smallest set of tokens whose mass reaches ``top_p``). Runs on the
    CPU whatever the model's device, so a seed gives the same tokens on CPU and CUDA."""
    scores = logits.detach().float().cpu()
    scores = (scores - scores.max()) / p.temperature  # [vocab]; max-shifted so large logits cannot overflow
    if p.top_k > 0 and p.top_k < scores.shape[0]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # mass before this token already enough
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
