"""Few-shot baseline, several prompts per run, case-insensitive counting: a fake back end with known outputs pins the
counts and the exact prompt text; the engine and HTTP back ends must reproduce references computed independently
(full forward passes); the CLI parses and records it all."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import greedy

from training.data import Row, input_ids_for
from training.eval_backends import EngineBackend, HTTPBackend, chat_ids
from training.eval_cli import eval_main, parse_prompts
from training.evaluate import Generation, default_conditions, evaluate, exact_match_ci, make_jobs
from training.fewshot import answer_line, few_shot_messages, few_shot_text, pick_shots

INSTRUCTION = "Convert to metres.\n\n"
SHOTS = [Row(7, "3 km", "3000 m"), Row(2, "Convert 5 km", " 5000 m")]


def test_pick_shots_is_seeded_and_never_shows_an_evaluated_input():
    pool = [Row(i + 1, f"{i} km", f"{i}000 m") for i in range(20)]
    a = pick_shots(pool, 3, seed=4)
    assert a == pick_shots(pool, 3, seed=4) == random.Random(4).sample(pool, 3)
    assert a != pick_shots(pool, 3, seed=5)
    excluded = {r.input for r in pool[:18]}
    assert sorted(r.line for r in pick_shots(pool, 2, seed=0, exclude_inputs=excluded)) == [19, 20]
    with pytest.raises(ValueError, match="only 2 eligible rows"):
        pick_shots(pool, 3, seed=0, exclude_inputs=excluded)
    with pytest.raises(ValueError, match=">= 1"):
        pick_shots(pool, 0)


def test_few_shot_prompt_text_and_turns_exactly():
    assert few_shot_text(INSTRUCTION, SHOTS, "12 km") == (
        "Convert to metres.\n\n3 km\n3000 m\n\nConvert 5 km\n5000 m\n\n12 km\n")
    assert few_shot_text(None, SHOTS[:1], "x") == "3 km\n3000 m\n\nx\n"
    assert few_shot_messages(INSTRUCTION, SHOTS, "12 km") == (
        ("user", "Convert to metres.\n\n3 km"), ("assistant", "3000 m"), ("user", "Convert 5 km"),
        ("assistant", "5000 m"), ("user", "12 km"))


class FakeBackend:
    """Returns ``outputs[(condition, row)]`` and records the jobs it was given."""

    def __init__(self, outputs: dict[tuple[str, int], str | None]):
        self.outputs, self.jobs = outputs, []

    def run(self, jobs, max_new_tokens, progress=True):
        self.jobs = list(jobs)
        out = []
        for j in jobs:
            text = self.outputs[(j.condition, j.row)]
            out.append(Generation("", None, "boom") if text is None else Generation(text, "stop"))
        return out


def test_counts_with_few_shot_and_two_prompts_on_known_outputs():
    rows = [Row(1, "2 km", "2000 m"), Row(2, "Anna Berg", " Berg, Anna"), Row(3, "9 km", "9000 m")]
    outputs = {
        # base: one exact, one only case-insensitive, one wrong
        ("base", 0): " 2000 m\n", ("base", 1): "berg, anna", ("base", 2): "9000 metres",
        ("instruction", 0): "2000 m\nmore", ("instruction", 1): "", ("instruction", 2): "9000 M",
        ("instruction_chat", 0): None, ("instruction_chat", 1): "Berg, Anna", ("instruction_chat", 2): "9000 m",
        ("few_shot", 0): "2000 m\n\n3 km\n3000", ("few_shot", 1): "\n Berg, Anna \nx", ("few_shot", 2): "9000 m",
        ("few_shot_chat", 0): "2000 M", ("few_shot_chat", 1): "BERG, ANNA", ("few_shot_chat", 2): "x",
        ("pt", 0): "2000 m", ("pt", 1): "Berg, Anna", ("pt", 2): "9000 m",
        ("prefix", 0): "2000 m", ("prefix", 1): "Anna Berg", ("prefix", 2): "9000  m",
    }
    backend = FakeBackend(outputs)
    prompts = {"pt": False, "prefix": True}
    assert default_conditions(INSTRUCTION, SHOTS, prompts) == (
        "base", "instruction", "instruction_chat", "few_shot", "few_shot_chat", "pt", "prefix")
    res = evaluate(rows, backend, instruction=INSTRUCTION, max_new_tokens=8, prompts=prompts, shots=SHOTS,
                   progress=False)
    got = {c: (s["exact"], s["exact_ci"], s["first_line"], s["errors"]) for c, s in res["summary"].items()}
    assert got == {"base": (1, 2, 1, 0), "instruction": (0, 1, 1, 0), "instruction_chat": (2, 2, 2, 1),
                   "few_shot": (3, 3, 3, 0), "few_shot_chat": (0, 2, 0, 0), "pt": (3, 3, 3, 0),
                   "prefix": (1, 1, 1, 0)}
    assert res["summary"]["base"]["exact_match_ci"] == pytest.approx(2 / 3)
    assert res["rows"][1]["results"]["few_shot_chat"] == {
        "output": "BERG, ANNA", "answer": "BERG, ANNA", "exact": False, "exact_ci": True, "first_line": False,
        "finish_reason": "stop", "error": None}
    by = {(j.condition, j.row): j for j in backend.jobs}
    assert len(backend.jobs) == 21
    fs = by[("few_shot", 2)]
    assert fs.text == "Convert to metres.\n\n3 km\n3000 m\n\nConvert 5 km\n5000 m\n\n9 km\n"
    assert (fs.chat, fs.prompt, fs.stop, fs.answer_line) == (False, None, (), True)
    assert [r["results"]["few_shot"]["answer"] for r in res["rows"]] == ["2000 m", " Berg, Anna ", "9000 m"]
    assert res["rows"][0]["results"]["few_shot"]["output"] == "2000 m\n\n3 km\n3000"
    assert res["rows"][0]["results"]["base"]["answer"] == " 2000 m\n"  # other conditions: the whole output
    fc = by[("few_shot_chat", 0)]
    assert fc.chat and fc.stop == () and fc.messages()[-1] == {"role": "user", "content": "2 km"}
    assert fc.messages()[0] == {"role": "user", "content": "Convert to metres.\n\n3 km"} and len(fc.history) == 4
    assert (by[("pt", 0)].prompt, by[("pt", 0)].chat) == ("pt", False)
    assert (by[("prefix", 0)].prompt, by[("prefix", 0)].chat) == ("prefix", True)
    assert exact_match_ci(" Straße ", "STRASSE")  # casefold, not lower


def test_make_jobs_refuses_what_it_cannot_build():
    rows = [Row(1, "2 km", "2000 m")]
    with pytest.raises(ValueError, match="few-shot conditions need examples"):
        make_jobs(rows, ("few_shot",), INSTRUCTION, shots=None)
    with pytest.raises(ValueError, match="unknown conditions"):
        make_jobs(rows, ("pt",), INSTRUCTION, prompts={"other": False})


def test_parse_prompts():
    assert parse_prompts(["prompt_tuning=a/b", "p_tuning=c", "prefix.v2=d=e"]) == {
        "prompt_tuning": __import__("pathlib").Path("a/b"), "p_tuning": __import__("pathlib").Path("c"),
        "prefix.v2": __import__("pathlib").Path("d=e")}
    assert list(parse_prompts(["examples/prompts/date-format"])) == ["soft_prompt"]
    assert str(parse_prompts(["dir/x=y"])["soft_prompt"]) == "dir/x=y"  # "dir/x" is no name: a plain path
    with pytest.raises(ValueError, match="given twice"):
        parse_prompts(["a", "b"])
    with pytest.raises(ValueError, match="baseline condition"):
        parse_prompts(["few_shot=a"])


@pytest.fixture(scope="module")
def two_prompts(tiny_loaded, tmp_path_factory):
    """Two RAW prompts of different lengths; rows; shots; and each condition's reference output per row."""
    d = tmp_path_factory.mktemp("two")
    g = torch.Generator().manual_seed(11)
    tensors = {"pa": torch.randn(4, 64, generator=g) * 2.0, "pb": torch.randn(7, 64, generator=g) * 2.0}
    for n, t in tensors.items():
        save_file({"p": t}, str(d / f"{n}.safetensors"))
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    rows = [Row(i + 1, f"{n} km", f"{n}000 m") for i, n in enumerate((4, 17, 250))]
    shots = [Row(9, "6 km", "6000 m"), Row(3, "8 km", "8000 m")]
    max_new = 6
    refs: dict[str, list[str]] = {}
    for r in rows:
        for c, ids, p in [
            ("few_shot", input_ids_for(tok, few_shot_text(INSTRUCTION, shots, r.input)), None),
            ("few_shot_chat", chat_ids(tok, [{"role": a, "content": b} for a, b in few_shot_messages(
                INSTRUCTION, shots, r.input)]), None),
            ("pa", input_ids_for(tok, r.input), tensors["pa"]),
            ("pb", input_ids_for(tok, r.input, chat_template=True), tensors["pb"]),
        ]:
            refs.setdefault(c, []).append(tok.decode(greedy(model, ids, p, max_new), skip_special_tokens=True))
    return {"dir": d, "rows": rows, "shots": shots, "refs": refs, "max_new": max_new}


