"""Evaluate soft prompts against the untouched model and prompt engineering, on held-out data.

Conditions, all in one run, all greedy (temperature 0), each row generated alone by the server's own engine. The
prompt-engineering baselines (:data:`BASELINES`):

* ``base``: the input alone, no soft prompt (``POST /v1/generate`` with ``{"inputs": input}``);
* ``instruction``: the task's instruction prepended as text, ``instruction + input`` (plain string
  concatenation, nothing added between; the instruction file's text is used verbatim, so it carries its own
  trailing newline or space) on ``POST /v1/generate``;
* ``instruction_chat``: the same ``instruction + input`` as one user message of the base model's chat template
  (``POST /v1/chat/completions`` with the base model's id): how an instruct model is meant to be prompted;
* ``few_shot``: the instruction plus ``k`` solved examples from the training data, then the input, as text,
  scored on the first non-empty line of the output (the line the examples put the answer on);
  ``few_shot_chat``: the same examples as chat turns (:mod:`training.fewshot`).

Then one condition per soft prompt, named by the caller (``--prompt NAME=DIR``; a lone ``--prompt DIR`` is
``soft_prompt``): the input with that prompt (``POST /v1/tasks/{task}/generate``), or, for a prompt trained with
``--chat-template``, the chat-rendered input with the prompt (``/v1/chat/completions`` with the task as
``model``). Prompt tuning, p-tuning and prefix tuning adapters are all served this way.

Metrics: **exact match** of the generated text and the expected output, both stripped of surrounding whitespace
(:func:`exact_match`), and the same ignoring case (:func:`exact_match_ci`). Generation stops at EOS (or the
end-of-turn token), a stop string, or after ``max_new_tokens`` (default: the longest expected output in tokens
+ 4), so an answer followed by more text is a miss. ``first_line`` (the first non-empty line of the output,
stripped, equals the expected output) is reported as a diagnostic: it tells "right answer, then kept talking"
from "wrong answer".

Two back ends (:mod:`training.eval_backends`): ``EngineBackend`` runs :class:`server.engine.Engine` in this
process, with the adapters loaded by :func:`prompt_store.formats.load_path` and registered with
:class:`prompt_store.registry.PromptRegistry`, as the server does; ``HTTPBackend`` calls a running server.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from training.data import Row
from training.fewshot import answer_line, few_shot_messages, few_shot_text

BASELINES = ("base", "instruction", "instruction_chat", "few_shot", "few_shot_chat")
#: The condition name of a prompt given without a name (``--prompt DIR``).
DEFAULT_PROMPT = "soft_prompt"
#: The conditions of a run with one unnamed prompt and no few-shot examples (the original four).
CONDITIONS = ("base", "instruction", "instruction_chat", DEFAULT_PROMPT)
LABELS = {"base": "base model", "instruction": "instruction (text)", "instruction_chat": "instruction (chat)",
          "few_shot": "few-shot (text)", "few_shot_chat": "few-shot (chat)", DEFAULT_PROMPT: "soft prompt",
          "prompt_tuning": "prompt tuning", "p_tuning": "p-tuning", "prefix_tuning": "prefix tuning"}
METRIC = "exact match after stripping whitespace"
METRIC_CI = "exact match after stripping whitespace, ignoring case"


@dataclass(frozen=True)
class Job:
    """One generation.

    Attributes:
        condition: the condition it belongs to.
        row: index of its row in the evaluated rows.
        text: sent as plain input (``chat=False``) or as the last user message of a chat.
        chat: rendered by the chat template (``history`` turns, then ``text`` as a user message).
        prompt: name of the soft prompt prepended (a key of the back end's prompts), or None.
        history: earlier chat turns, ``(role, content)`` pairs (few-shot chat); only with ``chat``.
        stop: stop strings; the output is cut before the first one (no built-in condition uses them).
        answer_line: score only the first non-empty line of the output (few-shot text form).
    """

    condition: str
    row: int
    text: str
    chat: bool
    prompt: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    stop: tuple[str, ...] = ()
    answer_line: bool = False

    @property
    def soft_prompt(self) -> bool:
        return self.prompt is not None

    def messages(self) -> list[dict[str, str]]:
        """The chat messages (``history`` + ``text`` as the user's), OpenAI-style dicts."""
        return [{"role": r, "content": c} for r, c in self.history] + [{"role": "user", "content": self.text}]


@dataclass(frozen=True)
class Generation:
    """The output of one :class:`Job`: text, finish reason ("stop"/"length"), or ``error`` (text is then "")."""

    text: str
    finish_reason: str | None = None
    error: str | None = None


def exact_match(output: str, expected: str) -> bool:
    """``output.strip() == expected.strip()``."""
    return output.strip() == expected.strip()


def exact_match_ci(output: str, expected: str) -> bool:
    """Exact match ignoring case: ``output.strip().casefold() == expected.strip().casefold()``."""
    return output.strip().casefold() == expected.strip().casefold()


def first_line_match(output: str, expected: str) -> bool:
    """The first non-empty line of ``output``, stripped, equals ``expected.strip()`` (a diagnostic)."""
    for line in output.splitlines():
        if line.strip():
            return line.strip() == expected.strip()
    return expected.strip() == ""


def default_conditions(instruction: str | None, shots: list[Row] | None, prompts: dict[str, bool]) -> tuple[str, ...]:
    """Every condition the inputs allow: ``base``; the instruction ones with an instruction; the few-shot ones
    with examples; then each prompt, in the given order."""
    out = ["base"]
    if instruction is not None:
        out += ["instruction", "instruction_chat"]
    if shots:
        out += ["few_shot", "few_shot_chat"]
    return tuple(out) + tuple(prompts)


def make_jobs(rows: list[Row], conditions: tuple[str, ...], instruction: str | None, soft_prompt_chat: bool = False,
              *, prompts: dict[str, bool] | None = None, shots: list[Row] | None = None) -> list[Job]:
    """The generations of a run: every row under every condition (row-major).

    Args:
        prompts: prompt name -> served on the chat template; default ``{"soft_prompt": soft_prompt_chat}``.
        shots: the few-shot examples (:func:`training.fewshot.pick_shots`), for the few-shot conditions.

    Raises:
        ValueError: an unknown condition, an instruction condition without an instruction, or a few-shot
            condition without examples.
    """
    prompts = {DEFAULT_PROMPT: soft_prompt_chat} if prompts is None else prompts
    bad = [c for c in conditions if c not in BASELINES and c not in prompts]
    if bad:
        raise ValueError(f"unknown conditions {bad}; choose from {', '.join(BASELINES + tuple(prompts))}")
    if instruction is None and any(c.startswith("instruction") for c in conditions):
        raise ValueError("the instruction conditions need an instruction file (--instruction-file)")
    if not shots and any(c.startswith("few_shot") for c in conditions):
        raise ValueError("the few-shot conditions need examples (--shots-from, --shots >= 1)")
    jobs = []
    for i, row in enumerate(rows):
        for c in conditions:
            if c == "base":
                jobs.append(Job(c, i, row.input, False))
            elif c == "instruction":
                jobs.append(Job(c, i, instruction + row.input, False))  # type: ignore[operator]
            elif c == "instruction_chat":
                jobs.append(Job(c, i, instruction + row.input, True))  # type: ignore[operator]
            elif c == "few_shot":
                jobs.append(Job(c, i, few_shot_text(instruction, shots, row.input), False,  # type: ignore[arg-type]
                                answer_line=True))
            elif c == "few_shot_chat":
                msgs = few_shot_messages(instruction, shots, row.input)  # type: ignore[arg-type]
                jobs.append(Job(c, i, msgs[-1][1], True, history=msgs[:-1]))
            else:
                jobs.append(Job(c, i, row.input, prompts[c], prompt=c))
    return jobs


def default_max_new_tokens(tokenizer, rows: list[Row]) -> int:
    """Longest expected output in tokens (``add_special_tokens=False``) + 4: room for the EOS and a little
    more, so an answer followed by extra text is seen as such."""
    return max(len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) for r in rows) + 4


def score(rows: list[Row], jobs: list[Job], gens: list[Generation], conditions: tuple[str, ...]) -> dict:
    """Per-condition counts and per-row results.

    Returns:
        ``{"summary": {condition: {"total", "exact", "exact_ci", "first_line", "errors", "exact_match",
        "exact_match_ci", "first_line_match"}}, "rows": [{"line", "input", "expected", "results": {condition:
        {"output", "answer", "exact", "exact_ci", "first_line", "finish_reason", "error"}}}]}``: ``output`` is the
        generated text, ``answer`` the part scored (the output, or its first non-empty line for a job with
        ``answer_line``); the ``*_match`` values are fractions in [0, 1]; a row with an error counts as a miss.
    """
    per_row: list[dict] = [{"line": r.line, "input": r.input, "expected": r.output, "results": {}} for r in rows]
    summary = {c: {"total": len(rows), "exact": 0, "exact_ci": 0, "first_line": 0, "errors": 0} for c in conditions}
    for job, gen in zip(jobs, gens, strict=True):
        expected = rows[job.row].output
        answer = answer_line(gen.text) if job.answer_line else gen.text
        ok = gen.error is None and exact_match(answer, expected)
        ci = gen.error is None and exact_match_ci(answer, expected)
        fl = gen.error is None and first_line_match(answer, expected)
        s = summary[job.condition]
        s["exact"] += ok
        s["exact_ci"] += ci
        s["first_line"] += fl
        s["errors"] += gen.error is not None
        per_row[job.row]["results"][job.condition] = {"output": gen.text, "answer": answer, "exact": ok,
                                                      "exact_ci": ci, "first_line": fl,
                                                      "finish_reason": gen.finish_reason, "error": gen.error}
    for s in summary.values():
        for count, frac in (("exact", "exact_match"), ("exact_ci", "exact_match_ci"), ("first_line",
                                                                                         "first_line_match")):
            s[frac] = s[count] / s["total"] if s["total"] else 0.0
    return {"summary": summary, "rows": per_row}


def evaluate(rows: list[Row], backend, *, conditions: tuple[str, ...] | None = None, instruction: str | None,
             max_new_tokens: int, soft_prompt_chat: bool = False, prompts: dict[str, bool] | None = None,
             shots: list[Row] | None = None, progress: bool = True) -> dict:
    """Generate every job with ``backend`` and score it; see :func:`score` (adds ``seconds``, wall time).

    ``conditions`` None: :func:`default_conditions`. ``prompts`` / ``shots``: as for :func:`make_jobs`.
    """
    prompts = {DEFAULT_PROMPT: soft_prompt_chat} if prompts is None else prompts
    if conditions is None:
        conditions = default_conditions(instruction, shots, prompts)
    jobs = make_jobs(rows, conditions, instruction, prompts=prompts, shots=shots)
    t0 = time.perf_counter()
    gens = backend.run(jobs, max_new_tokens, progress)
    res = score(rows, jobs, gens, conditions)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def format_table(task: str, result: dict) -> str:
    """A plain-text table: one line per condition with exact-match (case-sensitive and not) and first-line
    counts and percentages, and errors."""
    lines = [f"task {task}: {METRIC} (case-insensitive: ignoring case)",
             f"{'condition':<20} {'exact match':>17} {'case-insensitive':>17} {'first line':>17} {'errors':>7}"]
    for c, s in result["summary"].items():
        cells = " ".join(f"{s[k]:>5}/{s['total']:<4} {100 * s[f]:6.1f}%" for k, f in (
            ("exact", "exact_match"), ("exact_ci", "exact_match_ci"), ("first_line", "first_line_match")))
        lines.append(f"{LABELS.get(c, c):<20} {cells} {s['errors']:>7}")
    return "\n".join(lines)


def write_json(path: Path, task: str, data: str, mode: str, instruction: str | None, max_new_tokens: int,
               result: dict, **extra) -> None:
    """Write the run (summary + per-row results, plus ``extra`` keys such as ``shots`` and ``prompts``) as JSON."""
    doc = {"task": task, "data": str(data), "mode": mode, "metric": METRIC, "metric_ci": METRIC_CI,
           "instruction": instruction, "max_new_tokens": max_new_tokens, **extra, **result}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def __getattr__(name: str):
    """``EngineBackend`` / ``HTTPBackend`` live in :mod:`training.eval_backends`; importable from here too."""
    if name in ("EngineBackend", "HTTPBackend"):
        from training import eval_backends

        return getattr(eval_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
