"""Case C12: stop strings, matched across token boundaries; no part of a stop string is ever emitted.

Unit tests drive :class:`server.detokenizer.StopMatcher` against a reference written here; API tests take the
tiny model's greedy reference (full forward passes) and cut it with stop strings built from its own text.
"""

from __future__ import annotations

import random

import pytest

from server.detokenizer import REPLACEMENT, StopMatcher


# ----------------------------------------------------------------------------------------------------- StopMatcher
def test_held_prefix_is_released_once_it_cannot_begin_the_stop():
    m = StopMatcher(["abcd"])
    assert m.feed("ab") == ""  # could be the start of "abcd"
    assert m.feed("cx") == "abcx"  # "abcx" cannot: all of it goes out
    assert not m.stopped
    assert m.feed("yab") == "y"
    assert m.feed("cd") == ""  # the stop string completes across two feeds; its first half was never emitted
    assert m.stopped
    assert m.feed("more") == "" and m.finish() == ""
    assert m.text == "abcx" + "y"  # everything before the stop string, all of it emitted


def test_stop_string_split_over_many_feeds():
    m = StopMatcher(["<END>"])
    out = [m.feed(c) for c in "hello <EN<END> tail"]
    assert "".join(out) == "hello <EN"
    assert m.stopped


def test_earliest_occurrence_wins_whatever_the_order_of_the_stops():
    text = "one two three four"
    for stops in (["four", "two"], ["two", "four"], ["ee f", "o t"]):
        m = StopMatcher(stops)
        got = m.feed(text)
        assert got == text[: min(text.find(s) for s in stops)]
        assert m.stopped


def test_finish_releases_the_held_tail_when_no_stop_came():
    m = StopMatcher(["xyz", "ab"])
    assert m.feed("123xy") == "123"
    assert m.feed("a") == "xy"  # "xya" is no stop prefix beyond its "a"
    assert m.finish() == "a"
    assert not m.stopped


def test_empty_stops_are_ignored_and_no_stops_pass_text_through():
    m = StopMatcher(["", ""])
    assert m.stops == ()
    assert m.feed("abc") == "abc" and m.feed("") == "" and m.finish() == ""


