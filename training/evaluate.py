"""Evaluate a soft prompt against the untouched model and a hand-written instruction, on held-out data.

Conditions, all in one run, all greedy (temperature 0), each row generated alone by the server's own engine:

* ``base``: the input alone, no soft prompt (``POST /v1/generate`` with ``{"inputs": input}``);
* ``instruction``: the task's instruction prepended as text, ``instruction + input`` (plain string
  concatenation, nothing added between; the instruction file's text is used verbatim, so it carries its own
  trailing newline or space) on ``POST /v1/generate``;
* ``instruction_chat``: the same ``instruction + input`` as one user message of the base model's chat template
  (``POST /v1/chat/completions`` with the base model's id): how an instruct model is meant to be prompted;
* ``soft_prompt``: the input with the task's soft prompt (``POST /v1/tasks/{task}/generate``), or, for a prompt
  trained with ``--chat-template``, the chat-rendered input with the prompt (``/v1/chat/completions`` with the
  task as ``model``).

Metric: **exact match** of the generated text and the expected output, both stripped of surrounding whitespace.
Generation stops at EOS or after ``max_new_tokens`` (default: the longest expected output in tokens + 4), so an
answer followed by more text is a miss. ``first_line`` (the first non-empty line of the output, stripped, equals
the expected output) is reported as a diagnostic: it tells "right answer, then kept talking" from "wrong answer".

Two back ends: :class:`EngineBackend` runs :class:`server.engine.Engine` in this process, with the adapter loaded
by :func:`prompt_store.formats.load_path` and registered with :class:`prompt_store.registry.PromptRegistry`, as
the server does; :class:`HTTPBackend` calls a running server.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from training.data import Row

CONDITIONS = ("base", "instruction", "instruction_chat", "soft_prompt")
LABELS = {"base": "base model", "instruction": "instruction (text)", "instruction_chat": "instruction (chat)",
          "soft_prompt": "soft prompt"}
METRIC = "exact match after stripping whitespace"


@dataclass(frozen=True)
class Job:
    """One generation: ``text`` is sent as plain input (``chat=False``) or as one chat user message;
    ``soft_prompt`` says whether the task's prompt is prepended."""

    condition: str
    row: int
    text: str
    chat: bool
    soft_prompt: bool


@dataclass(frozen=True)
class Generation:
    """The output of one :class:`Job`: text, finish reason ("stop"/"length"), or ``error`` (text is then "")."""

    text: str
    finish_reason: str | None = None
    error: str | None = None


def exact_match(output: str, expected: str) -> bool:
    """``output.strip() == expected.strip()``."""
    return output.strip() == expected.strip()


def first_line_match(output: str, expected: str) -> bool:
    """The first non-empty line of ``output``, stripped, equals ``expected.strip()`` (a diagnostic)."""
    for line in output.splitlines():
        if line.strip():
            return line.strip() == expected.strip()
    return expected.strip() == ""


def make_jobs(rows: list[Row], conditions: tuple[str, ...], instruction: str | None,
              soft_prompt_chat: bool) -> list[Job]:
    """The generations of a run: every row under every condition (row-major).

    Raises:
        ValueError: an unknown condition, or an instruction condition without an instruction.
    """
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown conditions {bad}; choose from {', '.join(CONDITIONS)}")
    if instruction is None and any(c.startswith("instruction") for c in conditions):
        raise ValueError("the instruction conditions need an instruction file (--instruction-file)")
    jobs = []
    for i, row in enumerate(rows):
        for c in conditions:
            if c == "base":
                jobs.append(Job(c, i, row.input, False, False))
            elif c == "instruction":
                jobs.append(Job(c, i, instruction + row.input, False, False))  # type: ignore[operator]
            elif c == "instruction_chat":
                jobs.append(Job(c, i, instruction + row.input, True, False))  # type: ignore[operator]
            else:
                jobs.append(Job(c, i, row.input, soft_prompt_chat, True))
    return jobs


def default_max_new_tokens(tokenizer, rows: list[Row]) -> int:
    """Longest expected output in tokens (``add_special_tokens=False``) + 4: room for the EOS and a little
    more, so an answer followed by extra text is seen as such."""
    return max(len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) for r in rows) + 4


