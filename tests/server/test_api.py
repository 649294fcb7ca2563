"""The HTTP generation API on the tiny model: fields, defaults, validation (C10), empty input (C9), length
accounting (C11), unknown tasks and the task listing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from srv_helpers import EOS_ID, TINY_CONTEXT, assert_error, decode_text, greedy_reference, rand_tensor, raw_bytes

QA_N = 5


@pytest.fixture
def qa_prompt(prompts_dir: Path):
    """``qa``: a 5-token raw prompt in the prompt directory (loaded by the start-up scan)."""
    P = rand_tensor(QA_N, scale=2.0, seed=1)
    (prompts_dir / "qa.safetensors").write_bytes(raw_bytes(P))
    return P


@pytest.fixture
def qa_client(make_client, qa_prompt):
    return make_client()


def ref_tokens(loaded, text: str, prompt=None, n: int = 8) -> tuple[list[int], str]:
    ids = loaded.tokenizer(text)["input_ids"]
    return greedy_reference(loaded.model, ids, prompt, n, loaded.eos_token_ids)


def text_of(loaded, tokens: list[int]) -> str:
    return decode_text(loaded.tokenizer, tokens, loaded.eos_token_ids)


def gen(client, text: str, task: str | None = "qa", **params):
    url = f"/v1/tasks/{task}/generate" if task else "/v1/generate"
    return client.post(url, json={"inputs": text, "parameters": params})


def concurrently(fns) -> list:
    """Run the callables in threads at once; return their results in order."""
    out: list = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not t.is_alive() for t in threads)
    return out


# ------------------------------------------------------------------------------------------------ generation
def test_generate_on_task_and_on_base(qa_client, qa_prompt, tiny_loaded):
    text = "The weather today is"
    n_text = len(tiny_loaded.tokenizer(text)["input_ids"])
    r = gen(qa_client, text, max_new_tokens=6)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_text", "finish_reason", "task", "prompt_version", "usage"}
    ref, reason = ref_tokens(tiny_loaded, text, qa_prompt, 6)
    assert body["generated_text"] == text_of(tiny_loaded, ref)
    assert body["finish_reason"] == reason == "length"
    assert (body["task"], body["prompt_version"]) == ("qa", 1)
    assert body["usage"] == {"prompt_tokens": n_text, "virtual_tokens": QA_N, "completion_tokens": 6}

    r = gen(qa_client, text, task=None, max_new_tokens=6)
    assert r.status_code == 200
    body = r.json()
    ref_base, _ = ref_tokens(tiny_loaded, text, None, 6)
    assert ref_base != ref  # the prompt matters, so the two checks are distinct
    assert body["generated_text"] == text_of(tiny_loaded, ref_base)
    assert (body["task"], body["prompt_version"], body["finish_reason"]) == (None, None, "length")
    assert body["usage"] == {"prompt_tokens": n_text, "virtual_tokens": 0, "completion_tokens": 6}


def test_defaults_are_greedy_with_64_new_tokens(qa_client, qa_prompt, tiny_loaded):
    text = "Once upon a time"
    ref, reason = ref_tokens(tiny_loaded, text, qa_prompt, 64)
    assert reason == "length" and len(ref) == 64
    for body in ({"inputs": text}, {"inputs": text, "parameters": {}}):
        r = qa_client.post("/v1/tasks/qa/generate", json=body)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 64
        assert r.json()["generated_text"] == text_of(tiny_loaded, ref)  # greedy: the argmax reference


def test_default_max_new_tokens_comes_from_settings(make_client, qa_prompt, tiny_loaded):
    client = make_client(default_max_new_tokens=5)
    r = gen(client, "hello")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    r = gen(client, "hello", max_new_tokens=3)  # an explicit value wins
    assert r.json()["usage"]["completion_tokens"] == 3


def test_eos_stops_with_finish_reason_stop(make_client, tiny_eos_loaded):
    """C2 through the API: a row whose reference emits EOS at step k answers k tokens, "stop", no EOS text."""
    found = None
    for i in range(100):
        text = f"Sample number {i}"
        ref, reason = ref_tokens(tiny_eos_loaded, text, None, 8)
        if reason == "stop" and 2 <= len(ref) < 8:
            found = (text, ref)
            break
    assert found is not None
    text, ref = found
    client = make_client(loaded=tiny_eos_loaded)
    r = gen(client, text, task=None, max_new_tokens=8)
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(ref) and ref[-1] == EOS_ID
    assert body["generated_text"] == text_of(tiny_eos_loaded, ref[:-1])


def test_unknown_task_is_404(qa_client):
    r = gen(qa_client, "hi", task="nope", max_new_tokens=2)
    assert_error(r, 404, code="task_not_found", contains=("nope",))
    assert r.json()["error"]["type"] == "not_found_error"


def test_list_tasks(make_client, prompts_dir):
    (prompts_dir / "zeta.safetensors").write_bytes(raw_bytes(rand_tensor(3)))
    (prompts_dir / "alpha.safetensors").write_bytes(raw_bytes(rand_tensor(12)))
    client = make_client()
    r = client.get("/v1/tasks")
    assert r.status_code == 200
    assert r.json() == {"tasks": [
        {"task": "alpha", "num_virtual_tokens": 12, "version": 1, "peft_type": "RAW", "nbytes": 12 * 64 * 4},
        {"task": "zeta", "num_virtual_tokens": 3, "version": 1, "peft_type": "RAW", "nbytes": 3 * 64 * 4},
    ]}


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_c10_bad_max_new_tokens_is_422_naming_the_field(qa_client, value):
    for task in ("qa", None):
        r = gen(qa_client, "hi", task=task, max_new_tokens=value)
        err = assert_error(r, 422, code="validation_error", param="parameters.max_new_tokens",
                           contains=("max_new_tokens",))
        assert err["type"] == "invalid_request_error"


def test_c10_max_new_tokens_boolean_is_rejected(qa_client):
    """JSON ``true`` is not an integer; it must not be read as max_new_tokens = 1 (one token returned)."""
    r = gen(qa_client, "hi", max_new_tokens=True)
    assert_error(r, 422, param="parameters.max_new_tokens")


def test_c10_neighbours_unaffected(qa_client, qa_prompt, tiny_loaded):
    good = [("first words", 4), ("some other words here", 6), ("x", 5)]
    bad = [0, -1, 2.5]
    fns = [lambda t=t, n=n: gen(qa_client, t, max_new_tokens=n) for t, n in good]
    fns += [lambda v=v: gen(qa_client, "bad one", max_new_tokens=v) for v in bad]
    fns += [lambda t=t, n=n: gen(qa_client, t, task=None, max_new_tokens=n) for t, n in good]
    out = concurrently(fns)
    for (t, n), r in zip(good, out[:3], strict=True):
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
        assert r.json()["generated_text"] == text_of(tiny_loaded, ref_tokens(tiny_loaded, t, qa_prompt, n)[0])
    for r in out[3:6]:
        assert r.status_code == 422
    for (t, n), r in zip(good, out[6:], strict=True):
        assert r.status_code == 200
        assert r.json()["generated_text"] == text_of(tiny_loaded, ref_tokens(tiny_loaded, t, None, n)[0])


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1000}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"beam_width": 4}, "beam_width"),
    ],
)
def test_bad_sampling_parameters_are_422(qa_client, params, field):
    r = qa_client.post("/v1/tasks/qa/generate", json={"inputs": "hi", "parameters": params})
    assert_error(r, 422, param=f"parameters.{field}", contains=(field,))


def test_malformed_bodies_are_422_and_invalid_json_400(qa_client):
    assert_error(qa_client.post("/v1/generate", json={"parameters": {}}), 422, param="inputs")
    assert_error(qa_client.post("/v1/generate", json={"inputs": 5}), 422, param="inputs")
    r = qa_client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json", contains=("line 1, column 2",))


def test_sampled_generation_with_seed_is_reproducible(qa_client):
    a = gen(qa_client, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7).json()
    b = gen(qa_client, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7).json()
    c = gen(qa_client, "hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["generated_text"] != c["generated_text"]


# ------------------------------------------------------------------------------------------------ C9 empty input
def test_c9_empty_input(qa_client, qa_prompt, tiny_loaded):
    """Rule: a row with at least one position (virtual token or BOS) generates; a row with none gets a 422.
    SmolLM2's tokenizer adds no BOS, so "" has no text token."""
    assert tiny_loaded.tokenizer("")["input_ids"] == []
    r = gen(qa_client, "", max_new_tokens=4)
    assert r.status_code == 200
    ref, _ = greedy_reference(tiny_loaded.model, [], qa_prompt, 4)
    assert r.json()["generated_text"] == text_of(tiny_loaded, ref)
    assert r.json()["usage"] == {"prompt_tokens": 0, "virtual_tokens": QA_N, "completion_tokens": 4}

    assert_error(gen(qa_client, "", task=None, max_new_tokens=4), 422, code="empty_input", param="inputs",
                 contains=("empty",))

    texts = ["a normal request", "another one", "and a third"]
    fns = [lambda t=t: gen(qa_client, t, max_new_tokens=5) for t in texts]
    fns.insert(1, lambda: gen(qa_client, "", task=None, max_new_tokens=5))
    fns.insert(3, lambda: gen(qa_client, "", max_new_tokens=5))
    out = concurrently(fns)
    assert [r.status_code for r in out] == [200, 422, 200, 200, 200]
    for t, r in zip(texts, [out[0], out[2], out[4]], strict=True):
        assert r.json()["generated_text"] == text_of(tiny_loaded, ref_tokens(tiny_loaded, t, qa_prompt, 5)[0])
    assert out[3].json()["generated_text"] == text_of(tiny_loaded, greedy_reference(
        tiny_loaded.model, [], qa_prompt, 5)[0])

    assert qa_client.get("/health").status_code == 200
    r = gen(qa_client, "next one", max_new_tokens=3)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------------ C11
