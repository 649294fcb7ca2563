"""Case C13: multi-byte characters split across tokens, in the incremental detokenizer and through the API.

SmolLM2's byte-level BPE splits CJK characters and emoji over several tokens; alone, such a token decodes to
U+FFFD. The detokenizer must hold those bytes until the character is complete, so the joined chunks equal the full
decode, no chunk holds U+FFFD, and ``flush`` releases what is held at the end.
"""

from __future__ import annotations

import pytest

from server.detokenizer import REPLACEMENT, IncrementalDetokenizer, TextPipeline

# accented letters, CJK and two emoji (one of them glued to a CJK run, one followed by a word)
TEXT = "Café naïve, résumé: 東京の天気は晴れ 🙂🎉 ok"


@pytest.fixture(scope="module")
def text_ids(smol_tokenizer) -> list[int]:
    ids = list(smol_tokenizer(TEXT)["input_ids"])
    # preconditions the tests rely on, computed: the text round-trips and some tokens are partial characters
    assert smol_tokenizer.decode(ids) == TEXT
    assert sum(REPLACEMENT in smol_tokenizer.decode([i]) for i in ids) >= 5
    return ids


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


def test_c13_chunks_join_to_the_full_decode_and_never_hold_replacement_chars(smol_tokenizer, text_ids):
    detok = IncrementalDetokenizer(smol_tokenizer)
    full = smol_tokenizer.decode(text_ids)
    released = ""
    held_steps = 0
    for k, i in enumerate(text_ids, start=1):
        chunk = detok.add(i)
        assert REPLACEMENT not in chunk, f"chunk {chunk!r} after token {k}"
        held_steps += chunk == ""
        released += chunk
        # what is out is always a prefix of the final text, and everything complete is out
        prefix = smol_tokenizer.decode(text_ids[:k])
        assert full.startswith(released)
        if not prefix.endswith(REPLACEMENT):
            assert released == prefix
    assert held_steps > 0  # some tokens were partial characters and were held
    tail = detok.flush()
    assert released + tail == full
    assert tail == ""  # the text ends on a complete character: nothing was left to release


def test_c13_flush_releases_bytes_held_mid_character(smol_tokenizer, text_ids):
    cuts = [k for k in range(1, len(text_ids)) if smol_tokenizer.decode(text_ids[:k]).endswith(REPLACEMENT)]
    assert len(cuts) >= 5
    for k in cuts:
        detok = IncrementalDetokenizer(smol_tokenizer)
        released = "".join(feed(detok, text_ids[:k]))
        assert REPLACEMENT not in released
        last_complete = max(j for j in range(k) if not smol_tokenizer.decode(text_ids[:j]).endswith(REPLACEMENT))
        assert released == smol_tokenizer.decode(text_ids[:last_complete])
        tail = detok.flush()
        assert tail != ""
        # the held bytes come out as a full decode renders them (an incomplete character is U+FFFD there too)
        assert released + tail == smol_tokenizer.decode(text_ids[:k])
        assert detok.flush() == ""  # nothing is released twice


def test_skip_ids_are_never_rendered(smol_tokenizer, text_ids):
    eos = smol_tokenizer.eos_token_id
    detok = IncrementalDetokenizer(smol_tokenizer, skip_ids=[eos])
    mid = len(text_ids) // 2
    chunks = feed(detok, text_ids[:mid] + [eos] + text_ids[mid:] + [eos])
    assert chunks[mid] == "" and chunks[-1] == ""
    assert eos not in detok.ids
    assert "".join(chunks) + detok.flush() == TEXT


@pytest.mark.parametrize("stop", ["天気", "🎉", "晴れ 🙂", "é: 東"])
def test_c13_output_processor_cuts_multibyte_stop_strings(smol_tokenizer, text_ids, stop):
    proc = TextPipeline(smol_tokenizer, [smol_tokenizer.eos_token_id], [stop])
    expected = TEXT[: TEXT.index(stop)]
    out, hit_at = [], None
    for k, i in enumerate(text_ids, start=1):
        delta, hit = proc.add(i)
        assert REPLACEMENT not in delta
        out.append(delta)
        if hit:
            hit_at = k
            break
    assert hit_at is not None
    # the stop string is found at the first token whose text completes it (it spans several tokens)
    assert stop in smol_tokenizer.decode(text_ids[:hit_at])
    assert stop not in smol_tokenizer.decode(text_ids[: hit_at - 1])
    assert "".join(out) == expected == proc.text
    assert proc.finish() == ""


