"""``softprompt train``, ``softprompt eval`` and ``softprompt eval-report``: argument parsing and entry points.

:func:`register` adds them to the root command (:mod:`softprompt_cli`), which hands everything after the
subcommand to :func:`train_main` / :func:`eval_main` (:mod:`training.eval_cli`) / :func:`report_main`
(:mod:`training.report`); their heavy imports happen only when the subcommand runs. Each returns an exit status:
0 success, 1 a failed upload or server error, 2 bad input (a bad data file, bad options, a model or prompt that
cannot be loaded).

Examples::

    softprompt train --task date-format --data examples/tasks/date-format/train.jsonl --steps 150 \\
        --out examples/prompts/date-format
    softprompt eval --task date-format --data examples/tasks/date-format/test.jsonl \\
        --prompt examples/prompts/date-format --json date-format-eval.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.eval_cli import _recorded_template, eval_main, eval_parser  # noqa: F401 (re-exported)


def register(sub) -> None:
    """Add ``train``, ``eval`` and ``eval-report`` to the root command's subparsers; each parses its own flags."""
    sub.add_parser("train", help="train a soft prompt on the frozen base model (PEFT adapter directory)",
                   add_help=False).set_defaults(argv_func=train_main)
    sub.add_parser("eval", help="compare base model, instruction, few-shot and soft prompts on held-out data",
                   add_help=False).set_defaults(argv_func=eval_main)
    sub.add_parser("eval-report", help="tables (markdown) and a bar chart of the eval results of every task",
                   add_help=False).set_defaults(argv_func=report_main)


def _model_and_cache(model: str | None):
    from server.config import Settings

    settings = Settings()
    return (model if model is not None else settings.model), settings.cache_dir


def train_parser() -> argparse.ArgumentParser:
    from training.peft_setup import DEFAULT_LR, METHODS, PREFIX_PROJECTION_LR

    p = argparse.ArgumentParser(prog="softprompt train", description="Train a soft prompt (PEFT prompt tuning, "
                                "p-tuning or prefix tuning) on the frozen base model and save a PEFT adapter "
                                "directory.")
    p.add_argument("--task", required=True, help="task name (as served: /v1/tasks/{task}/generate)")
    p.add_argument("--data", required=True, type=Path, help='JSONL file of {"input": ..., "output": ...} rows')
    p.add_argument("--model", default=None, help="model directory or .gguf (default: $SOFTPROMPT_MODEL, else the "
                   "default SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHODS, default=METHODS[0],
                   help="prefix_tuning: a key/value prefix for every layer (PEFT PrefixTuningConfig)")
    p.add_argument("--prefix-projection", action="store_true", help="prefix tuning through PEFT's two-layer MLP "
                   "(width --encoder-hidden-size); the saved prefix has the same shape either way")
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--init", default=None, help='prompt tuning init: text:"words", random or vocab '
                   "(default vocab: embeddings of random vocabulary tokens); p-tuning ignores it, prefix tuning "
                   "refuses it")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data instead of --steps")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: " + ", ".join(
        f"{lr:g} {m}" for m, lr in DEFAULT_LR.items()) + f", {PREFIX_PROJECTION_LR:g} prefix_tuning with "
        "--prefix-projection)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps, at most 20")
    p.add_argument("--encoder-hidden-size", type=int, default=None, help="MLP width of p-tuning or of "
                   "--prefix-projection (default: the model's hidden size)")
    p.add_argument("--out", type=Path, default=None, help="adapter directory (default: prompts/<task>)")
    p.add_argument("--chat-template", action="store_true", help="train on the model's chat template "
                   "(input as a user message, as /v1/chat/completions does)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--upload", metavar="URL", default=None, help="after saving, upload to this server's admin API")
    p.add_argument("--admin-token", default=None, help="for --upload (default: $SOFTPROMPT_ADMIN_TOKEN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def train_main(argv: list[str] | None = None, *, loaded=None, upload_client=None) -> int:
    """Run ``softprompt train``. ``loaded`` / ``upload_client`` replace the model and HTTP client (tests)."""
    args = train_parser().parse_args(argv)
    import torch

    from prompt_store.errors import PromptError
    from prompt_store.formats import validate_task_name
    from server.model_loader import ModelLoadError, load_model
    from training.adapter import upload_adapter
    from training.data import DataError
    from training.train import TrainConfig, TrainingError, result_summary, train

    prog = "softprompt train"
    try:
        validate_task_name(args.task)
    except PromptError as exc:
        print(f"{prog}: --task: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else Path("prompts") / args.task
    cfg = TrainConfig(
        task=args.task, data=args.data, out=out, method=args.method, num_virtual_tokens=args.num_virtual_tokens,
        init=args.init, steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, chat_template=args.chat_template, warmup_steps=args.warmup_steps,
        encoder_hidden_size=args.encoder_hidden_size, prefix_projection=args.prefix_projection,
        progress=not args.no_progress,
    )
    try:
        if loaded is None:
            model, cache = _model_and_cache(args.model)
            loaded = load_model(model, cache_dir=cache, device=args.device, dtype="float32")
        print(f"model {loaded.model_id} on {loaded.device}: hidden size {loaded.hidden_size}, "
              f"context {loaded.max_context} tokens")
        res = train(loaded, cfg)
    except (DataError, TrainingError, ModelLoadError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(result_summary(res))
    if args.upload or upload_client is not None:
        from server.client import SoftpromptError

        token = args.admin_token or os.environ.get("SOFTPROMPT_ADMIN_TOKEN")
        try:
            meta = upload_adapter(out, args.task, args.upload, token, client=upload_client)
        except (SoftpromptError, OSError) as exc:
            print(f"{prog}: upload failed: {exc}", file=sys.stderr)
            return 1
        print(f"uploaded {args.task}: {meta['action']}, version {meta['version']}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """Run ``softprompt eval-report`` (:func:`training.report.main`)."""
    from training.report import main

    return main(argv)