def test_c11a_usage_with_virtual_tokens(make_client, prompts_dir, tiny_loaded):
    P = rand_tensor(20, seed=5)
    (prompts_dir / "v20.safetensors").write_bytes(raw_bytes(P))
    client = make_client()
    text = "one two three four five"
    assert len(tiny_loaded.tokenizer(text)["input_ids"]) == 5
    with_p = gen(client, text, task="v20", max_new_tokens=7).json()
    without = gen(client, text, task=None, max_new_tokens=7).json()
    assert with_p["usage"] == {"prompt_tokens": 5, "virtual_tokens": 20, "completion_tokens": 7}
    assert without["usage"] == {"prompt_tokens": 5, "virtual_tokens": 0, "completion_tokens": 7}
    assert with_p["finish_reason"] == without["finish_reason"] == "length"


def _text_of_length(tok, n: int) -> str:
    text = "start"
    while len(tok(text)["input_ids"]) < n:
        text += " go"
    assert len(tok(text)["input_ids"]) == n
    return text


def test_c11b_context_overflow_is_4xx_naming_the_numbers(qa_client, qa_prompt, tiny_loaded):
    tok = tiny_loaded.tokenizer
    nt = 230
    text = _text_of_length(tok, nt)
    fits = TINY_CONTEXT - QA_N - nt  # 21
    r = gen(qa_client, text, max_new_tokens=fits + 1)
    err = assert_error(r, 400, code="context_length_exceeded", param="inputs")
    for number in (QA_N, nt, fits + 1, TINY_CONTEXT, TINY_CONTEXT + 1):
        assert str(number) in err["message"]
    assert "virtual" in err["message"] and "max_new_tokens" in err["message"]
    # exactly at the limit: served, and no truncation of the input
    r = gen(qa_client, text, max_new_tokens=fits)
    assert r.status_code == 200
    body = r.json()
    ref, reason = greedy_reference(tiny_loaded.model, tok(text)["input_ids"], qa_prompt, fits)
    assert body["usage"] == {"prompt_tokens": nt, "virtual_tokens": QA_N, "completion_tokens": len(ref)}
    assert body["finish_reason"] == reason and body["generated_text"] == text_of(tiny_loaded, ref)
    # the base model: its limit counts no virtual tokens
    r = gen(qa_client, text, task=None, max_new_tokens=TINY_CONTEXT - nt + 1)
    assert_error(r, 400, code="context_length_exceeded", contains=(str(nt), str(TINY_CONTEXT)))
    r = gen(qa_client, text, task=None, max_new_tokens=TINY_CONTEXT - nt)
    assert r.status_code == 200
    assert qa_client.get("/health").status_code == 200


def test_tiny_temperature_does_not_kill_the_engine(qa_client, qa_prompt, tiny_loaded):
    """temperature=1e-40 passes validation (>= 0). Whatever the answer (greedy-like 200, or a 422), one request
    must never take the engine down for everyone."""
    r = gen(qa_client, "hello", max_new_tokens=3, temperature=1e-40)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert r.json()["generated_text"] == text_of(tiny_loaded, ref_tokens(tiny_loaded, "hello", qa_prompt, 3)[0])
    assert qa_client.get("/health").status_code == 200
    r = gen(qa_client, "next", max_new_tokens=2)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
