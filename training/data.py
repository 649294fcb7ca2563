"""Training data: reading and validating a JSONL file, and the template that turns a row into token ids and labels.

**Data file.** One JSON object per line: ``{"input": str, "output": str}`` (other keys are ignored; blank lines
are skipped). A bad file raises :class:`DataError`, whose message names every bad line (up to
:data:`MAX_REPORTED`) with its problem: invalid JSON, not an object, missing field, non-string field, empty output
(empty after stripping whitespace), or a row whose virtual + input + output tokens (EOS included) exceed the
model's context.

**Template** (plain, the default) is exactly what the server does for ``POST /v1/tasks/{task}/generate`` with
``{"inputs": input}``::

    input ids  = tokenizer(input)["input_ids"]
    output ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    ids        = [n_virtual virtual tokens] + input ids           + output ids + [EOS]
    labels     = [-100] * n_virtual         + [-100] * len(input ids) + output ids + [EOS]

``tokenizer(input)`` uses the tokenizer's defaults, as ``server.request_builder.make_request`` does (SmolLM2's
adds no BOS). Nothing joins input and output: the server generates the output tokens right after the input's. The
loss covers only the output ids and the EOS; PEFT prepends the ``-100`` labels of the virtual tokens itself.

**Chat template** (``--chat-template``): the input ids are
``tokenizer.apply_chat_template([{"role": "user", "content": input}], add_generation_prompt=True)``, what
``POST /v1/chat/completions`` feeds the model; the output ids are followed by the template's end-of-turn token
(the first token after the assistant's content that is an EOS id of the model, ``<|im_end|>`` for SmolLM2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
#: How many bad lines one :class:`DataError` lists at most.
MAX_REPORTED = 20


class DataError(ValueError):
    """A data file is unusable. ``problems`` is a list of ``(line_number, message)``; line numbers are 1-based
    (0 for problems of the whole file). ``str(error)`` names the file and every listed line."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]], total: int | None = None) -> None:
        self.path, self.problems = str(path), list(problems)
        total = len(problems) if total is None else total
        lines = [f"{self.path}:{n}: {msg}" if n else f"{self.path}: {msg}" for n, msg in problems]
        more = f"\n... and {total - len(problems)} more bad lines" if total > len(problems) else ""
        head = f"{total} bad line{'s' if total != 1 else ''} in {self.path}:\n" if total > 1 else ""
        super().__init__(head + "\n".join(lines) + more)


@dataclass(frozen=True)
class Row:
    """One validated data row. ``line`` is its 1-based line number in the file."""

    line: int
    input: str
    output: str


@dataclass(frozen=True)
class Encoded:
    """One row as token ids (virtual tokens not included; PEFT prepends them).

    Attributes:
        input_ids: ``[len_input + len_output + 1]`` token ids.
        labels: same length; ``-100`` on input positions, the token id on output + end positions.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def num_output(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def read_rows(path: str | Path) -> list[Row]:
    """Read and check the rows of a JSONL data file (format only: fields and types, not token counts).

    Raises:
        DataError: the file is missing or unreadable, holds no rows, or any line is invalid JSON, not an object,
            lacks ``input`` / ``output``, has a non-string one, or has an empty output.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, [(0, f"cannot read the file: {exc}")]) from exc
    rows: list[Row] = []
    problems: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((n, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            problems.append((n, f"expected a JSON object with 'input' and 'output', got a JSON {type(obj).__name__}"))
            continue
        bad = False
        for key in ("input", "output"):
            if key not in obj:
                problems.append((n, f"missing field {key!r}"))
                bad = True
            elif not isinstance(obj[key], str):
                problems.append((n, f"field {key!r} must be a string, got {type(obj[key]).__name__}"))
                bad = True
        if bad:
            continue
        if not obj["output"].strip():
            problems.append((n, "empty output: 'output' is empty or only whitespace"))
            continue
        rows.append(Row(n, obj["input"], obj["output"]))
    if problems:
        raise DataError(path, problems[:MAX_REPORTED], len(problems))
    if not rows:
        raise DataError(path, [(0, "no rows: expected JSONL lines like {\"input\": \"...\", \"output\": \"...\"}")])
    return rows


def end_of_turn_id(tokenizer, eos_ids: tuple[int, ...]) -> int:
    """The token that closes an assistant turn in the chat template: render ``[user, assistant(SENTINEL)]`` and
    take the first token after the sentinel that is one of ``eos_ids``; fall back to the tokenizer's EOS."""
    sentinel = "SENTINEL7731"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    tail = text[text.index(sentinel) + len(sentinel):] if sentinel in text else ""
    for tid in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tid in eos_ids:
            return int(tid)
    return eos_id(tokenizer, eos_ids)


def eos_id(tokenizer, eos_ids: tuple[int, ...]) -> int:
    """The tokenizer's EOS id, else the smallest of the model's ``eos_ids``.

    Raises:
        ValueError: neither is known.
    """
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if eos_ids:
        return int(min(eos_ids))
    raise ValueError("the tokenizer has no EOS token and the model names none; cannot mark the end of an output")


def input_ids_for(tokenizer, text: str, chat_template: bool = False) -> list[int]:
    """Token ids of an input as the server builds them: ``tokenizer(text)["input_ids"]`` (``/v1/tasks/{task}/
    generate`` and ``/v1/generate``), or the chat template with a generation prompt (``/v1/chat/completions``)."""
    if chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(x) for x in ids]
    return [int(x) for x in tokenizer(text)["input_ids"]]


def encode_row(tokenizer, row: Row, end_id: int, chat_template: bool = False) -> Encoded:
    """Apply the template (module docstring) to one row. ``end_id``: the EOS (plain) or end-of-turn (chat) id."""
    inp = input_ids_for(tokenizer, row.input, chat_template)
    out = [int(x) for x in tokenizer(row.output, add_special_tokens=False)["input_ids"]] + [int(end_id)]
    return Encoded(inp + out, [IGNORE_INDEX] * len(inp) + out)


def encode_rows(
    path: str | Path, rows: list[Row], tokenizer, *, end_id: int, num_virtual_tokens: int, max_context: int,
    chat_template: bool = False,
) -> list[Encoded]:
    """Encode every row and check it fits: ``num_virtual_tokens + len(input_ids) <= max_context``.

    Raises:
        DataError: naming each row (by line) whose virtual + input + output + end tokens exceed the context.
    """
    encoded: list[Encoded] = []
    problems: list[tuple[int, str]] = []
    for row in rows:
        enc = encode_row(tokenizer, row, end_id, chat_template)
        total = num_virtual_tokens + len(enc.input_ids)
        if total > max_context:
            n_out = enc.num_output
            problems.append((row.line, (
                f"row too long: {num_virtual_tokens} virtual + {len(enc.input_ids) - n_out} input + {n_out} output "
                f"(end token included) = {total} tokens exceeds the model's context of {max_context} tokens"
            )))
        encoded.append(enc)
    if problems:
        raise DataError(path, problems[:MAX_REPORTED], len(problems))
    return encoded


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right.

    Returns:
        ``input_ids`` ``[B, L]`` (pads = ``pad_id``), ``attention_mask`` ``[B, L]`` (1 = real token), ``labels``
        ``[B, L]`` (``-100`` on input and pad positions); ``L`` is the longest row. PEFT later prepends the
        virtual tokens to all three.
    """
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
