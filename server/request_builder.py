"""Turning text or token ids into a checked engine :class:`~server.request.Request`: the one path every front end
takes, the HTTP routes (through :func:`server.api.service.build_request`, which maps a rejection to a 4xx) and
offline evaluation (:mod:`training.evaluate`). Nothing here knows about HTTP."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from server.engine import RequestRejectedError
from server.request import Request

if TYPE_CHECKING:
    from prompt_store.registry import SoftPrompt
    from server.engine import Engine
    from server.request import SamplingParams


def make_request(
    engine: Engine, prompt: SoftPrompt | None, text: str | None, params: SamplingParams, *,
    token_ids: list[int] | None = None, max_text_tokens: int | None = None,
) -> Request:
    """Tokenize ``text`` (with the tokenizer's defaults) unless ``token_ids`` are given, and check the request
    against the engine's limits and ``max_text_tokens`` (tokens; None = no limit of its own).

    Raises:
        server.engine.RequestRejectedError: an empty request (``code == "empty_input"``), more than
            ``max_text_tokens`` text tokens (``"input_too_long"``), or one that cannot fit the context or the KV
            cache.
    """
    ids = list(token_ids) if token_ids is not None else list(engine.loaded.tokenizer(text or "")["input_ids"])
    if max_text_tokens is not None and len(ids) > max_text_tokens:
        raise RequestRejectedError(f"the input has {len(ids)} tokens; the limit is {max_text_tokens} "
                                   "(--max-input-tokens)", "input_too_long")
    req = Request(uuid.uuid4().hex, ids, params, prompt, prompt.task if prompt else "")
    engine.check(req)
    return req
