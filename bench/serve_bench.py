"""``softprompt bench``: scenarios against a live server over HTTP, with peers in the same run, one table, a plot.

The run, in order:

1. preflight (the server answers ``/ready`` and takes the admin token), then load the base model here (for its
   hidden size, the tokenizer, the FLOP model and the Hugging Face peers);
2. each ``--scenario`` (``standard``, ``long``, ``many-tasks``, ``offered-load``; see ``bench/scenarios.py``):
   upload its tasks as ``bench-00000``, ... through the admin API, run the server leg (streamed requests), then
   the peers one after the other (vLLM over HTTP with ``prompt_embeds`` when ``--vllm`` is given, Hugging Face
   ``generate`` as one padded batch and one request at a time), then delete the tasks;
3. print one table (rows: scenario x system), the many-tasks and prefill figures, and write ``--json`` /
   ``--plot``.

Every workload is seeded: soft prompts ``[virtual_tokens, hidden_size]`` are rows of the model's input-embedding
matrix plus small noise, texts tokenize to exactly the requested number of tokens, decoding is greedy. Units:
tokens/s is completion tokens (EOS included) / wall-clock s; TTFT and latency are client-side seconds. Requests
may stop early at EOS, so actual token counts are used and early stops are reported. The load average is printed
at the start of every leg: other work on the machine skews every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .scenarios import SCENARIOS


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from exc


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="softprompt bench", description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of a running server")
    ap.add_argument("--admin-token", default=os.environ.get("SOFTPROMPT_ADMIN_TOKEN"),
                    help="the server's admin token, to upload tasks [env SOFTPROMPT_ADMIN_TOKEN]")
    ap.add_argument("--scenario", action="append", default=None, metavar="NAME",
                    help=f"{'|'.join(SCENARIOS)}|all; repeatable or comma-separated (default: standard)")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompts, texts, task choice and arrivals")
    ap.add_argument("--model", default=None, help="model for the peers and the tokenizer (default: the default)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-request HTTP timeout, seconds")
    ap.add_argument("--json", dest="json_path", default=None, help="write all results to this JSON file")
    ap.add_argument("--plot", dest="plot_path", default=None, help="write the figure to this PNG (matplotlib)")
    g = ap.add_argument_group("request shape (standard; shared by the others where they say so)")
    g.add_argument("--num-tasks", type=int, default=16, help="tasks of standard, long and offered-load")
    g.add_argument("--num-requests", type=int, default=64, help="requests of standard")
    g.add_argument("--concurrency", type=int, default=64, help="most requests in flight (closed-loop scenarios)")
    g.add_argument("--virtual-tokens", type=int, default=20, help="virtual tokens per soft prompt")
    g.add_argument("--text-tokens", type=int, default=20, help="text tokens per request, exact (not long)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per request")
    g = ap.add_argument_group("long")
    g.add_argument("--long-requests", type=int, default=32)
    g.add_argument("--long-text-tokens", type=int, default=480)
    g = ap.add_argument_group("many-tasks")
    g.add_argument("--task-counts", type=_int_list, default=[1, 100, 1000, 5000],
                   help="uniform levels, comma-separated (default 1,100,1000,5000)")
    g.add_argument("--zipf-tasks", type=int, default=1000, help="tasks of the Zipf level (0: no Zipf level)")
    g.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent s (> 0)")
    g.add_argument("--many-requests", type=int, default=192, help="requests per level")
    g.add_argument("--upload-concurrency", type=int, default=8, help="most task uploads/deletes in flight")
    g.add_argument("--server-pid", type=int, default=None,
                   help="server PID for resident memory when /metrics has no process_resident_memory_bytes "
                        "(default: the local process listening on the server's port)")
    g = ap.add_argument_group("offered-load")
    g.add_argument("--rates", type=_float_list, default=None, help="arrival rates, requests/s, comma-separated")
    g.add_argument("--rate-fractions", type=_float_list, default=[0.25, 0.5, 0.8],
                   help="without --rates: fractions of the standard scenario's measured capacity")
    g.add_argument("--load-requests", type=int, default=64, help="requests per rate")
    g = ap.add_argument_group("peers")
    g.add_argument("--no-baseline", action="store_true", help="skip Hugging Face sequential generate")
    g.add_argument("--baseline-requests", type=int, default=None,
                   help="run HF sequential on the first N requests of a scenario only (default: all)")
    g.add_argument("--no-hf-batch", action="store_true", help="skip the Hugging Face padded batch")
    g.add_argument("--vllm", default=None, metavar="URL",
                   help="a running vLLM OpenAI server started with --enable-prompt-embeds")
    g.add_argument("--vllm-model", default=None, help="model name at vLLM (default: first id of /v1/models)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    chosen: list[str] = []
    for item in args.scenario or ["standard"]:
        for name in (x.strip() for x in item.split(",") if x.strip()):
            if name == "all":
                chosen += SCENARIOS
            elif name in SCENARIOS:
                chosen.append(name)
            else:
                ap.error(f"--scenario must be one of {', '.join(SCENARIOS)} or all, got {name!r}")
    args.scenarios = [s for s in SCENARIOS if s in chosen]  # canonical order: offered-load after standard
    counts = ("num_tasks", "num_requests", "concurrency", "virtual_tokens", "text_tokens", "max_new_tokens",
              "long_requests", "long_text_tokens", "many_requests", "upload_concurrency", "load_requests")
    for name in counts + ("baseline_requests",) * (args.baseline_requests is not None):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.task_counts or min(args.task_counts) < 1:
        ap.error(f"--task-counts must be integers >= 1, got {args.task_counts}")
    if max(args.task_counts + [args.zipf_tasks]) > 100_000 or args.num_tasks > 100_000:
        ap.error("task counts must be <= 100000 (tasks are named bench-00000 .. bench-99999)")
    if args.zipf_tasks < 0:
        ap.error(f"--zipf-tasks must be >= 0, got {args.zipf_tasks}")
    if args.zipf_s <= 0:
        ap.error(f"--zipf-s must be > 0, got {args.zipf_s}")
    if args.rates is not None and (not args.rates or min(args.rates) <= 0):
        ap.error(f"--rates must be numbers > 0, got {args.rates}")
    if not args.rate_fractions or min(args.rate_fractions) <= 0:
        ap.error(f"--rate-fractions must be numbers > 0, got {args.rate_fractions}")
    if args.vllm is not None and not args.vllm.startswith(("http://", "https://")):
        ap.error(f"--vllm must be an http(s) URL, got {args.vllm!r}")
    if not args.admin_token:
        ap.error("--admin-token is required (the bench uploads its tasks through /v1/admin)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and write ``--json`` / ``--plot``). Returns 0; 1 if server requests
    failed; 2 if refused (bad flags exit 2 through argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import httpx
    import torch

    from server.config import Settings
    from server.model_loader import load_model

    from .flops import ModelShape
    from .report import masked_command, render, write_json
    from .scenarios import Context, run_scenario
    from .server_leg import BenchError, ServerTarget, preflight
    from .vllm_leg import VllmTarget
    from .workload import PromptBank

    try:
        preflight(args.server, args.admin_token)
        vllm = VllmTarget(args.vllm, args.vllm_model, timeout=args.timeout) if args.vllm else None
    except (BenchError, httpx.HTTPError, ValueError) as exc:
        print(f"softprompt bench: {exc}", file=sys.stderr)
        return 2
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("softprompt bench: --plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
            return 2
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, cache_dir=Settings().cache_dir, device="cpu", dtype="float32")
    bank = PromptBank(loaded.model.get_input_embeddings().weight, args.virtual_tokens, args.seed)
    target = ServerTarget(args.server, args.admin_token, bank, timeout=args.timeout,
                          upload_concurrency=args.upload_concurrency, server_pid=args.server_pid)
    ctx = Context(args, loaded, bank, target, vllm, ModelShape.from_config(loaded.model.config))
    res: dict = {"command": masked_command(argv), "model": loaded.model_id, "cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "server": args.server,
                 "vllm": {"url": args.vllm, "model": vllm.model} if vllm else None, "scenarios": ctx.results}
    print(f"model {loaded.model_id} (hidden {loaded.hidden_size}); scenarios: {', '.join(args.scenarios)}",
          flush=True)
    code = 0
    try:
        for name in args.scenarios:
            ctx.results[name] = run_scenario(ctx, name)
    except (BenchError, httpx.HTTPError) as exc:
        print(f"softprompt bench: {exc!r} (server {args.server}); reporting what finished", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("softprompt bench: interrupted; reporting what finished", file=sys.stderr)
        asyncio.run(target.delete_all())
        code = 130
    res["matmul_peak"] = ctx.peak
    print("\n" + render(res))
    if args.json_path:
        write_json(res, args.json_path)
        print(f"results written to {args.json_path}")
    if args.plot_path and ctx.results:
        from .plot import plot

        plot(res, args.plot_path)
        print(f"figure written to {args.plot_path}")
    return code or (1 if ctx.failed_requests else 0)


if __name__ == "__main__":
    raise SystemExit(main())
