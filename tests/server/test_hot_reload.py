"""Hot reload of the prompt directory through the running app: add, replace, remove, bad files, and a request
that keeps its admitted prompt version while the file is replaced under it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import decode_text, greedy_reference, rand_tensor, raw_bytes

DEADLINE = 2.0


def wait_for(cond, timeout: float = DEADLINE, interval: float = 0.05):
    """Poll ``cond()`` until it returns a truthy value or ``timeout`` seconds pass; return the last value."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.writing"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tasks(client) -> dict[str, int]:
    return {t["task"]: t["version"] for t in client.get("/v1/tasks").json()["tasks"]}


def load_errors(client) -> float:
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        if fam.name == "softprompt_prompt_load_errors":
            return sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return 0.0


def gen(client, task: str, text: str = "Tell me", n: int = 6):
    return client.post(f"/v1/tasks/{task}/generate", json={"inputs": text, "parameters": {"max_new_tokens": n}})


def ref_text(loaded, P, text: str = "Tell me", n: int = 6) -> str:
    toks, _ = greedy_reference(loaded.model, loaded.tokenizer(text)["input_ids"], P, n)
    return decode_text(loaded.tokenizer, toks)


def test_add_replace_remove_within_two_seconds(client, prompts_dir, tiny_loaded):
    assert tasks(client) == {}
    P1, P2 = rand_tensor(4, seed=1), rand_tensor(9, scale=2.0, seed=2)
    write_atomic(prompts_dir / "hot.safetensors", raw_bytes(P1))
    assert wait_for(lambda: tasks(client).get("hot") == 1), "added prompt not servable within 2 s"
    assert gen(client, "hot").json()["generated_text"] == ref_text(tiny_loaded, P1)

    write_atomic(prompts_dir / "hot.safetensors", raw_bytes(P2))
    assert wait_for(lambda: tasks(client).get("hot") == 2), "replaced prompt not served within 2 s"
    body = gen(client, "hot").json()
    assert body["prompt_version"] == 2 and body["usage"]["virtual_tokens"] == 9
    assert body["generated_text"] == ref_text(tiny_loaded, P2)

    (prompts_dir / "hot.safetensors").unlink()
    assert wait_for(lambda: gen(client, "hot").status_code == 404), "removed prompt still served after 2 s"
    assert "hot" not in tasks(client)


def test_in_place_overwrite_is_picked_up(client, prompts_dir, tiny_loaded):
    P1, P2 = rand_tensor(3, seed=3), rand_tensor(3, seed=4)
    path = prompts_dir / "plain.safetensors"
    path.write_bytes(raw_bytes(P1))
    assert wait_for(lambda: tasks(client).get("plain") == 1)
    path.write_bytes(raw_bytes(P2))  # not atomic: same size, same name
    assert wait_for(lambda: tasks(client).get("plain") == 2)
    assert gen(client, "plain").json()["generated_text"] == ref_text(tiny_loaded, P2)


def test_bad_file_is_counted_and_server_keeps_serving(client, prompts_dir, tiny_loaded):
    P = rand_tensor(5, seed=5)
    write_atomic(prompts_dir / "good.safetensors", raw_bytes(P))
    assert wait_for(lambda: "good" in tasks(client))
    errors0 = load_errors(client)
    write_atomic(prompts_dir / "broken.safetensors", b"definitely not a safetensors file")
    assert wait_for(lambda: load_errors(client) > errors0), "bad file not counted within 2 s"
    write_atomic(prompts_dir / "wide.safetensors", raw_bytes(rand_tensor(4, hidden=96)))
    assert wait_for(lambda: load_errors(client) >= errors0 + 2)
    assert tasks(client) == {"good": 1}
    assert gen(client, "broken").status_code == 404
    assert gen(client, "good").json()["generated_text"] == ref_text(tiny_loaded, P)
    assert client.get("/health").status_code == 200


def test_bad_file_replacing_a_good_one_keeps_the_good_version(client, prompts_dir, tiny_loaded):
    P = rand_tensor(6, seed=6)
    path = prompts_dir / "qa.safetensors"
    write_atomic(path, raw_bytes(P))
    assert wait_for(lambda: tasks(client).get("qa") == 1)
    errors0 = load_errors(client)
    nan = rand_tensor(6, seed=7)
    nan[0, 0] = float("nan")
    write_atomic(path, raw_bytes(nan))
    assert wait_for(lambda: load_errors(client) > errors0)
    write_atomic(path, b"\x00\x01garbage")
    assert wait_for(lambda: load_errors(client) > errors0 + 1)
    assert tasks(client) == {"qa": 1}
    body = gen(client, "qa").json()
    assert body["prompt_version"] == 1 and body["generated_text"] == ref_text(tiny_loaded, P)
    # fixing the file serves the fix as the next version
    P3 = rand_tensor(6, seed=8)
    write_atomic(path, raw_bytes(P3))
    assert wait_for(lambda: tasks(client).get("qa") == 2)
    assert gen(client, "qa").json()["generated_text"] == ref_text(tiny_loaded, P3)


def test_admitted_request_keeps_its_version_while_file_is_replaced(client, prompts_dir, tiny_loaded):
    P1, P2 = rand_tensor(5, seed=9), rand_tensor(7, scale=3.0, seed=10)
    path = prompts_dir / "live.safetensors"
    write_atomic(path, raw_bytes(P1))
    assert wait_for(lambda: tasks(client).get("live") == 1)
    engine = client.app.state.sp.engine
    gate, blocked = threading.Event(), threading.Event()
    orig_step = engine.step
    steps = 0

    def step():
        nonlocal steps
        plan = orig_step()
        steps += 1
        if steps == 3:  # admitted (step 1) and decoding: hold the engine until the file is replaced
            blocked.set()
            gate.wait(30)
        return plan

    engine.step = step
    result: dict = {}

    def long_request():
        result["r"] = gen(client, "live", text="A long story", n=40)

    t = threading.Thread(target=long_request)
    t.start()
    try:
        assert blocked.wait(30)
        write_atomic(path, raw_bytes(P2))
        assert wait_for(lambda: tasks(client).get("live") == 2), "replacement not loaded within 2 s"
    finally:
        gate.set()
        t.join(60)
    r = result["r"]
    assert r.status_code == 200
    body = r.json()
    assert body["prompt_version"] == 1 and body["usage"]["virtual_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 40
    assert body["generated_text"] == ref_text(tiny_loaded, P1, "A long story", 40)
    assert ref_text(tiny_loaded, P2, "A long story", 40) != body["generated_text"]
    after = gen(client, "live", text="A long story", n=40).json()
    assert after["prompt_version"] == 2 and after["generated_text"] == ref_text(tiny_loaded, P2, "A long story", 40)
