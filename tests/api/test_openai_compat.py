"""The OpenAI-compatible API, driven by the official ``openai`` package against a live server on 127.0.0.1.

``model`` names a task (its soft prompt is prepended) or the base model's id. Usage rule: ``prompt_tokens``
counts text (or chat-template) tokens only, ``virtual_tokens`` is reported apart, ``total = prompt +
completion``.
"""

from __future__ import annotations

import httpx
import openai
import pytest

TASK_N = 6


@pytest.fixture
def srv(live_server):
    return live_server()


@pytest.fixture
def oai(srv):
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _upload(srv, task: str, data: bytes) -> dict:
    resp = httpx.put(f"{srv.url}/v1/admin/prompts/{task}", headers=srv.admin_headers,
                     files={"file": (f"{task}.safetensors", data)}, timeout=60)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


@pytest.fixture
def task_emb(rand_embeddings):
    return rand_embeddings(TASK_N, scale=2.0, seed=11)


@pytest.fixture
def task(srv, task_emb, safetensors_bytes) -> str:
    _upload(srv, "pirate", safetensors_bytes(task_emb))
    return "pirate"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(ids)


# ----------------------------------------------------------------------------------------------------- models
def test_models_list_shows_base_and_tasks_and_follows_uploads(srv, oai, rand_embeddings, safetensors_bytes):
    base = srv.engine.loaded.model_id
    assert [m.id for m in oai.models.list()] == [base]
    _upload(srv, "zeta", safetensors_bytes(rand_embeddings(3)))
    _upload(srv, "alpha", safetensors_bytes(rand_embeddings(5)))
    models = oai.models.list().data
    assert [m.id for m in models] == [base, "alpha", "zeta"]
    assert all(m.object == "model" for m in models)
    raw = httpx.get(f"{srv.url}/v1/models").json()
    by_id = {m["id"]: m for m in raw["data"]}
    assert by_id["alpha"]["num_virtual_tokens"] == 5 and by_id["zeta"]["num_virtual_tokens"] == 3
    assert by_id["alpha"]["root"] == base

    out = oai.completions.create(model="zeta", prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.model_extra["virtual_tokens"] == 3

    resp = httpx.delete(f"{srv.url}/v1/admin/prompts/zeta", headers=srv.admin_headers)
    assert resp.status_code == 200
    assert [m.id for m in oai.models.list()] == [base, "alpha"]
    with pytest.raises(openai.NotFoundError) as exc:
        oai.completions.create(model="zeta", prompt="Hi", max_tokens=2)
    assert exc.value.code == "model_not_found"


# ----------------------------------------------------------------------------------------------------- completions
@pytest.mark.parametrize("use_task", [False, True])
def test_completion_stream_joins_to_the_plain_completion(srv, oai, task, use_task):
    model = task if use_task else srv.engine.loaded.model_id
    kw = dict(model=model, prompt="Tell me a story about", max_tokens=16, temperature=0)
    plain = oai.completions.create(**kw)
    assert plain.object == "text_completion" and plain.model == model
    (choice,) = plain.choices
    chunks = list(oai.completions.create(**kw, stream=True))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_task_and_base_model_differ_and_each_matches_its_reference(srv, oai, task, task_emb, tiny_loaded,
                                                                   greedy_ref, decode):
    prompt = "The best way to cook rice is"
    ids = _ids(tiny_loaded.tokenizer, prompt)
    base_ref, _ = greedy_ref(tiny_loaded, ids, max_new_tokens=12)
    task_ref, _ = greedy_ref(tiny_loaded, ids, task_emb, max_new_tokens=12)
    assert base_ref != task_ref
    base = oai.completions.create(model=srv.engine.loaded.model_id, prompt=prompt, max_tokens=12, temperature=0)
    steered = oai.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
    assert base.choices[0].text == decode(base_ref)
    assert steered.choices[0].text == decode(task_ref)
    assert base.choices[0].text != steered.choices[0].text


def test_usage_excludes_virtual_tokens_and_reports_them(srv, oai, task, tiny_loaded):
    prompt = ["Count the virtual tokens"]  # a list holding one prompt is accepted too
    n_text = len(_ids(tiny_loaded.tokenizer, prompt[0]))
    out = oai.completions.create(model=task, prompt=prompt, max_tokens=7, temperature=0)
    u = out.usage
    assert u.prompt_tokens == n_text
    assert u.model_extra["virtual_tokens"] == TASK_N
    assert u.completion_tokens == 7
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    raw = httpx.post(f"{srv.url}/v1/completions", json={"model": task, "prompt": prompt[0], "max_tokens": 7,
                                                         "temperature": 0}).json()
    assert raw["usage"] == {"prompt_tokens": n_text, "completion_tokens": 7, "total_tokens": n_text + 7,
                            "virtual_tokens": TASK_N}
    assert raw["choices"][0]["text"] == out.choices[0].text

    base = oai.completions.create(model=srv.engine.loaded.model_id, prompt=prompt, max_tokens=3, temperature=0)
    assert base.usage.prompt_tokens == n_text and base.usage.model_extra["virtual_tokens"] == 0


@pytest.mark.parametrize("chat", [False, True])
def test_stream_options_include_usage_gives_a_usage_chunk(srv, oai, task, chat):
    if chat:
        kw = dict(model=task, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0)
        create = oai.chat.completions.create
    else:
        kw = dict(model=task, prompt="Hello there", max_tokens=6, temperature=0)
        create = oai.completions.create
    plain = create(**kw)
    chunks = list(create(**kw, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert last.usage.model_extra["virtual_tokens"] == TASK_N
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_is_honoured(srv, oai, tiny_loaded, greedy_ref, decode):
    base = srv.engine.loaded.model_id
    prompt = "My favourite colour is"
    ref, _ = greedy_ref(tiny_loaded, _ids(tiny_loaded.tokenizer, prompt), max_new_tokens=16)
    text = decode(ref)
    stop = decode(ref[6:8])  # two tokens' text, spanning a token boundary
    cut = text.find(stop)
    assert cut > 0
    for stop_arg in (stop, [stop], ["\u2603never", stop]):
        out = oai.completions.create(model=base, prompt=prompt, max_tokens=16, temperature=0, stop=stop_arg)
        assert out.choices[0].text == text[:cut]
        assert out.choices[0].finish_reason == "stop"
        streamed = list(oai.completions.create(model=base, prompt=prompt, max_tokens=16, temperature=0,
                                               stop=stop_arg, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == text[:cut]
        assert streamed[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.completions.create(model=base, prompt=prompt, max_tokens=4, stop=[f"s{i}" for i in range(9)])
    assert exc.value.body["param"] == "stop"


def test_seed_and_max_tokens_are_honoured(srv, oai, tiny_loaded, greedy_ref):
    base = srv.engine.loaded.model_id
    kw = dict(model=base, prompt="Random words:", temperature=1.0, max_tokens=12)
    a = oai.completions.create(**kw, seed=42)
    b = oai.completions.create(**kw, seed=42)
    c = oai.completions.create(**kw, seed=43)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text
    streamed = list(oai.completions.create(**kw, seed=42, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == a.choices[0].text

    ref, _ = greedy_ref(tiny_loaded, _ids(tiny_loaded.tokenizer, "Random words:"), max_new_tokens=5)
    assert tiny_loaded.tokenizer.eos_token_id not in ref
    by_max_tokens = oai.completions.create(model=base, prompt="Random words:", temperature=0, max_tokens=5)
    by_max_completion = oai.completions.create(model=base, prompt="Random words:", temperature=0,
                                               extra_body={"max_completion_tokens": 5})
    for out in (by_max_tokens, by_max_completion):
        assert out.usage.completion_tokens == 5
        assert out.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------------------------------- chat
def test_chat_applies_the_chat_template(srv, oai, tiny_loaded, greedy_ref, decode):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ids = _chat_ids(tiny_loaded.tokenizer, messages)
    ref, _ = greedy_ref(tiny_loaded, ids, max_new_tokens=10)
    out = oai.chat.completions.create(model=srv.engine.loaded.model_id, messages=messages, max_tokens=10,
                                      temperature=0)
    assert out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == decode(ref)


@pytest.mark.parametrize("use_task", [False, True])
def test_chat_stream_joins_to_the_plain_chat(srv, oai, task, use_task, tiny_loaded):
    model = task if use_task else srv.engine.loaded.model_id
    messages = [{"role": "user", "content": "Say something nice."}]
    kw = dict(model=model, messages=messages, max_tokens=12, temperature=0)
    plain = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    u = plain.usage
    assert u.prompt_tokens == len(_chat_ids(tiny_loaded.tokenizer, messages))
    assert u.model_extra["virtual_tokens"] == (TASK_N if use_task else 0)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_real_model_chat_follows_its_template(live_server, smol_loaded, greedy_ref, decode):
    """SmolLM2 with its own chat template: the chat answer is the greedy continuation of the rendered template."""
    srv = live_server(loaded=smol_loaded)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = _chat_ids(smol_loaded.tokenizer, messages)
    ref, _ = greedy_ref(smol_loaded, ids, max_new_tokens=8, cached=True)
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=300) as oai:
        out = oai.chat.completions.create(model=smol_loaded.model_id, messages=messages, max_tokens=8,
                                          temperature=0)
        chunks = list(oai.chat.completions.create(model=smol_loaded.model_id, messages=messages, max_tokens=8,
                                                  temperature=0, stream=True))
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == decode(ref)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == decode(ref)


# ----------------------------------------------------------------------------------------------------- errors
def _check_error_shape(exc: openai.APIStatusError, status: int, code: str | None) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == code
    assert exc.body == err  # the openai package hands back the inner object
    return err


def test_unknown_model_is_404_model_not_found(oai):
    with pytest.raises(openai.NotFoundError) as exc:
        oai.completions.create(model="no-such-task", prompt="x", max_tokens=2)
    err = _check_error_shape(exc.value, 404, "model_not_found")
    assert err["param"] == "model" and "no-such-task" in err["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(model="no-such-task", messages=[{"role": "user", "content": "x"}])
    _check_error_shape(exc.value, 404, "model_not_found")
    with pytest.raises(openai.NotFoundError) as exc:
        list(oai.completions.create(model="no-such-task", prompt="x", max_tokens=2, stream=True))
    _check_error_shape(exc.value, 404, "model_not_found")


def test_n_above_one_is_rejected(srv, oai):
    base = srv.engine.loaded.model_id
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.completions.create(model=base, prompt="x", max_tokens=2, n=2)
    err = _check_error_shape(exc.value, 422, "validation_error")
    assert err["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        oai.chat.completions.create(model=base, messages=[{"role": "user", "content": "x"}], max_tokens=2, n=2)
    _check_error_shape(exc.value, 422, "validation_error")


def test_prompt_too_long_is_a_400(srv, oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=srv.engine.loaded.model_id, prompt="word " * 400, max_tokens=2)
    err = _check_error_shape(exc.value, 400, "context_length_exceeded")
    assert err["param"] == "prompt"
