"""CPU attention backend: a paged decode kernel (C++, K/V read in place) and batched SDPA for prefill rows.

Decode rows (one query token each, tokens ``0..B-1`` of the step) go to ``torch.ops.softprompt_attn.paged_decode``
(``paged_decode.cpp`` next to this file): OpenMP over (row, KV head) pairs, each GQA group of query heads handled
together so every K/V row is loaded once, online softmax in fp32, positions read through the block table where
they lie. Nothing is copied per step. Rows with long contexts and few rows are split along the context and merged.

Prefill rows (query length > 1) gather their K/V (positions ``0..seq_len-1``) and run
``torch.nn.functional.scaled_dot_product_attention`` (its CPU flash kernel, ``enable_gqa``). Rows of similar size
share one call: queries and K/V padded to the group's longest, with one additive causal + length mask built per
step (not per layer); a row joins a group only while padding it costs less than the SDPA call it saves, so uneven
rows get their own calls; when every row of a call starts at position 0, ``is_causal`` replaces the mask. Measured
(``bench/attention_bench.py``, one core): 64 rows x 20 new tokens, one call is 1.4-1.5x faster than 64 calls;
4 x 480 tokens, the same either way (the work dominates); 8 rows x 20 tokens over 20..720 positions, per-row calls
beat padding them into 1 call by 2x and into pairs by ~10%; ``is_causal`` beats an equivalent mask by ~9%.

The kernel is compiled on first use (``g++ -O3 -march=native -fopenmp``, a few seconds; light torch headers, no
pybind11, no ninja) into ``$TORCH_EXTENSIONS_DIR/softprompt`` or ``$XDG_CACHE_HOME/softprompt/kernels`` (default
``~/.cache/softprompt/kernels``), as a file named by a hash of the source, the flags, the torch version and the
CPU's model and feature flags, so a cache shared between machines never runs code built for another CPU. The build
writes a temporary file and renames it, so concurrent processes need no lock (``torch.utils.cpp_extension.load``
would need ninja, and waits forever on the lock file a killed build leaves behind).
When no compiler is found or the build or load fails, a warning is logged once and decode rows take the pure-torch
path: they are gathered and run through the same batched SDPA as prefill rows (correct, slower). Set
``--no-attention-kernel`` (``Settings.attention_kernel``) to use that path on purpose. A runner that does not want
the first decode step to wait for the build reads :attr:`CpuBackend.kernel_available` at start-up (the engine
does). The kernel needs a C++ compiler with OpenMP at run time (none in a slim Docker image: there the fallback
runs) and ``paged_decode.cpp`` installed next to this file (package data of ``server.attention``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from prompt_store.diskio import plain_dir_mode
from server.attention.metadata import AttentionMetadata

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# -march=native is safe because the cached file's name includes the CPU's features (see _cpu_id).
_CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w")
_BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_op: Callable[..., None] | None = None
_tried = False


def _cpu_id() -> str:
    """The CPU model and feature flags (Linux), else the platform's machine/processor strings."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    keep: dict[str, str] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in keep:
            keep[key] = " ".join(sorted(val.split()))
    return repr(sorted(keep.items())) + platform.machine() + platform.processor()


def kernel_cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH_EXTENSIONS_DIR/softprompt``, else ``$XDG_CACHE_HOME`` (default
    ``~/.cache``) ``/softprompt/kernels``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "softprompt"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softprompt" / "kernels"


def _compile_command(src: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH)")
    libdir = cpp_extension.library_paths()[0]
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        cxx, *_CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f for p in cpp_extension.include_paths() for f in ("-isystem", p)],
        str(src), "-o", str(out), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}",
    ]


