"""Helpers of the training tests (importable: pytest puts this folder on sys.path for its test files)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, ids: list[int], prompt: torch.Tensor | None, max_new_tokens: int, eos: int = 2) -> list[int]:
    """Greedy decoding by full forward passes: ``inputs_embeds = cat(prompt, embed(ids + generated))``."""
    emb = model.get_input_embeddings()
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = emb(torch.tensor([ids + out]))
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype)[None], x], dim=1)
        tok = int(model(inputs_embeds=x, logits_to_keep=1).logits[0, -1].argmax())
        out.append(tok)
        if tok == eos:
            break
    return out