class EngineBackend:
    """Generations by the server's engine in this process.

    Args:
        loaded: the base model (as the server loads it).
        task: the task name the prompt is registered under.
        prompt_path: a PEFT adapter directory or RAW ``.safetensors`` file; None when no job uses the prompt.
        max_num_seqs: rows decoded together.

    Raises:
        prompt_store.errors.PromptError: the adapter cannot be loaded (same checks as the server's).
    """

    def __init__(self, loaded, task: str, prompt_path: Path | None, max_num_seqs: int = 64) -> None:
        from prompt_store.formats import Limits, load_path
        from prompt_store.registry import PromptRegistry

        self.loaded, self.task, self.max_num_seqs = loaded, task, max_num_seqs
        self.prompt = None
        if prompt_path is not None:
            parsed = load_path(Path(prompt_path), Limits(loaded.hidden_size, max_virtual_tokens=1024))
            self.prompt, _ = PromptRegistry().put(task, parsed, str(prompt_path))

    def run(self, jobs: list[Job], max_new_tokens: int, progress: bool = True) -> list[Generation]:
        """Submit every job at once (the engine batches them), wait for all; one :class:`Generation` per job."""
        from tqdm.auto import tqdm

        from server.engine import Engine, EngineConfig
        from server.kv_pool import kv_bytes_per_token, model_kv_shape
        from server.request import SamplingParams
        from server.request_builder import make_request
        from training.data import input_ids_for

        tok = self.loaded.tokenizer
        nv = self.prompt.num_virtual_tokens if self.prompt is not None else 0
        ids = [input_ids_for(tok, j.text, j.chat) if j.chat else None for j in jobs]
        longest = max((len(i) if i is not None else len(tok(j.text)["input_ids"])) for i, j in zip(ids, jobs,
                                                                                                    strict=True))
        per_seq = nv + longest + max_new_tokens + 16
        bpt = kv_bytes_per_token(*model_kv_shape(self.loaded.model.config), self.loaded.dtype)
        kv = bpt * per_seq * self.max_num_seqs * 2
        engine = Engine(self.loaded, EngineConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max(2048, self.max_num_seqs),
            kv_cache_bytes=max(kv, 16 * 1024**2), prompt_kv_cache_bytes=16 * 1024**2,
            max_virtual_tokens=max(128, nv), max_waiting=len(jobs) + 1,
        ))
        engine.start()
        params = SamplingParams(max_new_tokens=max_new_tokens)
        results: list[Generation] = []
        try:
            streams = []
            for job, tids in zip(jobs, ids, strict=True):
                prompt = self.prompt if job.soft_prompt else None
                if job.soft_prompt and prompt is None:
                    raise ValueError("a soft_prompt job needs prompt_path")
                try:
                    req = make_request(engine, prompt, job.text, params, token_ids=tids)
                    streams.append(engine.submit(req))
                except ValueError as exc:  # server.engine.RequestRejectedError included
                    streams.append(exc)
            for s in tqdm(streams, disable=not progress, desc="eval", unit="req"):
                if isinstance(s, Exception):
                    results.append(Generation("", None, str(s)))
                    continue
                parts, last = [], None
                for out in s.iter_sync():
                    parts.append(out.text)
                    last = out
                if last is not None and last.finish_reason == "error":
                    results.append(Generation("", "error", last.error or "engine error"))
                else:
                    results.append(Generation("".join(parts), last.finish_reason if last else None))
        finally:
            engine.stop()
        return results


