"""Generate the example tasks' data: ``examples/tasks/<task>/{train,test,test_ood}.jsonl`` and ``instruction.txt``.

Four tasks, each with a checkable answer of a few tokens, generated from templates with a fixed seed (no
download):

* ``date-format``: an ISO date, bare or in a short phrase -> ``D Month YYYY`` (``1987-03-04`` -> ``4 March 1987``,
  ``Due on 2031-11-20`` -> ``20 November 2031``).
* ``topic``: a news headline -> one of ``sports``, ``business``, ``science``, ``weather``, ``politics``.
* ``unit-convert``: a ``km``/``kg``/``L`` quantity, bare or in a short phrase -> ``m``/``g``/``mL`` as a whole
  number, a space and the unit (``2.5 km`` -> ``2500 m``, ``37 kilograms`` -> ``37000 g``).
* ``extract-name``: a sentence naming one person -> ``Last, First``.

Three files per task:

* ``train.jsonl`` (``N_TRAIN`` rows) and ``test.jsonl`` (``N_TEST`` rows, the *in-template* test set): drawn from
  the training distribution of :mod:`task_words` (its ``"train"`` lists), with disjoint inputs (asserted).
* ``test_ood.jsonl`` (``N_OOD`` rows, the *out-of-template* test set): the same task and answer format, drawn only
  from the held-out ``"ood"`` lists: wordings and sentence shapes no training row uses, person names, cities,
  teams and companies absent from the training lists, headline templates absent from training; dates with years
  outside the training range (training 1700-2099, four centuries, so that a prompt learns to copy the century;
  out-of-template 1000-1699 and 2100-2599); quantities with three decimals (training has at most two) or an
  integer part of 1000-9999 (training: 0-999). Each of these is asserted on the rows written: the held-out lists
  are disjoint from the training lists, no training name, city, team or company occurs in an out-of-template
  input and vice versa, every out-of-template year and number lies outside the training ranges, and no
  out-of-template input equals a training or test input.

Half the training dates and a quarter of the training quantities are bare (``1987-03-04``, ``2.5 km``), the rest
sit in phrases, so a prompt learns to find the value rather than one layout.

Outputs that start with a word begin with a space (``" sports"``, ``" Berg, Anna"``), as the word would in
running text, so its first token is the common word token (``" sports"`` is one token of SmolLM2's tokenizer,
``"sports"`` two); outputs that start with a digit do not. Evaluation strips whitespace, so this only affects
which tokens the prompt learns to produce.

``instruction.txt`` is the hand-written instruction of the prompt-engineering baseline; ``softprompt eval``
prepends it verbatim to each input (it ends with a blank line).

Usage: ``python examples/tasks/make_data.py [--out examples/tasks] [--seed 1234]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task_words as W  # noqa: E402

N_TRAIN, N_TEST, N_OOD = 400, 100, 100
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
TRAIN_YEARS = (1700, 2099)
OOD_YEARS = ((1000, 1699), (2100, 2599))
SPLITS = ("train", "ood")

INSTRUCTIONS = {
    "date-format": "Rewrite the date below in the form \"day month year\": the day without a leading zero, the "
    "month's English name, the year in four digits. For example, 2021-03-04 becomes 4 March 2021. Answer with "
    "the rewritten date only.\n\n",
    "topic": "Classify the news headline below into exactly one topic: sports, business, science, weather or "
    "politics. Answer with the topic word only, in lower case.\n\n",
    "unit-convert": "Convert the quantity below to the smaller unit: km to m, kg to g, L to mL (multiply by "
    "1000). Write the whole number without separators, a space, then the unit. For example, 2.5 km becomes "
    "2500 m. Answer with the converted quantity only.\n\n",
    "extract-name": "Find the person's name in the text below and write it as \"Last, First\": surname, comma, "
    "space, given name. For example, \"Anna Berg called on Monday.\" gives Berg, Anna. Answer with the name "
    "only.\n\n",
}


def date_format(r: random.Random, split: str) -> tuple[str, str]:
    """An ISO date (bare: half the training rows, 40% of the out-of-template rows; else in a phrase of the
    split's ``DATE_SHAPES``) -> ``"D Month YYYY"``; years from ``TRAIN_YEARS`` or ``OOD_YEARS``."""
    lo, hi = TRAIN_YEARS if split == "train" else r.choice(OOD_YEARS)
    year, month = r.randint(lo, hi), r.randint(1, 12)
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    day = r.randint(1, DAYS_IN[month - 1] + leap)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    bare = 0.5 if split == "train" else 0.4
    text = iso if r.random() < bare else r.choice(W.DATE_SHAPES[split]).format(d=iso)
    return text, f"{day} {W.MONTHS[month - 1]} {year}"


UNITS = [("km", "m", "kilometre", "metres", "kilometer"), ("kg", "g", "kilogram", "grams", "kilo"),
         ("L", "mL", "litre", "millilitres", "liter")]


def _quantity(r: random.Random, split: str) -> tuple[str, int]:
    """A decimal number as written and its value times 1000 (an integer). Training: integer part 0-999 (0 only
    with decimals), 0-2 decimals, no trailing zero. Out of template: three decimals (integer part 0-999), or an
    integer part of 1000-9999 with 0-2 decimals."""
    if split == "train":
        places = r.choice((0, 0, 1, 1, 2))
        whole = r.randint(1 if places == 0 else 0, 999)
    elif r.random() < 0.6:
        places, whole = 3, r.choice((r.randint(0, 9), r.randint(0, 999)))
    else:
        places, whole = r.choice((0, 1, 2)), r.randint(1000, 9999)
    frac = r.randint(1, 10**places - 1) if places else 0
    if places and frac % 10 == 0:
        frac += 1
    text = f"{whole}.{frac:0{places}d}" if places else str(whole)
    return text, whole * 1000 + frac * 10 ** (3 - places)


def unit_convert(r: random.Random, split: str) -> tuple[str, str]:
    """A quantity (bare ``"X u"``: a quarter of the training rows, a third of the out-of-template rows; else in a
    phrase of the split's ``UNIT_SHAPES``) -> ``"N small"``."""
    x, milli = _quantity(r, split)
    u, small, long, small_long, long_us = r.choice(UNITS)
    plural = "" if x == "1" else "s"
    bare = 0.25 if split == "train" else 0.34
    shape = "{x} {u}" if r.random() < bare else r.choice(W.UNIT_SHAPES[split])
    text = shape.format(x=x, u=u, small=small, long=long + plural, small_long=small_long, long_us=long_us + plural)
    return text, f"{milli} {small}"


def _slots(r: random.Random, split: str) -> dict:
    team, team2 = r.sample(W.TEAMS[split], 2)
    company, company2 = r.sample(W.COMPANIES[split], 2)
    day, day2 = r.sample(W.DAYS, 2)
    years = (2020, 2035) if split == "train" else (2036, 2045)
    return dict(city=r.choice(W.CITIES[split]), team=team, team2=team2, company=company, company2=company2,
                first=r.choice(W.FIRST[split]), last=r.choice(W.LAST[split]), day=day, day2=day2,
                month=r.choice(W.MONTHS), a=r.randint(1, 5), b=r.randint(0, 4), n=r.randint(2, 40),
                k=r.randint(2, 9), year=r.randint(*years))


def topic(r: random.Random, split: str) -> tuple[str, str]:
    """A headline of the split's templates for a random label -> ``" label"``."""
    label = r.choice(sorted(W.TOPICS))
    return r.choice(W.TOPICS[label][split]).format(**_slots(r, split)), " " + label


def extract_name(r: random.Random, split: str) -> tuple[str, str]:
    """A sentence of the split's templates naming one person -> ``" Last, First"``."""
    s = _slots(r, split)
    s["n"] = r.randint(10, 9999)
    return r.choice(W.NAME_TEMPLATES[split]).format(**s), f" {s['last']}, {s['first']}"


TASKS: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "date-format": date_format,
    "topic": topic,
    "unit-convert": unit_convert,
    "extract-name": extract_name,
}