def _held(text: str, stops: list[str]) -> int:
    """Reference: the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(1, min(len(s) - 1, len(text)) + 1):
            if text.endswith(s[:k]):
                best = max(best, k)
    return best


def test_stop_matcher_matches_a_reference_on_random_inputs():
    """Reference: after each piece, if some stop string occurs in the text seen so far, the output is that text
    cut before the earliest such occurrence and nothing follows; otherwise exactly the longest suffix that could
    still begin a stop string is held back. Pieces model tokens' text deltas."""
    rng = random.Random(1234)
    alphabet = "ab c"
    stopped_runs = 0
    for _ in range(3000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        m = StopMatcher(stops)
        emitted, seen, i = "", "", 0
        while i < len(text):
            n = rng.randint(1, 5)
            piece = text[i : i + n]
            i += n
            seen += piece
            emitted += m.feed(piece)
            present = [seen.find(s) for s in stops if s in seen]
            if present:
                assert m.stopped
                assert emitted == seen[: min(present)], (stops, seen, emitted)
                break
            assert not m.stopped
            assert emitted == seen[: len(seen) - _held(seen, stops)], (stops, seen, emitted)
        if m.stopped:
            stopped_runs += 1
            assert m.feed("abc") == "" and m.finish() == ""
        else:
            assert emitted + m.finish() == text, (stops, text)
    assert 500 < stopped_runs < 2900  # both outcomes were exercised


# ----------------------------------------------------------------------------------------------------- API
PROMPTS = ["Once upon a time", "The weather today is"]
N = 24


@pytest.fixture(scope="module")
def references(tiny_loaded, greedy_ref):
    """prompt -> greedy reference tokens of the tiny model (no EOS within N tokens: checked)."""
    tok = tiny_loaded.tokenizer
    refs = {}
    for p in PROMPTS:
        ids, reason = greedy_ref(tiny_loaded, tok(p)["input_ids"], max_new_tokens=N)
        assert reason == "length"
        refs[p] = ids
    return refs


def _generate(client, prompt: str, stop: list[str] | None, stream: bool, parse_sse, max_new_tokens: int = N):
    params = {"max_new_tokens": max_new_tokens}
    if stop is not None:
        params["stop"] = stop
    resp = client.post("/v1/generate", json={"inputs": prompt, "parameters": params, "stream": stream})
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()
    return [d for _, d in parse_sse(resp.text)]


def _token_bounds(decode, ids: list[int]) -> list[int]:
    return [len(decode(ids[:j])) for j in range(len(ids) + 1)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reference_without_stop(client, references, decode, prompt, parse_sse):
    out = _generate(client, prompt, None, False, parse_sse)
    assert out["generated_text"] == decode(references[prompt])
    assert out["finish_reason"] == "length"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_c12a_stop_on_the_first_tokens_gives_empty_output(client, references, decode, prompt, parse_sse):
    ref = references[prompt]
    k = next(k for k in (4, 3) if REPLACEMENT not in decode(ref[:k]))
    stop = decode(ref[:k])
    out = _generate(client, prompt, [stop], False, parse_sse)
    assert out["generated_text"] == ""
    assert out["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == k  # generation ended at the token completing the stop string

    events = _generate(client, prompt, [stop], True, parse_sse)
    assert len(events) == 1  # no text delta at all: only the final event
    assert events[0]["text"] == "" and events[0]["finish_reason"] == "stop"
    assert events[0]["usage"]["completion_tokens"] == k


@pytest.mark.parametrize("prompt", PROMPTS)
def test_c12a_stop_wins_when_it_completes_on_the_last_allowed_token(client, references, decode, prompt, parse_sse):
    ref = references[prompt]
    stop = decode(ref[:3])
    out = _generate(client, prompt, [stop], False, parse_sse, max_new_tokens=3)
    assert (out["generated_text"], out["finish_reason"]) == ("", "stop")


def _word_stops(decode, ref: list[int]) -> list[tuple[str, int]]:
    """(stop, cut) for words of the reference minus their last letter whose first occurrence spans a token
    boundary and starts after the first token; cut = where the reference text is to be cut."""
    text = decode(ref)
    bounds = _token_bounds(decode, ref)
    out = []
    for word in text.split():
        if not (word.isalpha() and len(word) >= 5):
            continue
        stop = word[:-1]
        cut = text.find(stop)
        if cut >= bounds[1] and any(cut < b < cut + len(stop) for b in bounds):
            out.append((stop, cut))
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_c12b_stop_on_a_word_minus_its_last_letter(client, references, decode, prompt, parse_sse):
    ref = references[prompt]
    text = decode(ref)
    candidates = _word_stops(decode, ref)
    assert candidates, f"no usable word in {text!r}"
    for stop, cut in candidates[:2]:
        expected = text[:cut]
        out = _generate(client, prompt, [stop], False, parse_sse)
        assert out["generated_text"] == expected
        assert out["finish_reason"] == "stop"

        events = _generate(client, prompt, [stop], True, parse_sse)
        chunks = [e["text"] for e in events]
        assert "".join(chunks) == expected
        assert all(stop not in c for c in chunks)
        assert events[-1]["finish_reason"] == "stop"
        assert all("finish_reason" not in e for e in events[:-1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_that_might_begin_a_stop_is_released_when_it_cannot(client, references, decode, prompt, parse_sse):
    """A stop string that follows the reference for a while and then diverges never matches: every character is
    eventually released, and the held part comes out in a later event than without the stop."""
    ref = references[prompt]
    text = decode(ref)
    bounds = _token_bounds(decode, ref)
    start, end = bounds[2], bounds[5]  # the text of tokens 3..5, then a character the model never produced
    stop = text[start:end] + "\u2603"
    assert stop not in text
    out = _generate(client, prompt, [stop], False, parse_sse)
    assert out["generated_text"] == text and out["finish_reason"] == "length"

    chunks = [e["text"] for e in _generate(client, prompt, [stop], True, parse_sse)]
    assert "".join(chunks) == text
    plain = [e["text"] for e in _generate(client, prompt, None, True, parse_sse)]
    assert "".join(plain) == text
    # the held text left in fewer, larger chunks than without the stop: one event carries several tokens' text
    assert len(chunks) < len(plain)
    released_with_start = next(i for i, _ in enumerate(chunks) if len("".join(chunks[: i + 1])) > start)
    assert len("".join(chunks[: released_with_start + 1])) >= end


@pytest.mark.parametrize("prompt", PROMPTS[:1])
def test_several_stops_cut_at_the_earliest(client, references, decode, prompt, parse_sse):
    ref = references[prompt]
    text = decode(ref)
    early, late = decode(ref[5:7]), decode(ref[12:14])
    assert text.find(early) < text.find(late)
    for stops in ([late, early], [early, late]):
        out = _generate(client, prompt, stops, False, parse_sse)
        assert out["generated_text"] == text[: text.find(early)]
        assert out["finish_reason"] == "stop"


def test_stop_count_and_shape_are_validated(client, references, parse_sse):
    prompt = PROMPTS[0]
    eight = [f"\u2603{i}" for i in range(8)]
    ok = client.post("/v1/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2, "stop": eight}})
    assert ok.status_code == 200
    for bad in (eight + ["\u26039"], [""], "not-a-list"):
        resp = client.post("/v1/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2, "stop": bad}})
        assert resp.status_code == 422, bad
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "validation_error"
        assert err["param"].startswith("parameters.stop")
