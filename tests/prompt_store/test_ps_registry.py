"""The in-memory registry: versions, content hashes, immutability, thread safety and 1,000+ tasks."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from prompt_store.errors import PromptError
from prompt_store.formats import ParsedPrompt
from prompt_store.registry import PromptRegistry, tensor_sha256


def pp(t: torch.Tensor, peft_type: str = "RAW") -> ParsedPrompt:
    return ParsedPrompt(embeddings=t, peft_type=peft_type)


def test_sha256_is_dtype_shape_and_bytes():
    t = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    expected = hashlib.sha256(b"float32:1x2:" + t.numpy().tobytes()).hexdigest()
    assert tensor_sha256(t) == expected
    assert tensor_sha256(t.half()) != tensor_sha256(t)  # same values, other dtype
    assert tensor_sha256(t.reshape(2, 1)) != tensor_sha256(t)  # same bytes, other shape
    b = torch.randn(3, 4).to(torch.bfloat16)
    assert (
        tensor_sha256(b)
        == hashlib.sha256(b"bfloat16:3x4:" + b.view(torch.uint8).numpy().tobytes()).hexdigest()
    )


def test_versions_unchanged_and_replaced():
    reg = PromptRegistry()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    p1, action = reg.put("qa", pp(a), "s1")
    assert (action, p1.version, p1.num_virtual_tokens, p1.hidden_size, p1.dtype) == (
        "created",
        1,
        4,
        8,
        "float32",
    )
    same, action = reg.put("qa", pp(a.clone()), "s2")
    assert action == "unchanged" and same is p1 and same.source == "s1"
    p2, action = reg.put("qa", pp(b, "P_TUNING"), "s3")
    assert action == "replaced" and p2.version == 2 and p2.peft_type == "P_TUNING" and reg.get("qa") is p2
    assert p2.loaded_at >= p1.loaded_at


def test_held_prompt_survives_replacement_and_is_cloned():
    reg = PromptRegistry()
    a = torch.randn(4, 8)
    a_copy = a.clone()
    held, _ = reg.put("qa", pp(a), "s")
    a.add_(100.0)  # the caller changing its tensor must not reach the registry
    assert torch.equal(held.embeddings, a_copy)
    reg.put("qa", pp(torch.zeros(4, 8)), "s")
    assert torch.equal(held.embeddings, a_copy) and held.version == 1
    assert torch.equal(reg.get("qa").embeddings, torch.zeros(4, 8))
    with pytest.raises(AttributeError):
        held.version = 5  # frozen dataclass


def test_version_never_goes_backwards_across_remove():
    reg = PromptRegistry()
    reg.put("qa", pp(torch.ones(2, 8)), "s")
    reg.put("qa", pp(torch.zeros(2, 8)), "s")
    removed = reg.remove("qa")
    assert removed.version == 2 and "qa" not in reg and reg.get("qa") is None and reg.remove("qa") is None
    again, action = reg.put("qa", pp(torch.ones(2, 8)), "s")
    assert action == "created" and again.version == 3


def test_to_dict_is_json_metadata():
    reg = PromptRegistry()
    p, _ = reg.put("qa", pp(torch.randn(5, 8).half(), "PROMPT_TUNING"), "/prompts/qa")
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert "embeddings" not in d
    assert d == {
        "task": "qa",
        "num_virtual_tokens": 5,
        "hidden_size": 8,
        "dtype": "float16",
        "sha256": p.sha256,
        "version": 1,
        "source": "/prompts/qa",
        "peft_type": "PROMPT_TUNING",
        "loaded_at": p.loaded_at,
        "nbytes": 5 * 8 * 2,
    }


def test_put_validates_task_name():
    with pytest.raises(PromptError) as info:
        PromptRegistry().put("../x", pp(torch.zeros(1, 8)), "s")
    assert info.value.reason == "bad_name"


def test_thousand_tasks_cost_their_tensor_bytes():
    reg = PromptRegistry()
    gen = torch.Generator().manual_seed(0)
    for i in range(1000):
        reg.put(f"task-{i:04d}", pp(torch.randn(20, 64, generator=gen)), "upload")
    assert len(reg) == 1000
    assert reg.total_bytes() == 1000 * 20 * 64 * 4
    tasks = [p.task for p in reg.list()]
    assert tasks == sorted(tasks) and tasks[0] == "task-0000" and tasks[-1] == "task-0999"
    storages = {p.embeddings.untyped_storage().nbytes() for p in reg.list()}
    assert storages == {20 * 64 * 4}  # each prompt owns exactly its bytes, no shared larger buffer
    reg.put("task-0000", pp(torch.zeros(10, 64)), "upload")
    reg.remove("task-0001")
    assert reg.total_bytes() == 998 * 20 * 64 * 4 + 10 * 64 * 4


def test_concurrent_puts_give_unique_increasing_versions():
    reg = PromptRegistry()
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(50):
            p, action = reg.put("qa", pp(torch.full((2, 8), float(k * 1000 + j))), f"w{k}")
            with lock:
                seen.append((p.version, action))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    versions = sorted(v for v, _ in seen)
    assert versions == list(range(1, 401))  # every put changed content: 400 distinct versions
    assert reg.get("qa").version == 400 and len(reg) == 1
