"""Microbenchmark of the attention backends on the paged KV cache (one layer's call, CPU).

    .venv/bin/python -m bench.attention_bench [--repeat 30] [--threads N] [--only decode|prefill|sdpa|flex]
        [--compile] [--dtype float32] [--cpu-time]

Prints one table per section, milliseconds per call (median over ``--repeat`` rounds; every round times each
method once, in turn, so a noisy neighbour hits all methods alike) and each method's speed-up over the first
column. Sections:

- decode: B rows of one query token, contexts 40 / 72 / 520 (and few rows with a long context, where the kernel
  splits the context), SmolLM2-135M's shape (H=9, KVH=3, D=64), block size 16, scattered block tables.
  ``reference``: per-row gather + SDPA (:class:`ReferenceBackend`); ``kernel``: :class:`CpuBackend` (paged C++
  kernel, K/V read in place); ``gather+sdpa``: the old runner's approach (gather every row's context into one
  padded tensor per layer, then one masked SDPA; index and mask built once per step, outside the timing);
  ``fallback``: :class:`CpuBackend` without the kernel.
- prefill: rows of several query tokens. ``per-row``: one SDPA call per row; ``grouped``: the backend's default
  (rows share a padded call only while padding a row costs less than about one SDPA call's fixed cost);
  ``grouped pad<=2x``: the same with a 2x bound; ``one-call``: every row in one padded call.
- sdpa: the raw SDPA call on one padded batch: boolean mask, additive float mask, ``is_causal`` (rows starting at
  position 0 only), GQA via ``enable_gqa`` or with K/V heads expanded beforehand.
- flex (only with ``--only flex``): :class:`FlexBackend` against :class:`CpuBackend` on decode, prefill and mixed
  steps: ``flex compiled`` (inductor's C++ FlexAttention kernel; the step's block masks built once, as every layer
  after the first sees them), ``+ plan`` (the masks rebuilt in every call: the first layer's cost) and
  ``flex eager`` (torch's unfused implementation, as the backend runs on the CPU by default).
- ``--compile``: time a from-scratch build of the decode kernel in a temporary directory.

On a shared machine, multi-threaded timings of small calls mostly measure how long OpenMP waits for a descheduled
thread; ``--threads 1 --cpu-time`` gives the steadiest comparison of the work itself.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from server.attention.cpu import CpuBackend, build_kernel, paged_decode_op
from server.attention.metadata import AttentionMetadata, RowSpec, build_metadata
from server.attention.reference import ReferenceBackend

H, KVH, D, BLOCK = 9, 3, 64, 16
SCALE = D**-0.5


def _setup(rows: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0):
    """Pool, metadata and queries for rows given as (cached positions, new tokens), decode rows first."""
    rng = random.Random(seed)
    need = [-(-(s + n) // BLOCK) for s, n in rows]
    nb = sum(need) + 8
    perm = list(range(nb))
    rng.shuffle(perm)  # scattered, non-contiguous block tables
    specs, at = [], 0
    for (s, n), k in zip(rows, need, strict=True):
        specs.append(RowSpec(perm[at : at + k], s, n))
        at += k
    meta = build_metadata(specs, BLOCK)
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(nb, BLOCK, KVH, D, generator=g).to(dtype)
    vc = torch.randn(nb, BLOCK, KVH, D, generator=g).to(dtype)
    q = torch.randn(meta.num_tokens, H, D, generator=g).to(dtype)
    return kc, vc, q, meta


def _old_gather_sdpa(kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata) -> Callable:
    """The previous runner's decode path: per layer, gather each row's context into [B, KVH, Smax, D], one SDPA."""
    B, smax = meta.num_decode_rows, max(meta.seq_lens_list[: meta.num_decode_rows])
    idx = torch.zeros(B, smax, dtype=torch.long)
    for r in range(B):
        t = meta.block_tables_list[r]
        sl = [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(meta.seq_lens_list[r])]
        idx[r, : len(sl)] = torch.tensor(sl)
        idx[r, len(sl) :] = sl[0]
    mask = (torch.arange(smax)[None] < torch.tensor(meta.seq_lens_list[:B])[:, None])[:, None, None]  # [B,1,1,S]
    pk, pv = kc.view(-1, KVH, D), vc.view(-1, KVH, D)

    def fn(q: torch.Tensor, scale: float) -> torch.Tensor:  # per layer
        kk, vv = pk[idx].transpose(1, 2), pv[idx].transpose(1, 2)  # [B, KVH, Smax, D]
        o = F.scaled_dot_product_attention(q[:B, :, None], kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[:, :, 0]

    return fn


_clock = time.perf_counter


def _time(methods: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms per call of each method; rounds interleave the methods."""
    for f in methods.values():  # warm-up (and the kernel's first-use build)
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeat):
        for k, f in methods.items():
            t0 = _clock()
            f()
            times[k].append((_clock() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _table(title: str, cases: list[tuple[str, dict[str, float]]]) -> None:
    cols = list(cases[0][1])
    print(f"\n{title} (ms per call, median; x = speed-up over {cols[0]})")
    w = max(len(c) for c, _ in cases)
    print(f"{'case':<{w}} | " + " | ".join(f"{c:>20}" for c in cols))
    print("-" * (w + 3 + 23 * len(cols)))
    for name, res in cases:
        base = res[cols[0]]
        cells = [f"{res[c]:8.3f} ({base / res[c]:5.2f}x)" for c in cols]
        print(f"{name:<{w}} | " + " | ".join(f"{c:>20}" for c in cells))


def bench_decode(repeat: int, dtype: torch.dtype) -> None:
    ref, cpu, fb = ReferenceBackend(), CpuBackend(), CpuBackend(use_kernel=False)
    atol = 1e-2 if dtype != torch.float32 else 1e-5
    cases = []
    for B, ctx in [(64, 40), (64, 72), (64, 520), (4, 2048), (1, 8192)]:
        kc, vc, q, meta = _setup([(ctx - 1, 1)] * B, dtype)
        old = _old_gather_sdpa(kc, vc, meta)
        expect = ref.forward(q, kc, vc, meta, SCALE)
        for got in (cpu.forward(q, kc, vc, meta, SCALE), fb.forward(q, kc, vc, meta, SCALE), old(q, SCALE)):
            assert torch.allclose(got.float(), expect.float(), atol=atol)
        cases.append((f"B={B} ctx={ctx}", _time({
            "reference": partial(ref.forward, q, kc, vc, meta, SCALE),
            "kernel": partial(cpu.forward, q, kc, vc, meta, SCALE),
            "gather+sdpa": partial(old, q, SCALE),
            "fallback": partial(fb.forward, q, kc, vc, meta, SCALE),
        }, repeat)))
    _table(f"decode, H={H} KVH={KVH} D={D} block {BLOCK}, {dtype}", cases)


def bench_prefill(repeat: int, dtype: torch.dtype) -> None:
    ref = ReferenceBackend()
    per_row, grouped, one = CpuBackend(max_pad_waste=0.0), CpuBackend(), CpuBackend(max_pad_waste=float("inf"))
    loose = CpuBackend(max_pad_waste=2.0)
    atol = 1e-2 if dtype != torch.float32 else 1e-5
    shapes = {
        "(a) 64 x 20 new, 19 cached": [(19, 20)] * 64,
        "(b) 4 x 480 new, 19 cached": [(19, 480)] * 4,
        "(c) 16 x 20 + 2 x 480, 19 cached": [(19, 20)] * 16 + [(19, 480)] * 2,
        "(d) 8 x 20 new, 0..700 cached": [(c, 20) for c in (0, 100, 200, 300, 400, 500, 600, 700)],
        "(e) 4 x 480 new, 0 cached": [(0, 480)] * 4,
        "(f) 32 decode + 8 x 20 new, 19 cached": [(71, 1)] * 32 + [(19, 20)] * 8,
    }
    cases = []
    for name, rows in shapes.items():
        kc, vc, q, meta = _setup(rows, dtype)
        expect = ref.forward(q, kc, vc, meta, SCALE)
        for b in (per_row, grouped, loose, one):
            assert torch.allclose(b.forward(q, kc, vc, meta, SCALE).float(), expect.float(), atol=atol)
        cases.append((name, _time({
            "reference": partial(ref.forward, q, kc, vc, meta, SCALE),
            "per-row": partial(per_row.forward, q, kc, vc, meta, SCALE),
            "grouped": partial(grouped.forward, q, kc, vc, meta, SCALE),
            "grouped pad<=2x": partial(loose.forward, q, kc, vc, meta, SCALE),
            "one-call": partial(one.forward, q, kc, vc, meta, SCALE),
        }, repeat)))
    _table(f"prefill (whole step: K/V gather, SDPA, output copy), {dtype}", cases)


def bench_sdpa(repeat: int, dtype: torch.dtype) -> None:
    cases = []
    g = torch.Generator().manual_seed(0)
    for R, L, start in [(64, 20, 19), (64, 20, 0), (4, 480, 19), (4, 480, 0), (1, 480, 0)]:
        S = start + L
        q = torch.randn(R, H, L, D, generator=g).to(dtype)
        k = torch.randn(R, KVH, S, D, generator=g).to(dtype)
        v = torch.randn(R, KVH, S, D, generator=g).to(dtype)
        bmask = torch.ones(L, S, dtype=torch.bool).tril(start)
        fmask = torch.zeros(L, S, dtype=dtype).masked_fill(~bmask, float("-inf"))
        ke, ve = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        methods = {
            "bool mask": lambda q=q, k=k, v=v, m=bmask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, enable_gqa=True),
            "float mask": lambda q=q, k=k, v=v, m=fmask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, enable_gqa=True),
            "bool, K/V expanded": lambda q=q, k=ke, v=ve, m=bmask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m),
        }
        if start == 0:
            methods["is_causal"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True)
        cases.append((f"{R} rows x {L} new, {start} cached", _time(methods, repeat)))
    by_cols: dict[tuple[str, ...], list] = {}
    for c in cases:
        by_cols.setdefault(tuple(c[1]), []).append(c)
    for group in by_cols.values():
        _table(f"raw SDPA on one padded batch, {dtype}", group)


