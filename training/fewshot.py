"""The few-shot baseline of ``softprompt eval``: the task's instruction plus ``k`` solved examples drawn from the
training data, then the row's input.

The examples are chosen once per run (:func:`pick_shots`: a seeded sample), so every evaluated row sees the same
examples in the same order. Two forms:

* **text** (:func:`few_shot_text`), sent as plain input on ``POST /v1/generate``; each example is an
  ``input\\noutput`` block, blocks are separated by a blank line, and the row's input ends with a newline, so the
  answer is the next line::

      {instruction}{input 1}
      {output 1}

      {input 2}
      {output 2}

      {row input}
      <- the model answers here

  The instruction file carries its own trailing blank line. Outputs are stripped of surrounding whitespace
  (``" sports"`` -> ``"sports"``). The form puts an answer on a line of its own, so the text form is scored on
  the first non-empty line of the output (:func:`answer_line`), as a few-shot prompt is normally read: without
  that, a correct answer followed by the next invented example would count as a miss. Generation is not cut
  (the per-row results keep the whole output).
* **chat** (:func:`few_shot_messages`), on ``POST /v1/chat/completions``: one user/assistant turn per example
  (the instruction opens the first user message), then the row's input as the last user message. The
  assistant's turn ends at its end-of-turn token, and the whole reply is scored.
"""

from __future__ import annotations

import random

from training.data import Row


def answer_line(output: str) -> str:
    """The first non-empty line of ``output`` (``""`` when there is none): the text form's answer."""
    return next((line for line in output.splitlines() if line.strip()), "")


def pick_shots(pool: list[Row], k: int, seed: int = 0, exclude_inputs: set[str] | frozenset[str] = frozenset()
               ) -> list[Row]:
    """``k`` examples sampled without replacement from ``pool`` by ``random.Random(seed)``, in sampled order.

    Rows whose input is in ``exclude_inputs`` (the evaluated inputs) are never picked, so an example cannot give
    away the answer of a row it is shown with.

    Raises:
        ValueError: ``k`` < 1, or fewer than ``k`` eligible rows in ``pool``.
    """
    if k < 1:
        raise ValueError(f"the number of few-shot examples must be >= 1; got {k}")
    eligible = [r for r in pool if r.input not in exclude_inputs]
    if len(eligible) < k:
        raise ValueError(f"few-shot: {k} examples asked, only {len(eligible)} eligible rows in the shot file "
                         "(rows whose input is also an evaluated input are left out)")
    return random.Random(seed).sample(eligible, k)


def few_shot_text(instruction: str | None, shots: list[Row], text: str) -> str:
    """The text form (module docstring): ``instruction + blocks + text + "\\n"``; ``instruction`` None is ""."""
    blocks = "".join(f"{s.input}\n{s.output.strip()}\n\n" for s in shots)
    return f"{instruction or ''}{blocks}{text}\n"


def few_shot_messages(instruction: str | None, shots: list[Row], text: str) -> tuple[tuple[str, str], ...]:
    """The chat form (module docstring) as ``(role, content)`` pairs, ending with the row's user message."""
    msgs: list[tuple[str, str]] = []
    for i, s in enumerate(shots):
        msgs.append(("user", (instruction or "") + s.input if i == 0 else s.input))
        msgs.append(("assistant", s.output.strip()))
    msgs.append(("user", text if msgs else (instruction or "") + text))
    return tuple(msgs)
