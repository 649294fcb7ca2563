"""The model runner: executes a scheduler plan on the device, and owns all per-request device state.

Each step: drop state of finished requests and evicted prompts; fill the KV of newly cached soft prompts (embedding
prompts: one packed pass, each prompt alone at positions ``0..p-1``; prefix prompts: written as they are); copy
cached prompts' tails into the first own block of requests admitted with them; build one
:class:`~server.attention.metadata.AttentionMetadata`; run the packed layer walk (:class:`~server.llama.LlamaLayers`);
take the logits of rows whose prompt is complete and sample them in one batch (:mod:`server.sampler`).

How per-row virtual tokens enter the batch (README, "Design"): rows are *packed*, not padded. A row's virtual
tokens are positions ``0..n-1`` of its sequence and its text starts at ``n``; there is never padding between them,
so a row's result does not depend on its neighbours (design notes, section 2). An embedding prompt's virtual tokens
enter as embeddings (the soft prompt's rows replace the embedding lookup at those positions): the first ``n-1``
are served from the shared prompt-KV blocks (:mod:`server.prompt_cache`), the last is computed with the text. A
prefix prompt's virtual tokens are its keys and values, written once into shared blocks (:func:`prefix_kv`); its
requests compute only their text.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

from server.attention.backend import AttentionBackend
from server.attention.metadata import RowSpec, build_metadata
from server.kv_pool import KVPool
from server.llama import LlamaLayers
from server.model_loader import LoadedModel
from server.prompt_kv_tier import HostPromptKV
from server.sampler import sample
from server.scheduler import ScheduledRow, SchedulerOutput

log = logging.getLogger(__name__)

#: Most prompt positions computed in one packed pass when many new prompts arrive at once.
PROMPT_PASS_TOKENS = 4096


def prefix_kv(prefix: torch.Tensor, num_layers: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a prefix-tuning tensor into per-layer keys and values.

    PEFT 0.21's layout (``PeftModel.get_prompt``): the row of virtual token ``i`` reshapes to
    ``[2 * num_layers, num_kv_heads, head_dim]``, where block ``2l`` is layer ``l``'s key and ``2l + 1`` its value.
    The keys are used by PEFT as the attention cache holds them, with no rotary embedding applied, i.e. as if at
    position 0: so they are written to the pool (which holds keys after rotation) unchanged, and the request's
    text takes positions from ``n``. ``tests/server/test_prefix_tuning.py`` checks this against PEFT's forward.

    Args:
        prefix: ``[n, num_layers * 2 * num_kv_heads * head_dim]``.
        num_layers, num_kv_heads: the model's.

    Returns:
        ``(k, v)``, each ``[num_layers, n, num_kv_heads, head_dim]`` views of ``prefix``.
    """
    n = prefix.shape[0]
    x = prefix.view(n, num_layers, 2, num_kv_heads, -1).permute(2, 1, 0, 3, 4)  # [2, L, n, KVH, D]
    return x[0], x[1]


@dataclass
class StepResult:
    """What one executed plan produced.

    Attributes:
        sampled: request_id -> new token id, for rows whose prompt is complete.
        failed: ids of rows whose logits held NaN or +inf, or were all -inf (nothing to sample).
    """

    sampled: dict[str, int]
    failed: frozenset[str]


#: Values of ``EngineConfig.attention_backend``.
ATTENTION_BACKENDS = ("auto", "cpu", "flex", "reference")