def _check_stop_strings(backend, tp):
    """Jobs whose stop string is 3 characters from the middle of their uncut reference come back cut before its
    first occurrence (the references have no newline, so this is where the back end's stop handling shows)."""
    jobs = make_jobs(tp["rows"], ("few_shot",), INSTRUCTION, shots=tp["shots"])
    full = tp["refs"]["few_shot"]
    stops = [ref[len(ref) // 2:len(ref) // 2 + 3] for ref in full]
    assert all(len(s) == 3 and s.strip() for s in stops)
    gens = backend.run([replace(j, stop=(s,)) for j, s in zip(jobs, stops, strict=True)], tp["max_new"], False)
    assert [g.text for g in gens] == [ref.split(s)[0] for ref, s in zip(full, stops, strict=True)]


def _check_matches_references(backend, tp) -> None:
    """Few-shot (text and chat) and the two prompts, evaluated through ``backend``, give the reference outputs; the
    few-shot answer is the output's first non-empty line; stop strings behave (:func:`_check_stop_strings`)."""
    res = evaluate(tp["rows"], backend, conditions=("few_shot", "few_shot_chat", "pa", "pb"), instruction=INSTRUCTION,
                   max_new_tokens=tp["max_new"], prompts={"pa": False, "pb": True}, shots=tp["shots"], progress=False)
    for c in ("few_shot", "few_shot_chat", "pa", "pb"):
        assert [r["results"][c]["output"] for r in res["rows"]] == tp["refs"][c], c
    assert [r["results"]["few_shot"]["answer"] for r in res["rows"]] == [answer_line(t) for t in tp["refs"]["few_shot"]]
    _check_stop_strings(backend, tp)


def test_engine_runs_few_shot_and_two_prompts_like_the_references(tiny_loaded, two_prompts):
    tp = two_prompts
    backend = EngineBackend(tiny_loaded, "km", {"pa": tp["dir"] / "pa.safetensors", "pb": tp["dir"] / "pb.safetensors"})
    assert {n: p.num_virtual_tokens for n, p in backend.prompts.items()} == {"pa": 4, "pb": 7}
    _check_matches_references(backend, tp)


def test_http_runs_few_shot_two_prompts_and_stop_strings(make_client, tiny_loaded, two_prompts):
    tp = two_prompts
    client = make_client(prompts=tp["dir"])
    backend = HTTPBackend("http://testserver", "pa", http=client, concurrency=3, prompts={"pa": "pa", "pb": "pb"})
    _check_matches_references(backend, tp)


def test_cli_two_named_prompts_few_shot_from_train_jsonl(tiny_loaded, two_prompts, write_jsonl, tmp_path, capsys):
    tp = two_prompts
    data = write_jsonl([{"input": r.input, "output": r.output} for r in tp["rows"]], "test.jsonl")
    (data.parent / "instruction.txt").write_text(INSTRUCTION)
    train_rows = [{"input": f"{n} km", "output": f"{n}000 m"} for n in range(30, 40)] + [
        {"input": "4 km", "output": "4000 m"}]  # an evaluated input: never a shot
    write_jsonl(train_rows, "train.jsonl")
    out = tmp_path / "eval.json"
    argv = ["--task", "km", "--data", str(data), "--prompt", f"pa={tp['dir'] / 'pa.safetensors'}", "--prompt",
            f"pb={tp['dir'] / 'pb.safetensors'}", "--shots", "2", "--shots-seed", "3", "--json", str(out),
            "--max-new-tokens", str(tp["max_new"]), "--no-progress"]
    assert eval_main(argv, loaded=tiny_loaded) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert list(doc["summary"]) == ["base", "instruction", "instruction_chat", "few_shot", "few_shot_chat", "pa", "pb"]
    pool = [Row(i + 1, x["input"], x["output"]) for i, x in enumerate(train_rows)][:10]
    expect = random.Random(3).sample(pool, 2)
    assert [e["line"] for e in doc["shots"]["examples"]] == [r.line for r in expect]
    assert doc["shots"]["k"] == 2 and doc["shots"]["from"].endswith("train.jsonl")
    assert doc["prompts"]["pa"] == {"path": str(tp["dir"] / "pa.safetensors"), "template": "plain", "training": None}
    assert [r["results"]["pa"]["output"] for r in doc["rows"]] == tp["refs"]["pa"]
    assert "few-shot (text)" in printed and "case-insensitive" in printed
    assert eval_main(argv[:4] + ["--prompt", "x", "--prompt", "y"], loaded=tiny_loaded) == 2
    assert "given twice" in capsys.readouterr().err
    assert eval_main(argv[:4] + ["--prompt", "pa=/nope", "--shots-from", str(tmp_path / "no.jsonl")],
                     loaded=tiny_loaded) == 2
    assert "no such file" in capsys.readouterr().err


def test_answer_line():
    assert answer_line("\n\n 4 May 1700 \n5 May") == " 4 May 1700 " and answer_line(" \n") == answer_line("") == ""