def _draw(task: str, r: random.Random, split: str, n: int, seen: set[str]) -> list[dict]:
    """``n`` rows whose inputs are new to ``seen`` (which grows). Raises RuntimeError if the generator runs dry."""
    rows: list[dict] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"{task}: could not draw {n} distinct {split} inputs")
        inp, out = TASKS[task](r, split)
        if inp not in seen:
            seen.add(inp)
            rows.append({"input": inp, "output": out})
    return rows


def _words(split: str) -> set[str]:
    """The split's person names, cities, teams and companies."""
    return {w for name in ("FIRST", "LAST", "CITIES", "TEAMS", "COMPANIES") for w in getattr(W, name)[split]}


def check_ood(task: str, train: list[dict], test: list[dict], ood: list[dict]) -> None:
    """Assert that the out-of-template rows lie outside the training distribution (see the module docstring).

    Raises:
        AssertionError: naming the task and the first offending row.
    """
    for name in ("FIRST", "LAST", "CITIES", "TEAMS", "COMPANIES", "DATE_SHAPES", "UNIT_SHAPES", "NAME_TEMPLATES"):
        lists = getattr(W, name)
        assert not set(lists["train"]) & set(lists["ood"]), f"{name}: held-out list overlaps the training list"
    for label, t in W.TOPICS.items():
        assert not set(t["train"]) & set(t["ood"]), f"topic {label}: held-out template in training"
    assert not set(W.FIRST["train"] + W.FIRST["ood"]) & set(W.LAST["train"] + W.LAST["ood"]), "first = last name"
    seen = {x["input"] for x in train + test}
    assert not seen & {x["input"] for x in ood}, f"{task}: an out-of-template input is a training/test input"
    pattern = {s: re.compile(r"\b(" + "|".join(map(re.escape, sorted(_words(s), key=len, reverse=True))) + r")\b")
               for s in SPLITS}
    for x in ood:
        inp = x["input"]
        assert not pattern["train"].search(inp), f"{task}: training word in out-of-template row {x}"
        if task == "date-format":
            year = int(x["output"].split()[-1])
            assert not TRAIN_YEARS[0] <= year <= TRAIN_YEARS[1], f"{task}: year in training range: {x}"
        elif task == "unit-convert":
            whole, _, frac = re.search(r"\d+(?:\.\d+)?", inp).group().partition(".")
            assert len(frac) == 3 or int(whole) >= 1000, f"{task}: number in training range: {x}"
    for x in train + test:
        assert not pattern["ood"].search(x["input"]), f"{task}: held-out word in training row {x}"


