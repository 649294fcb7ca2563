"""The example tasks' generator (``examples/tasks/make_data.py``): the committed files are its output, and the
out-of-template rows lie outside the training distribution."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parents[2] / "examples" / "tasks"
sys.path.insert(0, str(TASKS_DIR))
import make_data  # noqa: E402
import task_words as W  # noqa: E402


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[list[dict], list[dict], list[dict]]]:
    return {task: make_data.generate(task, 1234) for task in make_data.TASKS}


def test_committed_files_are_the_generators_output(generated):
    for task, (train, test, ood) in generated.items():
        assert (len(train), len(test), len(ood)) == (make_data.N_TRAIN, make_data.N_TEST, make_data.N_OOD)
        for name, rows in (("train", train), ("test", test), ("test_ood", ood)):
            assert _read(TASKS_DIR / task / f"{name}.jsonl") == rows, (task, name)
        inputs = [x["input"] for x in train + test + ood]
        assert len(set(inputs)) == len(inputs), task


def test_out_of_template_rows_are_out_of_the_training_distribution(generated):
    years = [int(x["output"].split()[-1]) for x in generated["date-format"][2]]
    assert all(y < 1700 or y > 2099 for y in years) and min(years) >= 1000 and max(years) <= 2599
    assert all(1700 <= int(x["output"].split()[-1]) <= 2099 for x in generated["date-format"][0])
    for x in generated["unit-convert"][2]:
        whole, _, frac = re.search(r"\d+(?:\.\d+)?", x["input"]).group().partition(".")
        assert len(frac) == 3 or int(whole) >= 1000, x
    for x in generated["unit-convert"][0]:
        whole, _, frac = re.search(r"\d+(?:\.\d+)?", x["input"]).group().partition(".")
        assert len(frac) <= 2 and int(whole) <= 999, x
    for x in generated["extract-name"][2]:
        last, first = x["output"].strip().split(", ")
        assert first in W.FIRST["ood"] and last in W.LAST["ood"], x
        assert first not in W.FIRST["train"] and last not in W.LAST["train"]
    ood_templates = {t for v in W.TOPICS.values() for t in v["ood"]}
    train_headlines = {x["input"] for x in generated["topic"][0]}
    assert not ood_templates & {t for v in W.TOPICS.values() for t in v["train"]}
    assert len({x["output"] for x in generated["topic"][2]}) == 5 and not train_headlines & {
        x["input"] for x in generated["topic"][2]}


def test_check_ood_catches_a_leak(generated):
    train, test, ood = generated["extract-name"]
    leak = [{"input": f"Please welcome our new neighbour, {W.FIRST['train'][0]} Okafor.", "output": " x"}]
    with pytest.raises(AssertionError, match="training word"):
        make_data.check_ood("extract-name", train, test, leak)
    with pytest.raises(AssertionError, match="year in training range"):
        make_data.check_ood("date-format", *generated["date-format"][:2], [{"input": "2000-01-01",
                                                                           "output": "1 January 2000"}])
