"""Next-token selection for a whole step at once: greedy, or temperature / top-k / top-p sampling.

The sampled rows share every tensor operation (one sort, one softmax, one cumulative sum); only the uniform draw
is per row, from the request's own ``torch.Generator``, so a seeded request's output does not depend on which
other rows share its batch. A token is drawn by inverting the cumulative distribution of the kept tokens at that
uniform (the same distribution ``torch.multinomial`` samples). Everything runs on the logits' device (on CUDA: no
host round trip but the final read of the token ids).
"""

from __future__ import annotations

import torch

from server.request import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick one token per row, on ``logits``' device; the token ids are read back once, at the end (the step's only
    host synchronisation on CUDA).

    Args:
        logits: fp32 ``[num_rows, vocab_size]``.
        params: one per row.
        generators: one per row (None allowed for greedy rows; a sampled row without one uses torch's default).
    Returns:
        ``num_rows`` token ids.
    """
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        out = out.index_copy(0, index, _sample_rows(logits.index_select(0, index), [params[i] for i in rows],
                                                    [generators[i] for i in rows]))
    return out.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
                 ) -> torch.Tensor:
    """Temperature, then top-k (ties with the k-th score kept), then top-p (the smallest set of most likely
    tokens whose mass reaches ``top_p``), for ``[S, vocab]`` logits, on their device; returns ``[S]`` token ids
    there. The uniforms come from each request's CPU generator (``S`` numbers copied to the device), so a seed draws
    the same uniforms on CPU and CUDA; the tokens agree unless a device's softmax rounds a CDF boundary across
    a uniform."""
    dev = logits.device
    scores = logits.detach().float()
    vocab = scores.shape[1]
    temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / temp  # max-shifted: no overflow
    sorted_s, order = torch.sort(scores, dim=-1, descending=True)  # [S, V]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    kth = sorted_s.gather(1, (top_k - 1)[:, None])  # [S, 1]
    sorted_s = sorted_s.masked_fill(sorted_s < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    probs = torch.softmax(sorted_s, dim=-1)
    drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)  # mass before this token already enough
    drop[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32 would drop them all)
    probs = torch.softmax(sorted_s.masked_fill(drop, float("-inf")), dim=-1)
    cdf = probs.cumsum(-1)  # [S, V]
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(dev, non_blocking=True)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)  # first token whose cdf exceeds u
    idx = torch.minimum(idx, (probs > 0).sum(-1, keepdim=True) - 1)  # never past the kept tokens
    return order.gather(1, idx)[:, 0]