def generate(task: str, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, test, test_ood)`` for ``task`` from ``random.Random(f"{seed}:{task}")``: the first ``N_TEST``
    distinct training-distribution inputs form the in-template test split, the next ``N_TRAIN`` the training
    split, then ``N_OOD`` distinct out-of-template rows; checked by :func:`check_ood`."""
    r = random.Random(f"{seed}:{task}")
    seen: set[str] = set()
    rows = _draw(task, r, "train", N_TEST + N_TRAIN, seen)
    test, train = rows[:N_TEST], rows[N_TEST:]
    ood = _draw(task, r, "ood", N_OOD, seen)
    assert not {x["input"] for x in train} & {x["input"] for x in test}, f"{task}: train and test overlap"
    check_ood(task, train, test, ood)
    return train, test, ood


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    for task in TASKS:
        train, test, ood = generate(task, args.seed)
        d = args.out / task
        d.mkdir(parents=True, exist_ok=True)
        write_jsonl(d / "train.jsonl", train)
        write_jsonl(d / "test.jsonl", test)
        write_jsonl(d / "test_ood.jsonl", ood)
        (d / "instruction.txt").write_text(INSTRUCTIONS[task], encoding="utf-8")
        labels = sorted({x["output"].strip() for x in train})
        extra = f", labels {labels}" if len(labels) <= 10 else ""
        print(f"{d}: {len(train)} train, {len(test)} test, {len(ood)} out-of-template rows{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