class HTTPBackend:
    """Generations by a running server, ``concurrency`` requests in flight (so the server batches them).

    Args:
        url: server base URL.
        http: an ``httpx.Client``-like object to use instead of a new one (tests pass a FastAPI TestClient).
    """

    def __init__(self, url: str, task: str, http=None, concurrency: int = 16, timeout: float = 600.0) -> None:
        import httpx

        self.task, self.concurrency = task, concurrency
        self._own = http is None
        self.http = http if http is not None else httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._base_id: str | None = None

    def base_model_id(self) -> str:
        if self._base_id is None:
            resp = self.http.get("/v1/models")
            resp.raise_for_status()
            self._base_id = resp.json()["data"][0]["id"]
        return self._base_id

    def _one(self, job: Job, max_new_tokens: int) -> Generation:
        try:
            if job.chat:
                model = self.task if job.soft_prompt else self.base_model_id()
                body = {"model": model, "messages": [{"role": "user", "content": job.text}],
                        "max_tokens": max_new_tokens, "temperature": 0.0}
                resp = self.http.post("/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    return Generation("", None, f"HTTP {resp.status_code}: {resp.text[:300]}")
                choice = resp.json()["choices"][0]
                return Generation(choice["message"]["content"], choice["finish_reason"])
            path = f"/v1/tasks/{self.task}/generate" if job.soft_prompt else "/v1/generate"
            resp = self.http.post(path, json={"inputs": job.text, "parameters": {"max_new_tokens": max_new_tokens}})
            if resp.status_code != 200:
                return Generation("", None, f"HTTP {resp.status_code}: {resp.text[:300]}")
            data = resp.json()
            return Generation(data["generated_text"], data["finish_reason"])
        except Exception as exc:  # noqa: BLE001 - a failed request is a row's error, not the run's
            return Generation("", None, f"{type(exc).__name__}: {exc}")

    def run(self, jobs: list[Job], max_new_tokens: int, progress: bool = True) -> list[Generation]:
        from tqdm.auto import tqdm

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                it = pool.map(lambda j: self._one(j, max_new_tokens), jobs)
                return list(tqdm(it, total=len(jobs), disable=not progress, desc="eval", unit="req"))
        finally:
            if self._own:
                self.http.close()


def score(rows: list[Row], jobs: list[Job], gens: list[Generation], conditions: tuple[str, ...]) -> dict:
    """Per-condition counts and per-row results.

    Returns:
        ``{"summary": {condition: {"total", "exact", "first_line", "errors", "exact_match", "first_line_match"}},
        "rows": [{"line", "input", "expected", "results": {condition: {"output", "exact", "first_line",
        "finish_reason", "error"}}}]}``; ``exact_match`` / ``first_line_match`` are fractions in [0, 1]; a row with
        an error counts as a miss.
    """
    per_row: list[dict] = [{"line": r.line, "input": r.input, "expected": r.output, "results": {}} for r in rows]
    summary = {c: {"total": len(rows), "exact": 0, "first_line": 0, "errors": 0} for c in conditions}
    for job, gen in zip(jobs, gens, strict=True):
        expected = rows[job.row].output
        ok = gen.error is None and exact_match(gen.text, expected)
        fl = gen.error is None and first_line_match(gen.text, expected)
        s = summary[job.condition]
        s["exact"] += ok
        s["first_line"] += fl
        s["errors"] += gen.error is not None
        per_row[job.row]["results"][job.condition] = {"output": gen.text, "exact": ok, "first_line": fl,
                                                      "finish_reason": gen.finish_reason, "error": gen.error}
    for s in summary.values():
        s["exact_match"] = s["exact"] / s["total"] if s["total"] else 0.0
        s["first_line_match"] = s["first_line"] / s["total"] if s["total"] else 0.0
    return {"summary": summary, "rows": per_row}


def evaluate(rows: list[Row], backend, *, conditions: tuple[str, ...] = CONDITIONS, instruction: str | None,
             max_new_tokens: int, soft_prompt_chat: bool = False, progress: bool = True) -> dict:
    """Generate every job with ``backend`` and score it; see :func:`score` (adds ``seconds``)."""
    jobs = make_jobs(rows, conditions, instruction, soft_prompt_chat)
    t0 = time.perf_counter()
    gens = backend.run(jobs, max_new_tokens, progress)
    res = score(rows, jobs, gens, conditions)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def format_table(task: str, result: dict) -> str:
    """A plain-text table: one line per condition with exact-match and first-line counts and percentages."""
    lines = [f"task {task}: {METRIC}",
             f"{'condition':<22} {'exact match':>18} {'first line':>18} {'errors':>7}"]
    for c, s in result["summary"].items():
        lines.append(f"{LABELS.get(c, c):<22} {s['exact']:>5}/{s['total']:<4} {100 * s['exact_match']:6.1f}% "
                     f"{s['first_line']:>5}/{s['total']:<4} {100 * s['first_line_match']:6.1f}% {s['errors']:>7}")
    return "\n".join(lines)


def write_json(path: Path, task: str, data: str, mode: str, instruction: str | None, max_new_tokens: int,
               result: dict) -> None:
    """Write the run (summary + per-row results) as JSON."""
    doc = {"task": task, "data": str(data), "mode": mode, "metric": METRIC, "instruction": instruction,
           "max_new_tokens": max_new_tokens, **result}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
