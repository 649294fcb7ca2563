"""``softprompt eval``: argument parsing and the entry point (registered by :mod:`training.cli`).

Exit status: 0 success, 2 bad input (a bad data or shot file, bad options, a model or prompt that cannot be
loaded). Heavy imports happen only when the command runs.

Example (one task, every baseline and three trained prompts, in-process)::

    softprompt eval --task date-format --data examples/tasks/date-format/test_ood.jsonl \\
        --prompt prompt_tuning=prompts/pt/date-format --prompt p_tuning=prompts/ptune/date-format \\
        --prompt prefix_tuning=prompts/prefix/date-format --json examples/tasks/date-format/eval_ood.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: A prompt's condition name (``--prompt NAME=DIR``): the server's task-name pattern.
PROMPT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def eval_parser() -> argparse.ArgumentParser:
    from training.evaluate import BASELINES

    p = argparse.ArgumentParser(prog="softprompt eval", description="Compare the base model, prompt engineering "
                                "(instruction, few-shot) and trained soft prompts on held-out data (exact match).")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, type=Path, help="JSONL test file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="URL", help="evaluate through a running server's HTTP API (the task's "
                       "served prompt is the soft_prompt condition)")
    where.add_argument("--prompt", action="append", metavar="[NAME=]PATH", help="in-process: an adapter directory "
                       "or .safetensors file; repeat with NAME=PATH to evaluate several prompts, one condition "
                       "each (e.g. prompt_tuning=DIR p_tuning=DIR prefix_tuning=DIR); a PATH without NAME= is "
                       "named soft_prompt")
    p.add_argument("--model", default=None, help="in-process base model (default as for train)")
    p.add_argument("--instruction-file", type=Path, default=None,
                   help="hand-written instruction (default: instruction.txt next to --data)")
    p.add_argument("--shots", type=int, default=3, help="few-shot examples (default 3; 0: no few-shot conditions)")
    p.add_argument("--shots-from", type=Path, default=None,
                   help="JSONL file the few-shot examples are drawn from (default: train.jsonl next to --data)")
    p.add_argument("--shots-seed", type=int, default=0, help="seed of the examples' choice (default 0)")
    p.add_argument("--conditions", default=None, help=f"comma-separated subset of {','.join(BASELINES)} and the "
                   "prompt names (default: all that the inputs allow)")
    p.add_argument("--chat-template", action="store_true", default=None, help="serve every soft prompt on the chat "
                   "template (default: per prompt, as recorded in its softprompt_training.json, else plain)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest expected output + 4 tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--json", type=Path, default=None, help="write the summary and per-row results here")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=16, help="server mode: requests in flight")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_prompts(values: list[str] | None) -> dict[str, Path]:
    """``--prompt`` values -> ``{name: path}`` in the given order. ``NAME=PATH`` when the text before the first
    ``=`` is a valid name (:data:`PROMPT_NAME_RE`), else the whole value is a path named ``soft_prompt``.

    Raises:
        ValueError: a name given twice (two unnamed paths included) or the name of a baseline condition.
    """
    from training.evaluate import BASELINES, DEFAULT_PROMPT

    out: dict[str, Path] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not (sep and PROMPT_NAME_RE.fullmatch(name) and path):
            name, path = DEFAULT_PROMPT, v
        if name in BASELINES:
            raise ValueError(f"--prompt {v}: {name!r} is a baseline condition; name the prompt otherwise")
        if name in out:
            raise ValueError(f"--prompt {v}: the name {name!r} is given twice (name each prompt: NAME=PATH)")
        out[name] = Path(path)
    return out


def read_meta(prompt: Path | None) -> dict | None:
    """The adapter's training metadata (``softprompt_training.json``), or None when absent or unreadable."""
    from training.adapter import META_FILE

    if prompt is None or not (Path(prompt) / META_FILE).is_file():
        return None
    try:
        meta = json.loads((Path(prompt) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _recorded_template(prompt: Path | None) -> bool:
    """Whether the adapter was trained on the chat template (its metadata says ``"template": "chat"``)."""
    return (read_meta(prompt) or {}).get("template") == "chat"


def _fail(msg: str) -> int:
    print(f"softprompt eval: {msg}", file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None, *, loaded=None, http=None) -> int:
    """Run ``softprompt eval``. ``loaded`` replaces the in-process model, ``http`` the server client (tests)."""
    args = eval_parser().parse_args(argv)
    from prompt_store.errors import PromptError
    from server.model_loader import ModelLoadError, load_model
    from training.data import DataError, read_rows
    from training.eval_backends import EngineBackend, HTTPBackend
    from training.evaluate import DEFAULT_PROMPT, default_conditions, evaluate, format_table, write_json
    from training.fewshot import pick_shots

    try:
        prompt_paths = parse_prompts(args.prompt)
        rows = read_rows(args.data)
    except (ValueError, DataError) as exc:
        return _fail(str(exc))
    if args.limit:
        rows = rows[:args.limit]
    skip: set[str] = set()
    instruction = None
    ifile = args.instruction_file or args.data.parent / "instruction.txt"
    if ifile.is_file():
        instruction = ifile.read_text(encoding="utf-8")
    elif args.instruction_file is not None:
        return _fail(f"--instruction-file {ifile}: no such file")
    else:
        skip |= {"instruction", "instruction_chat"}
        print(f"no instruction file at {ifile}: skipping the instruction conditions", file=sys.stderr)
    if args.shots < 0:
        return _fail(f"--shots must be >= 0; got {args.shots}")
    shots, sfile = None, args.shots_from or args.data.parent / "train.jsonl"
    if args.shots > 0 and sfile.is_file():
        try:
            shots = pick_shots(read_rows(sfile), args.shots, args.shots_seed, {r.input for r in rows})
        except (DataError, ValueError) as exc:
            return _fail(str(exc))
    elif args.shots > 0 and args.shots_from is not None:
        return _fail(f"--shots-from {sfile}: no such file")
    elif args.shots > 0:
        print(f"no training data at {sfile}: skipping the few-shot conditions", file=sys.stderr)

    if args.server:
        prompt_paths = {}
        prompts_chat = {DEFAULT_PROMPT: bool(args.chat_template)}
    else:
        prompts_chat = {n: args.chat_template if args.chat_template is not None else _recorded_template(p)
                        for n, p in prompt_paths.items()}
    if args.conditions is None:
        conditions = tuple(c for c in default_conditions(instruction, shots, prompts_chat) if c not in skip)
    else:
        conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip() and c.strip() not in skip)
    try:
        if args.server:
            backend = HTTPBackend(args.server, args.task, http=http, concurrency=args.concurrency)
            mode = f"server {args.server}"
            max_new = args.max_new_tokens or _server_max_new(rows, loaded, args)
        else:
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            if loaded is None:
                model, cache = _model_and_cache(args.model)
                loaded = load_model(model, cache_dir=cache, device=args.device, dtype="auto")
            backend = EngineBackend(loaded, args.task, {n: p for n, p in prompt_paths.items() if n in conditions})
            mode = "in-process " + ", ".join(f"{n}={p}" for n, p in prompt_paths.items())
            from training.evaluate import default_max_new_tokens

            max_new = args.max_new_tokens or default_max_new_tokens(loaded.tokenizer, rows)
        result = evaluate(rows, backend, conditions=conditions, instruction=instruction, max_new_tokens=max_new,
                          prompts=prompts_chat, shots=shots, progress=not args.no_progress)
    except (ModelLoadError, PromptError, ValueError) as exc:
        return _fail(str(exc))
    print(f"{len(rows)} rows of {args.data}, {mode}, max_new_tokens {max_new}, {result['seconds']} s")
    if shots:
        print(f"few-shot: {len(shots)} examples from {sfile} (lines {', '.join(str(s.line) for s in shots)}), "
              f"seed {args.shots_seed}")
    print(format_table(args.task, result))
    if args.json:
        shot_doc = None if not shots else {"k": len(shots), "seed": args.shots_seed, "from": str(sfile), "examples": [
            {"line": s.line, "input": s.input, "output": s.output} for s in shots]}
        prompt_doc = {n: {"path": str(prompt_paths[n]) if n in prompt_paths else None,
                          "template": "chat" if prompts_chat[n] else "plain",
                          "training": read_meta(prompt_paths.get(n))} for n in prompts_chat if n in conditions}
        write_json(args.json, args.task, str(args.data), mode, instruction, max_new, result, shots=shot_doc,
                   prompts=prompt_doc)
        print(f"per-row results: {args.json}")
    return 0


def _model_and_cache(model: str | None):
    from server.config import Settings

    settings = Settings()
    return (model if model is not None else settings.model), settings.cache_dir


def _server_max_new(rows, loaded, args) -> int:
    """Server mode without ``--max-new-tokens``: count output tokens with the local tokenizer when one is at hand
    (``loaded`` or the default model's tokenizer files), else 32."""
    from training.evaluate import default_max_new_tokens

    try:
        if loaded is not None:
            return default_max_new_tokens(loaded.tokenizer, rows)
        from transformers import AutoTokenizer

        from server.model_loader import convert_gguf, default_gguf_path

        model, cache = _model_and_cache(args.model)
        path = Path(model) if model is not None and Path(model).is_dir() else convert_gguf(default_gguf_path(), cache)
        return default_max_new_tokens(AutoTokenizer.from_pretrained(path), rows)
    except Exception:  # noqa: BLE001 - a sensible default beats failing an evaluation over a token count
        return 32
