"""Generate the example tasks' data: ``examples/tasks/<task>/{train,test}.jsonl`` and ``instruction.txt``.

Four tasks, each with a checkable answer of a few tokens, generated from templates with a fixed seed (no
download), 400 training rows and 100 test rows whose inputs are disjoint (asserted):

* ``date-format``: ISO date -> ``D Month YYYY`` (``1987-03-04`` -> ``4 March 1987``).
* ``topic``: a templated news headline -> one of ``sports``, ``business``, ``science``, ``weather``,
  ``politics``.
* ``unit-convert``: ``km``/``kg``/``L`` quantity -> ``m``/``g``/``mL`` with a fixed format (``2.5 km`` ->
  ``2500 m``, ``37 kg`` -> ``37000 g``).
* ``extract-name``: a sentence naming one person -> ``Last, First``.

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
from collections.abc import Callable
from pathlib import Path

N_TRAIN, N_TEST = 400, 100
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]

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


def date_format(r: random.Random) -> tuple[str, str]:
    year, month = r.randint(1950, 2049), r.randint(1, 12)
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    day = r.randint(1, DAYS_IN[month - 1] + leap)
    return f"{year:04d}-{month:02d}-{day:02d}", f"{day} {MONTHS[month - 1]} {year}"


CITIES = ["Lisbon", "Oslo", "Denver", "Madrid", "Nairobi", "Osaka", "Dublin", "Toronto", "Lyon", "Perth",
          "Seattle", "Hamburg", "Porto", "Austin", "Krakow", "Leeds"]
TEAMS = ["City", "United", "Rovers", "Athletic", "Wanderers", "Rangers", "Albion", "Thunder", "Falcons", "Sharks"]
COMPANIES = ["Nordex", "Ambrel", "Quintar", "Veltro", "Solvia", "Kestrel Foods", "Brightline", "Orvane",
             "Tamsin Bank", "Halcyon Motors"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST = ["Anna", "Maria", "John", "Peter", "Laura", "David", "Sofia", "James", "Emma", "Lucas", "Nina", "Paul",
         "Clara", "Oscar", "Julia", "Martin", "Elena", "Victor", "Rosa", "Daniel", "Alice", "Thomas", "Sara", "Felix"]
LAST = ["Berg", "Lopez", "Smith", "Novak", "Keller", "Brown", "Rossi", "Fischer", "Silva", "Walsh", "Moreau",
        "Jensen", "Costa", "Wagner", "Murphy", "Hansen", "Ortiz", "Baker", "Meyer", "Clarke", "Evans", "Dubois"]

TOPICS: dict[str, list[str]] = {
    "sports": [
        "{city} {team} beat {team2} {a}-{b} in the cup final",
        "{first} {last} wins the {city} marathon in record time",
        "Coach of {city} {team} resigns after {n} straight defeats",
        "{city} {team} sign striker {first} {last} on a {k}-year deal",
        "Tennis star {first} {last} reaches the semi-finals in {city}",
        "{city} to host the {year} swimming championships",
    ],
    "business": [
        "{company} shares fall {n}% after weak quarterly earnings",
        "{company} agrees to buy {company2} for {n} million dollars",
        "{company} opens {n} new stores across {city}",
        "Chief executive of {company} steps down after {k} years",
        "{company} profits rise {n}% on strong demand",
        "Investors sell {company} stock as interest rates climb",
    ],
    "science": [
        "Astronomers spot {n} new moons around a distant planet",
        "Researchers in {city} map the genome of a rare frog",
        "New study links sleep to memory in {n} species of birds",
        "Space probe sends first close images of a comet to {city} lab",
        "Physicists in {city} measure the neutron's lifetime more precisely",
        "Fossil found near {city} belongs to a new dinosaur species",
    ],
    "weather": [
        "Heavy rain expected in {city} on {day}",
        "Temperatures in {city} to reach {n} degrees this {day}",
        "Storm warning issued for the coast near {city}",
        "Snow closes roads around {city} for a {k}th day",
        "Fog delays flights at {city} airport on {day} morning",
        "Heatwave in {city} to last until {day}",
    ],
    "politics": [
        "Parliament votes on the new housing bill on {day}",
        "Mayor {first} {last} announces a bid for a second term in {city}",
        "Minister {first} {last} resigns over the {company} contract",
        "Voters in {city} head to the polls on {day}",
        "Opposition leader {first} {last} calls for an early election",
        "Senate passes the {year} budget after a {k}-day debate",
    ],
}


def topic(r: random.Random) -> tuple[str, str]:
    label = r.choice(sorted(TOPICS))
    team, team2 = r.sample(TEAMS, 2)
    company, company2 = r.sample(COMPANIES, 2)
    text = r.choice(TOPICS[label]).format(
        city=r.choice(CITIES), team=team, team2=team2, a=r.randint(1, 5), b=r.randint(0, 4), n=r.randint(2, 40),
        k=r.randint(2, 9), first=r.choice(FIRST), last=r.choice(LAST), company=company, company2=company2,
        day=r.choice(DAYS), year=r.randint(2025, 2031),
    )
    return text, " " + label


UNITS = [("km", "m"), ("kg", "g"), ("L", "mL")]


def unit_convert(r: random.Random) -> tuple[str, str]:
    big, small = r.choice(UNITS)
    if r.random() < 0.5:
        x = r.randint(1, 999)
        return f"{x} {big}", f"{x * 1000} {small}"
    tenths = r.randint(11, 999)
    if tenths % 10 == 0:
        tenths += 1
    return f"{tenths // 10}.{tenths % 10} {big}", f"{tenths * 100} {small}"


NAME_TEMPLATES = [
    "Ticket {n}: {first} {last} reports that the printer on floor {k} is jammed.",
    "Please send the invoice to {first} {last} in {city} by {day}.",
    "On {day}, {first} {last} from {company} called about order {n}.",
    "The meeting moves to {day}; {first} {last} will chair it.",
    "Delivery for {first} {last}, {n} Harbour Street, {city}.",
    "{company} has hired {first} {last} as head of sales in {city}.",
    "Room {n} is booked for {first} {last} from {day} to {day2}.",
    "Thanks to {first} {last} for fixing the build on {day}.",
]


def extract_name(r: random.Random) -> tuple[str, str]:
    first, last = r.choice(FIRST), r.choice(LAST)
    day, day2 = r.sample(DAYS, 2)
    text = r.choice(NAME_TEMPLATES).format(
        first=first, last=last, n=r.randint(10, 9999), k=r.randint(1, 9), city=r.choice(CITIES), day=day,
        day2=day2, company=r.choice(COMPANIES),
    )
    return text, f" {last}, {first}"


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "date-format": date_format,
    "topic": topic,
    "unit-convert": unit_convert,
    "extract-name": extract_name,
}


def generate(task: str, seed: int) -> tuple[list[dict], list[dict]]:
    """``N_TRAIN`` + ``N_TEST`` rows with distinct inputs (the first ``N_TEST`` distinct ones form the test
    split), from ``random.Random(f"{seed}:{task}")``. Raises RuntimeError if the generator runs dry."""
    r = random.Random(f"{seed}:{task}")
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < N_TRAIN + N_TEST:
        tries += 1
        if tries > 100 * (N_TRAIN + N_TEST):
            raise RuntimeError(f"{task}: could not draw {N_TRAIN + N_TEST} distinct inputs")
        inp, out = TASKS[task](r)
        if inp in seen:
            continue
        seen.add(inp)
        rows.append({"input": inp, "output": out})
    test, train = rows[:N_TEST], rows[N_TEST:]
    assert not {x["input"] for x in train} & {x["input"] for x in test}, f"{task}: train and test overlap"
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    for task in TASKS:
        train, test = generate(task, args.seed)
        d = args.out / task
        d.mkdir(parents=True, exist_ok=True)
        write_jsonl(d / "train.jsonl", train)
        write_jsonl(d / "test.jsonl", test)
        (d / "instruction.txt").write_text(INSTRUCTIONS[task], encoding="utf-8")
        labels = sorted({x["output"].strip() for x in train})
        extra = f", labels {labels}" if len(labels) <= 10 else ""
        print(f"{d}: {len(train)} train, {len(test)} test rows{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