def default_backend(device: torch.device, use_kernel: bool = True, name: str = "auto") -> AttentionBackend:
    """The attention backend called ``name`` for ``device``.

    ``auto`` is ``cpu`` on the CPU and ``flex`` on CUDA. ``cpu``: grouped SDPA prefill and, on the CPU when
    ``use_kernel``, the C++ paged decode kernel (on CUDA its pure-torch path runs); ``flex``:
    :class:`~server.attention.flex.FlexBackend` (compiled on CUDA, eager on the CPU); ``reference``: per-row
    gather + SDPA (slow; tests).

    Raises:
        ValueError: an unknown name.
    """
    dev = torch.device(device)
    if name == "auto":
        name = "flex" if dev.type == "cuda" else "cpu"
    if name == "cpu":
        from server.attention.cpu import CpuBackend

        return CpuBackend(use_kernel=use_kernel and dev.type == "cpu")
    if name == "flex":
        from server.attention.flex import FlexBackend

        return FlexBackend()
    if name == "reference":
        from server.attention.reference import ReferenceBackend

        return ReferenceBackend()
    raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")


class ModelRunner:
    """Runs plans of a frozen Llama-family model over a paged KV pool. Engine thread only.

    Args:
        loaded: the frozen model.
        pool: the KV tensors (block ids match the scheduler's :class:`~server.block_pool.BlockPool`).
        backend: attention backend; ``default_backend(device, attention_kernel, attention_backend)`` if None.
        attention_kernel, attention_backend: passed to :func:`default_backend`.
        packed_weights: passed to :class:`~server.llama.LlamaLayers`.
    """

    def __init__(self, loaded: LoadedModel, pool: KVPool, backend: AttentionBackend | None = None,
                 attention_kernel: bool = True, packed_weights: bool = True, attention_backend: str = "auto",
                 host_tier: HostPromptKV | None = None) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.pool = pool
        backend = backend or default_backend(loaded.device, attention_kernel, attention_backend)
        self.model = LlamaLayers(loaded.model, backend, packed_weights)
        self._tails: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt key -> [L, r, KVH, D] K and V
        self.tail_bytes = 0  # bytes of the tails, kept outside the pool
        self._generators: dict[str, torch.Generator] = {}  # request_id -> its sampling generator
        self.host_tier = host_tier  # evicted prompts' KV on the host, or None

    @torch.inference_mode()
    def warm_up(self, max_tokens: int = 0, max_rows: int = 0) -> None:
        """Before serving: build what the backend compiles (the CPU decode kernel, seconds on a fresh machine), then
        run one prefill pass of up to ``max_tokens`` positions and one decode pass of up to ``max_rows`` rows on
        scratch KV, as vLLM's start-up profile run does, so the first requests do not pay for first-touch memory
        (the step's largest activations) and lazy initialisation. Uses blocks no request holds yet: call it before
        the engine admits anything."""
        getattr(self.model.backend, "kernel_available", None)
        bs, nb = self.pool.block_size, self.pool.num_blocks
        tokens = min(max_tokens, nb * bs)
        if tokens > 1:
            meta = build_metadata([RowSpec(list(range(-(-tokens // bs))), 0, tokens)], bs, self.device)
            h = self.model.forward(self.model.embed(torch.zeros(tokens, dtype=torch.long, device=self.device)), meta,
                                   self.pool.k, self.pool.v)
            self.model.logits(h[-min(max_rows or 1, tokens):])
        rows = min(max_rows, nb)
        if rows > 0:
            meta = build_metadata([RowSpec([b], 0, 1) for b in range(rows)], bs, self.device)
            h = self.model.forward(self.model.embed(torch.zeros(rows, dtype=torch.long, device=self.device)), meta,
                                   self.pool.k, self.pool.v)
            self.model.logits(h)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run ``plan``: prompt KV first, then the rows; sample rows that complete their prompt."""
        for entry in plan.evicted_prompts:
            tail = self._tails.pop(entry.key, None)
            if tail is not None:
                self.tail_bytes -= tail[0].nbytes + tail[1].nbytes
            if self.host_tier is not None and entry.computed:
                self._save_to_host(entry, tail)
        for rid in plan.finished_ids:
            self._generators.pop(rid, None)
        if plan.prompts_to_compute:
            self._compute_prompts(plan.prompts_to_compute)
        for req, entry in plan.tail_copies:
            self._copy_tail(entry.key, req.block_table[len(entry.full_blocks)])
        if not plan.rows:
            return StepResult({}, frozenset())
        hidden, last = self._forward(plan.rows)
        sampling = [r.request for r in plan.rows if r.completes_prompt]
        if not sampling:
            return StepResult({}, frozenset())
        logits = self.model.logits(hidden[last])  # [S, vocab]
        bad = ~torch.isfinite(logits.amax(-1))  # NaN or +inf anywhere, or all -inf (amax propagates NaN)
        failed = frozenset(q.request_id for q, b in zip(sampling, bad.tolist(), strict=True) if b)
        if failed:
            keep = (~bad).nonzero()[:, 0]
            logits, sampling = logits[keep], [q for q in sampling if q.request_id not in failed]
            for q in (q for q in plan.rows if q.request.request_id in failed):
                log.error("request %s (task %r): non-finite logits", q.request.request_id, q.request.task)
        tokens = sample(logits, [q.params for q in sampling], [self._generator(q) for q in sampling])
        return StepResult({q.request_id: t for q, t in zip(sampling, tokens, strict=True)}, failed)

    def _forward(self, rows: list[ScheduledRow]) -> tuple[torch.Tensor, list[int]]:
        """Packed forward of ``rows``; returns hidden states ``[T, hidden]`` and each sampling row's last index."""
        specs = [RowSpec(r.request.block_table, r.start, r.num_tokens) for r in rows]
        meta = build_metadata(specs, self.pool.block_size, self.device)
        ids: list[int] = []
        virtual: list[tuple[int, torch.Tensor]] = []  # (first packed index, [k, hidden] embeddings)
        last: list[int] = []
        for r in rows:
            req, end = r.request, r.start + r.num_tokens
            if r.start < req.num_virtual_tokens:
                virtual.append((len(ids), req.soft_prompt.embeddings[r.start : min(end, req.num_virtual_tokens)]))
            ids.extend(req.token_ids_for(r.start, end))
            if r.completes_prompt:
                last.append(len(ids) - 1)
        x = self._embed(ids, virtual)
        return self.model.forward(x, meta, self.pool.k, self.pool.v), last

    def _embed(self, ids: list[int], virtual: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        x = self.model.embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # [T, hidden]
        for off, emb in virtual:
            x[off : off + emb.shape[0]] = emb.to(device=self.device, dtype=x.dtype)
        return x

    def _generator(self, req) -> torch.Generator | None:
        """The request's own CPU generator (seeded, or random), created at its first sampled token and kept
        across preemption, so a seeded request's samples do not depend on the batch or on recomputation."""
        if req.params.greedy:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
            gen = self._generators[req.request_id] = torch.Generator(device="cpu").manual_seed(seed)
        return gen

    # ------------------------------------------------------------------ prompt KV
    def _compute_prompts(self, todo: list) -> None:
        """Fill each new prompt's KV for positions ``0..p-1`` into its full blocks and (the tail) the creating
        request's first own block, then keep each tail as a tensor. Prefix prompts are KV already and are written
        as they are (:func:`prefix_kv`); embedding prompts are computed alone, in packed passes of at most
        ``PROMPT_PASS_TOKENS`` positions."""
        group: list = []
        used = 0
        for entry, req in todo:
            if self._restore_from_host(entry, req):
                continue
            if req.soft_prompt.is_prefix:
                self._write_prefix(entry, req)
                continue
            if group and used + entry.num_tokens > PROMPT_PASS_TOKENS:
                self._prompt_pass(group)
                group, used = [], 0
            group.append((entry, req))
            used += entry.num_tokens
        if group:
            self._prompt_pass(group)

    def _prompt_pass(self, group: list) -> None:
        specs, embs, owns = [], [], []
        for entry, req in group:
            own = req.block_table[len(entry.full_blocks)]  # the creating request's first own block gets the tail
            owns.append(own)
            specs.append(RowSpec(list(entry.full_blocks) + ([own] if entry.tail_len else []), 0, entry.num_tokens))
            embs.append(req.soft_prompt.embeddings[: entry.num_tokens].to(device=self.device, dtype=self.dtype))
        order = sorted(range(len(specs)), key=lambda i: specs[i].num_tokens > 1)  # one-token rows first
        meta = build_metadata([specs[i] for i in order], self.pool.block_size, self.device)
        self.model.forward(torch.cat([embs[i] for i in order]), meta, self.pool.k, self.pool.v)
        for (entry, _), own in zip(group, owns, strict=True):
            self._keep_tail(entry, own)

    def _write_prefix(self, entry, req) -> None:
        """Write a prefix prompt's keys and values for positions ``0..p-1`` into the entry's full blocks and the
        creating request's first own block (the tail), cast to the pool's dtype, then keep the tail."""
        k, v = prefix_kv(req.soft_prompt.embeddings, self.pool.k.shape[0], self.pool.k.shape[-2])
        own = self._write_span(entry, req, *(t.to(device=self.device, dtype=self.pool.k.dtype) for t in (k, v)))
        if own is not None:
            self._keep_tail(entry, own)

    def _write_span(self, entry, req, k: torch.Tensor, v: torch.Tensor) -> int | None:
        """Write ``k``/``v`` ``[L, p, KVH, D]`` (positions ``0..p-1`` of ``entry``) into its full blocks and the
        creating request's first own block (the tail); returns that block, or None when there is no tail."""
        bs = self.pool.block_size
        own = req.block_table[len(entry.full_blocks)] if entry.tail_len else None
        for i, block in enumerate([*entry.full_blocks, *([own] if own is not None else [])]):
            lo, hi = i * bs, min((i + 1) * bs, entry.num_tokens)
            self.pool.k[:, block, : hi - lo] = k[:, lo:hi]
            self.pool.v[:, block, : hi - lo] = v[:, lo:hi]
        return own

    def _save_to_host(self, entry, tail) -> None:
        """Copy an evicted entry's ``p`` positions (full blocks, then the kept tail) to the host tier; its blocks
        are free but not yet rewritten (eviction is applied before anything in the step writes the pool)."""
        L, _, bs, kvh, d = self.pool.k.shape
        full = list(entry.full_blocks)
        parts_k = [self.pool.k[:, full].reshape(L, len(full) * bs, kvh, d)]
        parts_v = [self.pool.v[:, full].reshape(L, len(full) * bs, kvh, d)]
        if tail is not None:
            parts_k.append(tail[0])
            parts_v.append(tail[1])
        self.host_tier.put(entry.key, torch.cat(parts_k, 1), torch.cat(parts_v, 1))

    def _restore_from_host(self, entry, req) -> bool:
        """Fill a new entry from the host tier when it holds that prompt's KV; returns whether it did."""
        if self.host_tier is None:
            return False
        kept = self.host_tier.take(entry.key)
        if kept is None:
            return False
        k, v = (t.to(self.device, non_blocking=True) for t in kept)
        own = self._write_span(entry, req, k, v)
        if own is not None:
            self._keep_tail(entry, own)
        return True

    def _keep_tail(self, entry, own: int) -> None:
        """Keep the tail of a freshly filled entry (positions ``0..tail_len-1`` of block ``own``) as tensors."""
        if entry.tail_len:
            tail = (self.pool.k[:, own, : entry.tail_len].clone(), self.pool.v[:, own, : entry.tail_len].clone())
            self._tails[entry.key] = tail
            self.tail_bytes += tail[0].nbytes + tail[1].nbytes

    def _copy_tail(self, key: str, block: int) -> None:
        """Copy a cached prompt's tail ``[L, r, KVH, D]`` into positions ``0..r-1`` of ``block``."""
        k, v = self._tails[key]
        r = k.shape[1]
        self.pool.k[:, block, :r] = k
        self.pool.v[:, block, :r] = v