def build_kernel(cache_dir: Path | None = None) -> Path:
    """Compile ``paged_decode.cpp`` unless an up-to-date build is cached; return the shared library's path.

    Args:
        cache_dir: where to keep the build (default :func:`kernel_cache_dir`).
    Raises:
        RuntimeError: no compiler, or the compiler failed (its output is in the message).
    """
    src = KERNEL_SOURCE.read_bytes()
    cache_dir = cache_dir or kernel_cache_dir()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(_CXXFLAGS).encode(), torch.__version__.encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = cache_dir / f"paged_decode_{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=cache_dir)
    os.close(fd)
    try:
        cmd = _compile_command(KERNEL_SOURCE, Path(tmp))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"compiler exited {res.returncode}: {(res.stderr or res.stdout)[-2000:]}")
        os.chmod(tmp, plain_dir_mode())  # 0o777 & ~umask, as a linker's own output; mkstemp's 0600 (0711 once
        # linked) would keep other users from loading it
        os.replace(tmp, target)  # atomic: a concurrent process sees the whole file or none
        log.info("built the paged decode kernel in %.1f s: %s", time.perf_counter() - t0, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def paged_decode_op() -> Callable[..., None] | None:
    """``torch.ops.softprompt_attn.paged_decode``, built and loaded on the first call (thread-safe), or ``None`` when
    it cannot be built or loaded (a warning is logged once).

    The op: ``paged_decode(q [B,H,D], k_cache, v_cache [NB,BS,KVH,D], block_tables int32 [>=B,M],
    seq_lens int64 [>=B], scale, out [B,H,D]) -> None`` (writes ``out``).
    """
    global _op, _tried
    if _tried:
        return _op
    with _lock:
        if _tried:
            return _op
        try:
            path = build_kernel()
            if not hasattr(torch.ops.softprompt_attn, "paged_decode"):  # one library per namespace and process
                torch.ops.load_library(str(path))
            _op = torch.ops.softprompt_attn.paged_decode
        except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
            log.warning("paged decode kernel unavailable, decode attention falls back to gather + SDPA: %s", e)
            _op = None
        _tried = True
        return _op


def _kernel_fits(head_dim: int) -> bool:
    """The kernel's vector code takes head dims that are multiples of 8, up to 256."""
    return head_dim % 8 == 0 and head_dim <= 256


@dataclass(frozen=True)
class _Group:
    """One SDPA call over ``n`` rows padded to ``L`` queries and ``S`` keys each.

    Attributes:
        kv_slots: ``[n*S]`` cache slots to gather; padding repeats the row's first slot, so no unwritten slot is
            ever read.
        mask: ``[n, 1, L, S]`` additive (0: attend, -inf: not), ``[L, S]`` when all rows have one shape, or None
            when every row starts at position 0 (``is_causal`` is then exact: a real query ``i`` sees keys
            ``<= i < L_r``, never padding).
        span: ``(first, end)`` token range when the rows are consecutive with ``L`` tokens each: queries and
            outputs are then views, no gather / scatter.
        q_index: ``[n*L]`` token of each padded query (padding repeats the row's last token), when not ``span``.
        src, dst: ``[N]`` real queries' positions in the flattened ``[n*L]`` output / in the step's tokens.
    """

    n: int
    L: int
    S: int
    kv_slots: torch.Tensor = field(repr=False)
    mask: torch.Tensor | None = field(repr=False)
    span: tuple[int, int] | None
    q_index: torch.Tensor | None = field(repr=False)
    src: torch.Tensor | None = field(repr=False)
    dst: torch.Tensor | None = field(repr=False)


# Padding worth less than about one SDPA call's fixed cost (~30 us on one core) is always accepted: in flops.
_PAD_SLACK_FLOPS = 2.5e6


def _plan_groups(meta: AttentionMetadata, rows: range, max_pad_waste: float, heads_x_dim: int,
                 dtype: torch.dtype) -> list[_Group]:
    """Group ``rows`` into padded SDPA calls.

    Rows sorted by context length join the current group while, for every member, the padded work
    ``L_max * S_max`` (query x key pairs) stays within ``max_pad_waste`` times its own ``L_r * S_r`` plus a slack
    of :data:`_PAD_SLACK_FLOPS` / (4 * H * D) pairs; so a short row never rides in a long row's call, while rows
    of similar size share one. ``max_pad_waste <= 0``: one call per row; ``inf``: one call for all. Masks are
    built additive (0 / -inf) in ``dtype`` once here, not converted by SDPA on every layer.
    """
    slack = _PAD_SLACK_FLOPS / (4 * heads_x_dim)
    qsl = [0]
    for n in meta.query_lens:
        qsl.append(qsl[-1] + n)
    order = sorted(rows, key=lambda r: (meta.seq_lens_list[r], meta.query_lens[r]), reverse=True)
    groups: list[list[int]] = []
    cur: list[int] = []
    lmax = smax = 0
    least = 0  # smallest member's own work
    for r in order:
        L, S = meta.query_lens[r], meta.seq_lens_list[r]
        nl, ns, nleast = max(lmax, L), max(smax, S), min(least, L * S) if cur else L * S
        if cur and (max_pad_waste <= 0 or nl * ns > max_pad_waste * nleast + slack):
            groups.append(cur)
            cur, nl, ns, nleast = [], L, S, L * S
        cur.append(r)
        lmax, smax, least = nl, ns, nleast
    if cur:
        groups.append(cur)
    bs = meta.block_size
    dev = meta.positions.device

    def tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=dev)

    plans = []
    for g in groups:
        g.sort()
        n, L, S = len(g), max(meta.query_lens[r] for r in g), max(meta.seq_lens_list[r] for r in g)
        slots: list[int] = []
        for r in g:
            sr, table = meta.seq_lens_list[r], meta.block_tables_list[r]
            slots.extend(table[p // bs] * bs + p % bs for p in range(sr))
            slots.extend([table[0] * bs] * (S - sr))
        starts = [meta.seq_lens_list[r] - meta.query_lens[r] for r in g]
        shapes = {(meta.query_lens[r], meta.seq_lens_list[r]) for r in g}
        if all(s == 0 for s in starts):
            mask = None
        else:
            if len(shapes) == 1:
                keep = torch.ones(L, S, dtype=torch.bool).tril(diagonal=starts[0])  # [L, S]
            else:
                st = torch.tensor(starts, dtype=torch.long)[:, None, None]
                sl = torch.tensor([meta.seq_lens_list[r] for r in g], dtype=torch.long)[:, None, None]
                i_ = torch.arange(L)[None, :, None]
                j_ = torch.arange(S)[None, None, :]
                keep = ((j_ <= st + i_) & (j_ < sl))[:, None]  # [n, 1, L, S]
            mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf")).to(dev)
        consecutive = g == list(range(g[0], g[0] + n)) and all(meta.query_lens[r] == L for r in g)
        if consecutive:
            plans.append(_Group(n, L, S, tensor(slots), mask, (qsl[g[0]], qsl[g[0]] + n * L), None, None, None))
            continue
        q_index, src, dst = [], [], []
        for i, r in enumerate(g):
            lr = meta.query_lens[r]
            q_index.extend(qsl[r] + min(t, lr - 1) for t in range(L))
            src.extend(range(i * L, i * L + lr))
            dst.extend(range(qsl[r], qsl[r] + lr))
        plans.append(_Group(n, L, S, tensor(slots), mask, None, tensor(q_index), tensor(src), tensor(dst)))
    return plans


class CpuBackend:
    """CPU attention over the paged KV cache: C++ paged decode kernel + grouped SDPA for prefill rows.

    One instance per model runner (not thread-safe): it keeps the step's prefill plan (built on the first layer,
    reused by the others) and grow-only gather buffers, so that no layer allocates and faults in fresh pages for
    its K/V copies.

    Args:
        use_kernel: use the C++ decode kernel when it builds (default); ``False`` forces the pure-torch path
            (decode rows gathered and run through the prefill path's SDPA).
        max_pad_waste: prefill rows share one padded SDPA call while each member's padded work stays within this
            factor of its own plus about one call's fixed cost (``L_max * S_max <= max_pad_waste * L_r * S_r +
            slack``); the default 1.0 pads only when that is cheaper than another call; ``0``: one call per row,
            ``inf``: one call for all.
    """

    name = "cpu"

    def __init__(self, use_kernel: bool = True, max_pad_waste: float = 1.0) -> None:
        self.use_kernel = use_kernel
        self.max_pad_waste = max_pad_waste
        self._plan: tuple[AttentionMetadata, tuple, list[_Group]] | None = None
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def kernel_available(self) -> bool:
        """Whether decode rows run on the C++ kernel (builds it on first use)."""
        return self.use_kernel and paged_decode_op() is not None

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """Causal GQA attention of every query token over its row's cached positions.

        Args:
            q: ``[T, H, D]`` queries after rotary, tokens in ``meta``'s decode-first order.
            k_cache, v_cache: ``[num_blocks, block_size, KVH, D]``, already holding this step's K/V.
            meta: the step's :class:`AttentionMetadata`.
            scale: softmax scale.
        Returns:
            ``[T, H, D]`` contiguous, ``q``'s dtype.
        """
        T, H, D = q.shape
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        B = meta.num_decode_rows
        op = paged_decode_op() if (self.use_kernel and B and q.device.type == "cpu" and _kernel_fits(D)) else None
        if op is not None:
            op(q[:B], k_cache, v_cache, meta.block_tables, meta.seq_lens, float(scale), out[:B])
        for g in self._groups(meta, op is None, H * D, q.dtype):
            self._sdpa_group(q, k_cache, v_cache, g, scale, out)
        return out

    def _groups(self, meta: AttentionMetadata, with_decode: bool, heads_x_dim: int,
                dtype: torch.dtype) -> list[_Group]:
        """The step's SDPA groups, planned once per step (every layer shares one metadata object)."""
        key = (with_decode, heads_x_dim, dtype)
        cached = self._plan
        if cached is not None and cached[0] is meta and cached[1] == key:
            return cached[2]
        first = 0 if with_decode else meta.num_decode_rows
        groups = _plan_groups(meta, range(first, meta.num_rows), self.max_pad_waste, heads_x_dim, dtype)
        self._plan = (meta, key, groups)
        return groups

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` view of a grow-only scratch buffer (contents undefined)."""
        numel = math.prod(shape)
        key = (name, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * buf.numel() if buf is not None else 0), dtype=like.dtype,
                              device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def _sdpa_group(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: _Group, scale: float,
                    out: torch.Tensor) -> None:
        nb, bs, kvh, d = k_cache.shape
        H = q.shape[1]
        kv_shape = (g.n * g.S, kvh, d)
        k = torch.index_select(k_cache.view(nb * bs, kvh, d), 0, g.kv_slots, out=self._buffer("k", kv_shape, k_cache))
        v = torch.index_select(v_cache.view(nb * bs, kvh, d), 0, g.kv_slots, out=self._buffer("v", kv_shape, v_cache))
        k = k.view(g.n, g.S, kvh, d).transpose(1, 2)  # [n, KVH, S, D]
        v = v.view(g.n, g.S, kvh, d).transpose(1, 2)
        if g.span is not None:
            qq = q[g.span[0] : g.span[1]].unflatten(0, (g.n, g.L))
        else:
            qq = torch.index_select(q, 0, g.q_index, out=self._buffer("q", (g.n * g.L, H, d), q)).view(g.n, g.L, H, d)
        o = F.scaled_dot_product_attention(
            qq.transpose(1, 2), k, v, attn_mask=g.mask, is_causal=g.mask is None, scale=scale, enable_gqa=True
        ).transpose(1, 2)  # [n, L, H, D]
        if g.span is not None:
            out[g.span[0] : g.span[1]].unflatten(0, (g.n, g.L)).copy_(o)
        else:
            out.index_copy_(0, g.dst, o[g.src // g.L, g.src % g.L])
