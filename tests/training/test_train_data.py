"""Data files: validation with line numbers (each problem), the template, batching, and the CLI's exit status."""

from __future__ import annotations

import json

import pytest

from training.cli import train_main
from training.data import IGNORE_INDEX, DataError, Row, collate, encode_row, encode_rows, end_of_turn_id, read_rows

GOOD = {"input": "3 km", "output": "3000 m"}


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ('{"input": "x", "output": ', "invalid JSON"),
        ('["input", "output"]', "expected a JSON object"),
        ('{"output": "y"}', "missing field 'input'"),
        ('{"input": "x"}', "missing field 'output'"),
        ('{"input": 3, "output": "y"}', "field 'input' must be a string, got int"),
        ('{"input": "x", "output": null}', "field 'output' must be a string, got NoneType"),
        ('{"input": "x", "output": "   "}', "empty output"),
    ],
)
def test_bad_rows_are_refused_with_their_line_number(write_jsonl, bad_line, needle):
    path = write_jsonl([GOOD, "", GOOD, bad_line, GOOD])  # line 2 is blank (skipped); the bad row is line 4
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert info.value.problems[0][0] == 4
    assert f"{path}:4: " in str(info.value) and needle in str(info.value)


def test_every_bad_line_is_listed(write_jsonl):
    path = write_jsonl([GOOD, '{"input": "x"}', GOOD, "nope", '{"input": "", "output": ""}'])
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert [n for n, _ in info.value.problems] == [2, 4, 5]
    assert str(info.value).startswith(f"3 bad lines in {path}")


def test_empty_and_missing_files(write_jsonl, tmp_path):
    with pytest.raises(DataError, match="no rows"):
        read_rows(write_jsonl(["", "  "]))
    with pytest.raises(DataError, match="cannot read"):
        read_rows(tmp_path / "absent.jsonl")


def test_good_rows_keep_line_numbers_and_extra_keys_are_ignored(write_jsonl):
    rows = read_rows(write_jsonl([GOOD, "", {**GOOD, "note": 1}]))
    assert [(r.line, r.input, r.output) for r in rows] == [(1, "3 km", "3000 m"), (3, "3 km", "3000 m")]


def test_row_longer_than_the_context_is_refused(write_jsonl, smol_tokenizer):
    path = write_jsonl([GOOD, {"input": "word " * 300, "output": "y"}])
    rows = read_rows(path)
    with pytest.raises(DataError) as info:
        encode_rows(path, rows, smol_tokenizer, end_id=2, num_virtual_tokens=20, max_context=256)
    msg = str(info.value)
    assert f"{path}:2: row too long" in msg and "exceeds the model's context of 256 tokens" in msg
    n_in = len(smol_tokenizer("word " * 300)["input_ids"])
    assert f"20 virtual + {n_in} input + 2 output (end token included) = {22 + n_in} tokens" in msg  # "y" + EOS
    # the virtual tokens count: a row that fits alone no longer fits with more of them
    encode_rows(path, rows[:1], smol_tokenizer, end_id=2, num_virtual_tokens=20, max_context=256)
    with pytest.raises(DataError, match=":1: row too long"):
        encode_rows(path, rows[:1], smol_tokenizer, end_id=2, num_virtual_tokens=250, max_context=256)


def test_plain_template_is_what_the_server_tokenizes(smol_tokenizer):
    tok = smol_tokenizer
    enc = encode_row(tok, Row(1, "2021-03-14", "14 March 2021"), end_id=2)
    inp = tok("2021-03-14")["input_ids"]  # server.request_builder.make_request: tokenizer defaults
    out = tok("14 March 2021", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == inp + out + [2]
    assert enc.labels == [IGNORE_INDEX] * len(inp) + out + [2]
    assert enc.num_output == len(out) + 1


def test_chat_template_matches_chat_completions(smol_tokenizer):
    tok = smol_tokenizer
    eot = end_of_turn_id(tok, (2,))
    assert eot == tok.convert_tokens_to_ids("<|im_end|>")
    enc = encode_row(tok, Row(1, "hello", " hi"), end_id=eot, chat_template=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)  # what /v1/chat/completions feeds the model
    out = tok(" hi", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == list(chat) + out + [eot]
    assert enc.labels[: len(chat)] == [IGNORE_INDEX] * len(chat)


def test_collate_pads_on_the_right(smol_tokenizer):
    a = encode_row(smol_tokenizer, Row(1, "1 km", "1000 m"), end_id=2)
    b = encode_row(smol_tokenizer, Row(2, "a much longer input text here", "x"), end_id=2)
    batch = collate([a, b], pad_id=2)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all() and batch["input_ids"][0, :n].tolist() == a.input_ids


def test_cli_prints_the_line_and_exits_2(write_jsonl, fresh_tiny, tmp_path, capsys):
    path = write_jsonl([GOOD, GOOD, json.dumps({"input": "x", "output": ""})])
    code = train_main(["--task", "t", "--data", str(path), "--out", str(tmp_path / "out"), "--no-progress"],
                      loaded=fresh_tiny)
    assert code == 2
    err = capsys.readouterr().err
    assert f"{path}:3: empty output" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_task_name(km_data, fresh_tiny, capsys):
    assert train_main(["--task", "Bad/Name", "--data", str(km_data)], loaded=fresh_tiny) == 2
    assert "task name must match" in capsys.readouterr().err