def bench_flex(repeat: int, dtype: torch.dtype) -> None:
    import warnings

    from server.attention.flex import FlexBackend

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    ref, cpu = ReferenceBackend(), CpuBackend()
    compiled, replanned, eager = FlexBackend(compile=True), FlexBackend(compile=True), FlexBackend()
    atol = 2e-2 if dtype != torch.float32 else 1e-5

    def replan(q, kc, vc, meta):
        replanned._plan = None
        return replanned.forward(q, kc, vc, meta, SCALE)

    cases = []
    for name, rows in {"64 decode rows, ctx 40": [(39, 1)] * 64, "16 x 20 new, 19 cached": [(19, 20)] * 16,
                       "32 decode + 4 x 20 new": [(71, 1)] * 32 + [(19, 20)] * 4}.items():
        kc, vc, q, meta = _setup(rows, dtype)
        expect = ref.forward(q, kc, vc, meta, SCALE)
        with torch.inference_mode():
            for b in (compiled, eager):
                assert torch.allclose(b.forward(q, kc, vc, meta, SCALE).float(), expect.float(), atol=atol)
            cases.append((name, _time({
                "cpu backend": partial(cpu.forward, q, kc, vc, meta, SCALE),
                "flex compiled": partial(compiled.forward, q, kc, vc, meta, SCALE),
                "flex compiled + plan": partial(replan, q, kc, vc, meta),
                "flex eager": partial(eager.forward, q, kc, vc, meta, SCALE),
            }, repeat)))
    _table(f"flex vs cpu backend, one layer, {dtype}", cases)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", choices=["decode", "prefill", "sdpa", "flex"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--compile", action="store_true", help="time a from-scratch kernel build first")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the calling thread's CPU time, not wall time: steadier on a busy machine, but counts "
                        "only the calling thread, so use it with --threads 1")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        global _clock
        _clock = time.thread_time
    dtype = getattr(torch, a.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {'thread CPU' if a.cpu_time else 'wall'} time")
    if a.compile:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            build_kernel(Path(tmp))
            print(f"kernel build from scratch: {time.perf_counter() - t0:.1f} s")
    print(f"decode kernel: {'loaded' if paged_decode_op() is not None else 'UNAVAILABLE (fallback timed twice)'}")
    if a.only in (None, "decode"):
        bench_decode(a.repeat, dtype)
    if a.only in (None, "prefill"):
        bench_prefill(a.repeat, dtype)
    if a.only in (None, "sdpa"):
        bench_sdpa(a.repeat, dtype)
    if a.only == "flex":
        bench_flex(a.repeat, dtype)


if __name__ == "__main__":
    main()
