"""``softprompt eval-report``: tables, means, targets and the chart from fixture eval JSONs with known figures
(written by ``training.evaluate.write_json``, the format ``softprompt eval --json`` writes)."""

from __future__ import annotations

import json

import pytest

from training.evaluate import write_json
from training.report import END, START, columns_of, main, replace_block

BASELINES = ("base", "instruction", "instruction_chat", "few_shot", "few_shot_chat")


def summ(exact: int, ci: int, total: int = 100) -> dict:
    return {"total": total, "exact": exact, "exact_ci": ci, "first_line": exact, "errors": 0,
            "exact_match": exact / total, "exact_match_ci": ci / total, "first_line_match": exact / total}


def meta(method: str, params: int, wall: float, steps: int = 160) -> dict:
    return {"method": method, "trainable_params": params, "wall_s": wall, "steps": steps, "template": "plain"}


# (task, file): baselines' (exact, case-insensitive) or None (condition absent), then the prompt conditions
FIXTURE = {
    ("alpha", "eval.json"): ([(0, 0), (10, 12), (20, 20), (35, 40), (30, 30)],
                             {"prompt_tuning": ((100, 100), meta("prompt_tuning", 11520, 580.4)),
                              "soft_prompt": ((95, 95), meta("p_tuning", 2_000_000, 100.0))}),
    ("alpha", "eval_ood.json"): ([(0, 0), (5, 5), (10, 10), (45, 50), (20, 20)],
                                 {"prompt_tuning": ((92, 93), meta("prompt_tuning", 11520, 580.4)),
                                  "soft_prompt": ((50, 50), meta("p_tuning", 2_000_000, 100.0))}),
    ("beta", "eval.json"): ([(1, 1), (0, 0), (2, 3), (60, 60), (40, 40)],
                            {"prompt_tuning": ((99, 99), meta("prompt_tuning", 11520, 600.0)),
                             "p_tuning": ((97, 98), meta("p_tuning", 2_000_000, 200.0, 300))}),
    ("beta", "eval_ood.json"): ([(0, 0), (0, 0), (1, 1), (80, 80), None],
                                {"prompt_tuning": ((88, 88), meta("prompt_tuning", 11520, 600.0)),
                                 "p_tuning": ((99, 99), meta("p_tuning", 2_000_000, 200.0, 300))}),
}


@pytest.fixture
def tasks_dir(tmp_path):
    for (task, name), (base, prompts) in FIXTURE.items():
        summary = {c: summ(*v) for c, v in zip(BASELINES, base, strict=True) if v is not None}
        summary.update({c: summ(*v) for c, (v, _) in prompts.items()})
        pdoc = {c: {"path": f"prompts/{c}/{task}", "template": "plain", "training": m} for c, (_, m) in prompts.items()}
        write_json(tmp_path / "tasks" / task / name, task, f"{task}/x.jsonl", "in-process", "Do it.\n\n", 9,
                   {"summary": summary, "rows": [], "seconds": 1.0}, shots=None, prompts=pdoc)
    (tmp_path / "tasks" / "empty").mkdir()  # no eval file: not a task of the report
    return tmp_path / "tasks"


def test_columns_by_training_method():
    doc = json.loads(json.dumps({"summary": {"base": summ(3, 4), "mine": summ(9, 9), "raw": summ(1, 1)},
                                 "prompts": {"mine": {"training": {"method": "prefix_tuning"}},
                                             "raw": {"training": None}}}))
    cols = columns_of(doc)
    assert sorted(cols) == ["base", "prefix_tuning"]  # "raw" has no method: no column
    assert cols["prefix_tuning"]["condition"] == "mine" and cols["base"]["exact_match_ci"] == 0.04


def test_report_tables_targets_and_chart(tasks_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--tasks-dir", str(tasks_dir), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert md == capsys.readouterr().out.split("chart: ")[0].rstrip("\n") + "\n"
    lines = md.splitlines()
    head = ("| task | base | instruction (text) | instruction (chat) | few-shot (text) | few-shot (chat) | "
            "prompt tuning | p-tuning | prefix tuning |")
    assert lines.count(head) == 2
    assert "| alpha | 0 / 0 | 10 / 12 | 20 / 20 | 35 / 40 | 30 / 30 | 100 / 100 | 95 / 95 | – |" in lines
    assert "| beta | 0 / 0 | 0 / 0 | 1 / 1 | 80 / 80 | – | 88 / 88 | 99 / 99 | – |" in lines
    assert ("| **mean** | **0** / 0 | **2.5** / 2.5 | **5.5** / 5.5 | **62.5** / 65 | – | **90** / 90.5 | "
            "**74.5** / 74.5 | – |") in lines
    assert ("| **mean** | **0.5** / 0.5 | **5** / 6 | **11** / 11.5 | **47.5** / 50 | **35** / 35 | **99.5** / 99.5 | "
            "**96** / 96.5 | – |") in lines
    assert lines.count("| trainable parameters | – | – | – | – | – | 11,520 | 2,000,000 | – |") == 2
    assert lines.count("| training seconds (mean over tasks) | – | – | – | – | – | 590 | 150 | – |") == 2
    assert "| prompt tuning | 11,520 | 580 (160) | 600 (160) |" in lines
    assert "| p-tuning | 2,000,000 | 100 (160) | 200 (300) |" in lines
    assert "| prefix tuning | – | – | – |" in lines
    assert "- prompt tuning: mean 90% (met); margins: alpha +47, beta +8 (NOT met)" in lines
    assert "- p-tuning: mean 74.5% (NOT met); margins: alpha +5, beta +19 (NOT met)" in lines
    assert "- prefix tuning: mean – (NOT met); margins: alpha –, beta – (NOT met)" in lines
    doc = json.loads((out / "results.json").read_text())
    assert doc["targets"]["set"] == "out-of-template" and doc["targets"]["prompt_tuning"]["mean_ok"] is True
    assert doc["means"]["in-template"]["prefix_tuning"] is None
    png = (out / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_readme_block_and_errors(tasks_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nplaceholder\n{END}\nafter\n")
    assert main(["--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "o"), "--readme", str(readme),
                 "--no-plot", "--set", "ood=eval_ood.json", "--tasks", "beta"]) == 0
    text = readme.read_text()
    assert text.startswith(f"# x\n\nbefore\n{START}\n**ood** test set") and text.endswith(f"\n{END}\nafter\n")
    assert "placeholder" not in text and "| beta | 0 / 0 |" in text and "| alpha" not in text
    assert not (tmp_path / "o" / "eval.png").exists()
    assert replace_block(text, "new\n") == f"# x\n\nbefore\n{START}\nnew\n{END}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x")
    capsys.readouterr()
    assert main(["--tasks-dir", str(tasks_dir), "--readme", str(tmp_path / "none.md"), "--no-plot",
                 "--out", str(tmp_path / "o")]) == 2
    assert "none.md" in capsys.readouterr().err
    assert main(["--tasks-dir", str(tmp_path / "nothing")]) == 2
    assert "no eval files" in capsys.readouterr().err