def test_output_processor_without_stops_releases_everything(smol_tokenizer, text_ids):
    proc = TextPipeline(smol_tokenizer, [smol_tokenizer.eos_token_id])
    parts = [proc.add(i)[0] for i in text_ids[:-3]]
    parts.append(proc.finish())  # ends mid-emoji: the held bytes are flushed as a full decode renders them
    assert "".join(parts) == smol_tokenizer.decode(text_ids[:-3]) == proc.text


# ----------------------------------------------------------------------------------------------------- end to end
def _expected_chunks(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_ids=[tokenizer.eos_token_id])
    return [c for c in feed(detok, ids) if c]


def test_c13_stream_through_the_api_with_scripted_tokens(client, script_engine, smol_tokenizer, text_ids,
                                                          parse_sse):
    """The tiny model is made to emit exactly the tokens of TEXT (then EOS); the SSE deltas must be whole
    characters, and the stream, the plain response and the full decode must agree."""
    engine = client.app.state.sp.engine
    prompt = "x"
    script_engine(engine, len(smol_tokenizer(prompt)["input_ids"]), text_ids)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": len(text_ids) + 5}}

    plain = client.post("/v1/generate", json=body)
    assert plain.status_code == 200
    assert plain.json()["generated_text"] == TEXT
    assert plain.json()["finish_reason"] == "stop"
    assert plain.json()["usage"]["completion_tokens"] == len(text_ids) + 1  # the EOS token counts

    resp = client.post("/v1/generate", json={**body, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert all(ev is None for ev, _ in events)
    texts = [d["text"] for _, d in events]
    assert all(REPLACEMENT not in t for t in texts)
    assert "".join(texts) == TEXT
    # one event per non-empty delta, then the final event (whose delta is empty: EOS renders nothing)
    assert texts[:-1] == _expected_chunks(smol_tokenizer, text_ids)
    assert texts[-1] == ""
    assert events[-1][1]["finish_reason"] == "stop"


def test_c13_stream_cut_mid_character_by_max_new_tokens(client, script_engine, smol_tokenizer, text_ids, parse_sse):
    engine = client.app.state.sp.engine
    prompt = "x"
    k = next(k for k in range(len(text_ids), 0, -1) if smol_tokenizer.decode(text_ids[:k]).endswith(REPLACEMENT))
    script_engine(engine, len(smol_tokenizer(prompt)["input_ids"]), text_ids)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": k}}
    plain = client.post("/v1/generate", json=body).json()
    assert plain["finish_reason"] == "length"
    assert plain["generated_text"] == smol_tokenizer.decode(text_ids[:k])
    events = parse_sse(client.post("/v1/generate", json={**body, "stream": True}).text)
    texts = [d["text"] for _, d in events]
    assert all(REPLACEMENT not in t for t in texts[:-1])
    assert texts[-1] != ""  # the final event carries the flushed bytes
    assert "".join(texts) == plain["generated_text"]


def test_c13_real_model_streams_emoji_intact(make_client, smol_loaded, greedy_ref, decode, parse_sse):
    """SmolLM2 continues a list of emoji; each emoji is several tokens."""
    tok = smol_loaded.tokenizer
    prompt = "Here is a list of emojis: 😀 😃 😄"
    long_ids, _ = greedy_ref(smol_loaded, tok(prompt)["input_ids"], max_new_tokens=12, cached=True)
    # the longest prefix that ends on a whole character, so the reference text is clean
    n = max(k for k in range(1, len(long_ids) + 1) if not decode(long_ids[:k]).endswith(REPLACEMENT))
    ref_ids = long_ids[:n]
    ref_text = decode(ref_ids)
    assert sum(REPLACEMENT in tok.decode([t]) for t in ref_ids) >= 2  # the output really splits characters
    assert REPLACEMENT not in ref_text

    c = make_client(loaded=smol_loaded)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    plain = c.post("/v1/generate", json=body).json()
    assert plain["generated_text"] == ref_text
    events = parse_sse(c.post("/v1/generate", json={**body, "stream": True}).text)
    texts = [d["text"] for _, d in events]
    assert all(REPLACEMENT not in t for t in texts)
    assert "".join(texts) == ref_text
