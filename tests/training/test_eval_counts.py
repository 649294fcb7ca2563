"""``softprompt eval`` counts correctly: expected answers are built from references computed independently
(full forward passes, no engine), then the engine-backed and HTTP-backed evaluations must reproduce them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import greedy

from training.cli import eval_main
from training.data import Row, input_ids_for, read_rows
from training.evaluate import (
    CONDITIONS,
    EngineBackend,
    HTTPBackend,
    evaluate,
    exact_match,
    first_line_match,
    make_jobs,
)

INSTRUCTION = "Convert to metres.\n"
MAX_NEW = 5


def test_metrics():
    assert exact_match("  14 March 2021\n", "14 March 2021") and not exact_match("14 March 2021.", "14 March 2021")
    assert first_line_match("\n 14 March 2021 \nmore", "14 March 2021") and not exact_match("14 March\nx", "14 March")
    assert not first_line_match("", "x") and not first_line_match("x y\n", "x")


def test_jobs_join_instruction_and_input_verbatim():
    rows = [Row(1, "7 km", "7000 m")]
    jobs = make_jobs(rows, CONDITIONS, INSTRUCTION, soft_prompt_chat=False)
    assert [(j.condition, j.text, j.chat, j.soft_prompt) for j in jobs] == [
        ("base", "7 km", False, False),
        ("instruction", "Convert to metres.\n7 km", False, False),
        ("instruction_chat", "Convert to metres.\n7 km", True, False),
        ("soft_prompt", "7 km", False, True),
    ]
    with pytest.raises(ValueError, match="instruction file"):
        make_jobs(rows, CONDITIONS, None, False)
    with pytest.raises(ValueError, match="unknown conditions"):
        make_jobs(rows, ("nope",), None, False)


@pytest.fixture(scope="module")
def known(tiny_loaded, tmp_path_factory):
    """A RAW prompt file, 12 rows, and every condition's reference text per row (decoded without EOS)."""
    tmp_path = tmp_path_factory.mktemp("known")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(6, 64, generator=g) * 2.0
    save_file({"p": prompt}, str(tmp_path / "km.safetensors"))
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    inputs = [f"{n} km" for n in range(2, 14)]
    refs: dict[str, list[str]] = {c: [] for c in CONDITIONS}
    for text in inputs:
        for c, ids, p in [
            ("base", input_ids_for(tok, text), None),
            ("instruction", input_ids_for(tok, INSTRUCTION + text), None),
            ("instruction_chat", input_ids_for(tok, INSTRUCTION + text, chat_template=True), None),
            ("soft_prompt", input_ids_for(tok, text), prompt),
        ]:
            refs[c].append(tok.decode(greedy(model, ids, p, MAX_NEW), skip_special_tokens=True))
    # expected answers: rows 0-2 take the base reference, 3-5 the instruction's, 6-8 the chat instruction's,
    # 9-10 the soft prompt's, row 11 an answer nobody gives
    expected = []
    for i in range(12):
        cond = CONDITIONS[min(i // 3, 3)] if i < 11 else None
        answer = refs[cond][i].strip() if cond else "never produced"
        expected.append(answer or "empty reference")
    rows = [Row(i + 1, text, exp) for i, (text, exp) in enumerate(zip(inputs, expected, strict=True))]
    counts = {c: sum(refs[c][i].strip() == expected[i] for i in range(12)) for c in CONDITIONS}
    return {"prompt_path": tmp_path / "km.safetensors", "rows": rows, "refs": refs, "counts": counts}


def _check(result, known):
    for c in CONDITIONS:
        assert [r["results"][c]["output"] for r in result["rows"]] == known["refs"][c], c
        s = result["summary"][c]
        assert s["exact"] == known["counts"][c] and s["total"] == 12 and s["errors"] == 0, (c, s)
        assert s["exact_match"] == pytest.approx(known["counts"][c] / 12)
        assert s["first_line"] >= s["exact"]
    assert known["counts"]["base"] >= 3 and known["counts"]["soft_prompt"] >= 2


def test_engine_eval_counts_known_answers(tiny_loaded, known):
    backend = EngineBackend(tiny_loaded, "km", known["prompt_path"])
    result = evaluate(known["rows"], backend, instruction=INSTRUCTION, max_new_tokens=MAX_NEW, progress=False)
    _check(result, known)
    for row in result["rows"]:
        for res in row["results"].values():
            assert res["exact"] == exact_match(res["output"], row["expected"])


def test_server_eval_counts_known_answers(make_client, known):
    prompts = known["prompt_path"].parent
    client = make_client(prompts=prompts)
    assert [t["task"] for t in client.get("/v1/tasks").json()["tasks"]] == ["km"]
    backend = HTTPBackend("http://testserver", "km", http=client, concurrency=4)
    result = evaluate(known["rows"], backend, instruction=INSTRUCTION, max_new_tokens=MAX_NEW, progress=False)
    _check(result, known)


def test_cli_writes_table_and_per_row_json(tiny_loaded, known, write_jsonl, tmp_path, capsys):
    data = write_jsonl([{"input": r.input, "output": r.output} for r in known["rows"]], "test.jsonl")
    (data.parent / "instruction.txt").write_text(INSTRUCTION)
    out = tmp_path / "eval.json"
    argv = ["--task", "km", "--data", str(data), "--prompt", str(known["prompt_path"]), "--json", str(out),
            "--max-new-tokens", str(MAX_NEW), "--no-progress"]
    assert eval_main(argv, loaded=tiny_loaded) == 0
    table = capsys.readouterr().out
    (line,) = [x for x in table.splitlines() if x.startswith("soft prompt")]
    assert f"{known['counts']['soft_prompt']:>5}/12" in line
    doc = json.loads(out.read_text())
    assert doc["instruction"] == INSTRUCTION and doc["max_new_tokens"] == MAX_NEW
    assert {c: doc["summary"][c]["exact"] for c in CONDITIONS} == known["counts"]
    assert [r["line"] for r in doc["rows"]] == list(range(1, 13))
    assert read_rows(data)[0].output == doc["rows"][0]["expected"]


def test_cli_refuses_bad_data(tiny_loaded, write_jsonl, tmp_path, capsys):
    data = write_jsonl(['{"input": "x", "output": "y"}', '{"input": "x"}'], "bad.jsonl")
    assert eval_main(["--task", "km", "--data", str(data), "--prompt", str(tmp_path)], loaded=tiny_loaded) == 2
    assert f"{data}:2: missing field 'output'" in capsys.readouterr().err


def test_chat_template_prompt_is_evaluated_on_the_chat_template(fresh_tiny, km_data, tmp_path):
    """A prompt trained with ``--chat-template`` records it; eval then serves it on the chat-rendered input."""
    from safetensors.torch import load_file

    from training.cli import _recorded_template
    from training.train import TrainConfig, train

    out = tmp_path / "chat"
    train(fresh_tiny, TrainConfig(task="km", data=km_data, out=out, steps=2, chat_template=True, progress=False),
          log=lambda *_: None)
    assert _recorded_template(out) is True and _recorded_template(tmp_path) is False
    rows = [Row(1, "7 km", "7000 m"), Row(2, "9 km", "9000 m")]
    result = evaluate(rows, EngineBackend(fresh_tiny, "km", out), conditions=("soft_prompt",), instruction=None,
                      max_new_tokens=4, soft_prompt_chat=True, progress=False)
    prompt = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    tok = fresh_tiny.tokenizer
    for row, res in zip(rows, result["rows"], strict=True):
        ref = greedy(fresh_tiny.model, input_ids_for(tok, row.input, chat_template=True), prompt, 4)
        assert res["results"]["soft_prompt"]["output"] == tok.decode(ref, skip_special_tokens=True)


def test_engine_eval_reports_a_rejected_row_as_an_error(tiny_loaded):
    """A row the engine refuses (longer than the context) is that row's error, not the run's: the request is built
    and checked by ``server.request_builder.make_request``, without the HTTP layer."""
    rows = [Row(1, "2 km", "2000 m"), Row(2, "km " * 400, "x")]
    result = evaluate(rows, EngineBackend(tiny_loaded, "km", None), conditions=("base",), instruction=None,
                      max_new_tokens=MAX_NEW, progress=False)
    assert result["summary"]["base"]["errors"] == 1
    assert result["rows"][0]["results"]["base"]["error"] is None
    bad = result["rows"][1]["results"]["base"]
    assert bad["output"] == "" and bad["finish_reason"] is None and "context" in bad["error"], bad
