"""The device check: CUDA tests, then the engine against Hugging Face on a Llama-3.2-1B-shaped model, one script.

``python -m bench.gpu_check`` on a CUDA machine (``make gpu-check``; README "GPU" gives the device command):

1. **tests**: ``pytest -m cuda tests/server/test_cuda.py`` in a subprocess (FlexAttention against the reference on
   CUDA, the equivalence suite on a SmolLM2-shaped model in bf16), under ``--pytest-timeout``;
2. **model**: a Llama-3.2-1B-shaped model with random weights (:data:`bench.gpu_model.LLAMA_1B`), bf16, and
   ``--tasks`` random soft prompts of ``--virtual-tokens`` (prompt KV computed ahead of traffic, as the server
   does when prompts load);
3. **engine legs**, per ``--backends`` entry: requests of ``--text-tokens`` random ids + ``--new-tokens`` greedy
   tokens at each ``--concurrency`` (closed loop, ``--requests`` of them), then at the largest concurrency with
   ``--task-levels`` tasks; at concurrency 1 the median decode step against the weight-read roofline
   (weight bytes / ``--hbm-tbps``); an untimed warm-up first (compilation happens there);
4. **hf-padded-batch** (Hugging Face ``generate``, one left-padded batch of the largest-concurrency workload) and
   **hf-generate-batch** (transformers' continuous batching, texts only: random ids stand in for the virtual
   tokens);
5. a summary against issue 9's targets.

Each section is guarded: a failure is recorded and the next section runs. Figures go to stdout and, after every
section, to ``gpu_check.json`` under ``--out`` (default ``$OUT``). Sections stop being started once ``--budget-s``
seconds have passed. ``--tiny`` runs every code path on the CPU in seconds (tiny model, small counts; tests
skipped): ``tests/bench/test_gpu_check.py`` does that in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

try:  # prompt_store imports watchfiles for its directory watcher, which this check never runs
    import watchfiles  # noqa: F401
except ImportError:  # the device image has none unless wheels were carried: a stand-in keeps the benchmark going
    import types

    sys.modules["watchfiles"] = types.ModuleType("watchfiles")

from .gpu_model import LLAMA_1B, TINY  # noqa: E402

HBM_TBPS_H200 = 4.8  # the H200's HBM3e bandwidth by its datasheet, TB/s


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, small counts, no tests")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--backends", default=None, help="attention backends in order, comma-separated (default "
                    "flex,cpu: a backend runs only if the ones before it failed, unless --all-backends)")
    ap.add_argument("--all-backends", action="store_true", help="run every --backends entry, not only until one works")
    ap.add_argument("--concurrency", type=_ints, default=None, help="default 1,64,256 (tiny: 1,4,8)")
    ap.add_argument("--requests", type=_ints, default=None, help="requests per concurrency (default 8,64,256)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks of the main legs (default 64; tiny 4)")
    ap.add_argument("--task-levels", type=_ints, default=None, help="task counts at the largest concurrency "
                    "(default 1,1000; tiny 1,16)")
    ap.add_argument("--virtual-tokens", type=int, default=None, help="per soft prompt (default 20; tiny 5)")
    ap.add_argument("--text-tokens", type=int, default=None, help="per request (default 96; tiny 12)")
    ap.add_argument("--new-tokens", type=int, default=None, help="per request (default 64; tiny 6)")
    ap.add_argument("--max-batched-tokens", type=int, default=None, help="engine step budget (default 8192)")
    ap.add_argument("--kv-gib", type=float, default=None, help="KV for running requests (default 4; tiny 0.01)")
    ap.add_argument("--prompt-kv-gib", type=float, default=None, help="prompt-KV budget (default 2; tiny 0.01)")
    ap.add_argument("--flex-q-block", type=int, default=16, help="FlexBackend q_block_size")
    ap.add_argument("--flex-kernel-options", type=json.loads, default=None,
                    help="FlexBackend kernel_options as JSON (default: the backend's)")
    ap.add_argument("--cb-num-blocks", type=int, default=None,
                    help="generate_batch's paged-cache blocks (default: transformers' choice; tiny 16)")
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None, help="generate_batch's step budget (tiny 256)")
    ap.add_argument("--hbm-tbps", type=float, default=HBM_TBPS_H200, help="bandwidth of the roofline, TB/s")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="skip both Hugging Face legs")
    ap.add_argument("--pytest-timeout", type=float, default=150.0, help="seconds for the CUDA tests")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no leg after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults of the chosen size (``--tiny`` or the 1B run)."""
    tiny = args.tiny
    defaults = dict(backends="flex,cpu", concurrency=[1, 4, 8] if tiny else [1, 64, 256],
                    requests=[2, 4, 8] if tiny else [8, 64, 256], tasks=4 if tiny else 64,
                    task_levels=[1, 16] if tiny else [1, 1000], virtual_tokens=5 if tiny else 20,
                    text_tokens=12 if tiny else 96, new_tokens=6 if tiny else 64,
                    max_batched_tokens=256 if tiny else 8192, kv_gib=0.01 if tiny else 4.0,
                    prompt_kv_gib=0.01 if tiny else 2.0, cb_num_blocks=16 if tiny else None,
                    cb_max_batch_tokens=256 if tiny else None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if len(args.requests) != len(args.concurrency):
        raise SystemExit("--requests needs one count per --concurrency entry")
    return args


class Report:
    """The run's figures, printed as they come and written to ``<out>/gpu_check.json`` after each section."""

    def __init__(self, out: str | None) -> None:
        self.data: dict = {"sections": {}, "errors": {}}
        self.path = Path(out) / "gpu_check.json" if out else None
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def put(self, key: str, value) -> None:
        self.data["sections"][key] = value
        print(f"[{self.elapsed():6.1f}s] {key}: {json.dumps(value, default=str)[:600]}", flush=True)
        self.save()

    def fail(self, key: str, exc: BaseException) -> None:
        self.data["errors"][key] = repr(exc)[:2000]
        print(f"[{self.elapsed():6.1f}s] {key} FAILED: {exc!r}"[:2000], flush=True)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line (``3 passed, 1 failed, 2 skipped in 9.1s``) and the ``EQUIV`` lines
    the equivalence tests print."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text)}
    equiv = [line.strip() for line in text.splitlines() if line.startswith("EQUIV ")]
    return {"counts": counts, "equivalence": equiv}


def run_tests(report: Report, args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-m", "cuda", "-p", "no:cacheprovider",
           "tests/server/test_cuda.py"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.pytest_timeout, cwd=root)
        text, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code = "timeout"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pytest_cuda.txt").write_text(text)
    print(text[-4000:], flush=True)
    report.put("tests", {"command": " ".join(cmd), "exit": code, "seconds": time.perf_counter() - t0,
                         **parse_pytest_summary(text)})


def make_backend(name: str, args: argparse.Namespace):
    from server.model_runner import default_backend

    if name == "flex":
        from server.attention.flex import FlexBackend

        return FlexBackend(q_block_size=args.flex_q_block, kernel_options=args.flex_kernel_options)
    return default_backend(args.device, True, name)


def engine_section(report: Report, args: argparse.Namespace, loaded, prompts: list, backend: str) -> None:
    """All engine legs with one backend (an exception ends them)."""
    import torch

    from server.engine import Engine, EngineConfig

    from .gpu_legs import engine_leg, make_requests, roofline, warm_prompts
    from .gpu_model import random_ids, weight_bytes_per_decode_step

    top = max(args.concurrency)
    cfg = EngineConfig(max_num_seqs=top, max_num_batched_tokens=max(args.max_batched_tokens, top),
                       kv_cache_bytes=int(args.kv_gib * 2**30), prompt_kv_cache_bytes=int(args.prompt_kv_gib * 2**30),
                       max_virtual_tokens=max(args.virtual_tokens, 1), max_waiting=100_000)
    engine = Engine(loaded, cfg, backend=make_backend(backend, args))
    vocab = int(loaded.model.config.vocab_size)

    def reqs(n: int, tasks: int, seed: int):
        return make_requests(prompts, [j % tasks for j in range(n)],
                             random_ids(n, args.text_tokens, vocab, seed), args.new_tokens)

    key = f"engine/{backend}"
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.runner.warm_up(cfg.max_num_batched_tokens, cfg.max_num_seqs)
    warm_prompts(engine, prompts[: args.tasks])
    for c in sorted({1, top}):  # untimed: compiles the shapes of one and of many rows, mixed steps included
        engine_leg(engine, reqs(max(c, 2), args.tasks, 99), c, "warm-up")
    report.put(f"{key}/warm-up", {"seconds": time.perf_counter() - t0})
    legs = {}
    for c, n in zip(args.concurrency, args.requests, strict=True):
        if report.elapsed() > args.budget_s:
            report.put(f"{key}/c{c}", {"skipped": "over --budget-s"})
            continue
        legs[c] = engine_leg(engine, reqs(n, args.tasks, args.seed + c), c, f"{backend} c={c}")
        if c == 1:
            step = legs[c]["decode_step_s_p50"]
            legs[c]["roofline"] = roofline(weight_bytes_per_decode_step(loaded.model), args.hbm_tbps * 1e12, step)
        report.put(f"{key}/c{c}", legs[c])
    for n_tasks in args.task_levels:
        if report.elapsed() > args.budget_s:
            report.put(f"{key}/tasks{n_tasks}", {"skipped": "over --budget-s"})
            continue
        warm_prompts(engine, prompts[:n_tasks])
        leg = engine_leg(engine, reqs(args.requests[-1], n_tasks, args.seed + 7), top, f"{backend} tasks={n_tasks}")
        report.put(f"{key}/tasks{n_tasks}", {"tasks": n_tasks, **leg})
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_sections(report: Report, args: argparse.Namespace, loaded, prompts: list) -> None:
    from .gpu_legs import hf_generate_batch_leg, hf_padded_leg
    from .gpu_model import random_ids

    n, vocab = args.requests[-1], int(loaded.model.config.vocab_size)
    tasks = [j % args.tasks for j in range(n)]
    ids = random_ids(n, args.text_tokens, vocab, args.seed + max(args.concurrency))
    for name, run in (("hf-padded-batch", lambda: hf_padded_leg(loaded.model, prompts, tasks, ids, args.new_tokens)),
                      ("hf-generate-batch", lambda: hf_generate_batch_leg(
                          loaded.model, [random_ids(1, args.virtual_tokens, vocab, j)[0] + r for j, r in
                                         enumerate(ids)], args.new_tokens, args.cb_num_blocks,
                          args.cb_max_batch_tokens))):
        if report.elapsed() > args.budget_s:
            report.put(name, {"skipped": "over --budget-s"})
            continue
        try:
            report.put(name, run())
        except Exception as exc:  # noqa: BLE001 - a peer's failure is recorded, the run goes on
            report.fail(name, exc)


def summary(report: Report, args: argparse.Namespace) -> dict:
    """The issue's targets, from whatever ran (None where a figure is missing)."""
    s = report.data["sections"]
    eng = next((k.split("/")[1] for k in s if k.startswith("engine/") and k.endswith(f"/c{max(args.concurrency)}")
                and "tokens_per_s" in s[k]), None)

    def tps(key: str):
        return s.get(key, {}).get("tokens_per_s")

    top = tps(f"engine/{eng}/c{max(args.concurrency)}") if eng else None
    pad = tps("hf-padded-batch")
    one, many = (tps(f"engine/{eng}/tasks{n}") if eng else None for n in (min(args.task_levels),
                                                                         max(args.task_levels)))
    frac = (s.get(f"engine/{eng}/c1", {}).get("roofline") or {}).get("fraction") if eng else None
    return {"backend": eng, "tokens_per_s_top": top, "target_20000": top is not None and top >= 20000,
            "vs_padded_batch": top / pad if top and pad else None, "target_5x_padded": bool(top and pad and
                                                                                          top >= 5 * pad),
            "roofline_fraction_batch1": frac, "target_50pct_roofline": frac is not None and frac >= 0.5,
            "many_vs_one_task": many / one if many and one else None,
            "target_095": bool(many and one and many >= 0.95 * one)}


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every section ran (targets missed still return 0), 1 otherwise."""
    args = resolve(build_parser().parse_args(argv))
    import torch

    report = Report(args.out)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: use --tiny for the CPU run", file=sys.stderr)
        return 2
    args.device = "cuda" if cuda and not args.tiny else "cpu"
    report.put("environment", {**environment(), "args": {k: v for k, v in vars(args).items()}})
    if not args.skip_tests and cuda:
        try:
            run_tests(report, args)
        except Exception as exc:  # noqa: BLE001
            report.fail("tests", exc)
    from .gpu_model import build_model, loaded_model, random_prompts

    dtype = torch.float32 if args.tiny else torch.bfloat16
    t0 = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA_1B, args.device, dtype, args.seed)
    loaded = loaded_model(model, "tiny" if args.tiny else "llama-3.2-1b-shaped (random)")
    prompts = random_prompts(model, max([args.tasks, *args.task_levels]), args.virtual_tokens, args.seed)
    report.put("model", {"shape": "tiny" if args.tiny else "llama-3.2-1b", "dtype": str(dtype),
                         "parameters": sum(p.numel() for p in model.parameters()), "prompts": len(prompts),
                         "seconds": time.perf_counter() - t0})
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        try:
            engine_section(report, args, loaded, prompts, b)
            if not args.all_backends:
                break
        except Exception as exc:  # noqa: BLE001 - recorded; the next backend gives the fallback figures
            report.fail(f"engine/{b}", exc)
    if not args.skip_hf:
        hf_sections(report, args, loaded, prompts)
    report.put("summary", summary(report, args))
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
