"""Workload pieces (bench/workload.py): task names, prompts, task choice, arrivals, exact-length texts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from bench.workload import (
    PromptBank,
    Workload,
    choose_tasks,
    make_texts,
    poisson_arrivals,
    task_name,
    zipf_weights,
)


def test_task_names_have_no_cap_below_100000():
    assert task_name(0) == "bench-00000"
    assert task_name(4999) == "bench-04999"
    assert task_name(99_999) == "bench-99999"
    with pytest.raises(ValueError):
        task_name(100_000)


def test_prompt_bank_is_deterministic_per_index_and_lazy():
    embed = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    a, b = PromptBank(embed, 5, seed=3), PromptBank(embed, 5, seed=3, cache=False)
    assert a[7].shape == (5, 16) and a[7].dtype == torch.float32
    assert torch.equal(a[7], b[7])
    assert torch.equal(b[4999], PromptBank(embed, 5, seed=3)[4999])  # no need to make 0..4998 first
    assert not torch.equal(a[7], a[8])
    assert not torch.equal(a[7], PromptBank(embed, 5, seed=4)[7])
    assert a.tensor_bytes == 5 * 16 * 4


def test_cycle_choice():
    assert choose_tasks(7, 3, "cycle", random.Random(0)) == [0, 1, 2, 0, 1, 2, 0]


def test_uniform_choice_is_seeded_in_range_and_spread():
    c1 = choose_tasks(6000, 6, "uniform", random.Random(5))
    assert c1 == choose_tasks(6000, 6, "uniform", random.Random(5))
    assert c1 != choose_tasks(6000, 6, "uniform", random.Random(6))
    counts = Counter(c1)
    assert set(counts) == set(range(6))
    assert all(800 < n < 1200 for n in counts.values())  # expected 1000 each
    assert choose_tasks(50, 1, "uniform", random.Random(0)) == [0] * 50


def test_zipf_weights_follow_the_power_law():
    w = zipf_weights(1000, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2 ** 1.1)
    assert w[0] / w[9] == pytest.approx(10 ** 1.1)
    with pytest.raises(ValueError):
        zipf_weights(10, 0.0)


def test_zipf_choice_is_seeded_in_range_and_skewed():
    c = choose_tasks(20_000, 1000, "zipf", random.Random(1), zipf_s=1.1)
    assert c == choose_tasks(20_000, 1000, "zipf", random.Random(1), zipf_s=1.1)
    assert min(c) >= 0 and max(c) < 1000
    counts = Counter(c)
    expected0 = 20_000 * zipf_weights(1000, 1.1)[0]
    assert abs(counts[0] - expected0) < 0.1 * expected0
    assert counts[0] > counts[1] > counts[9]
    assert counts.most_common(1)[0][0] == 0


def test_choose_tasks_refuses_bad_input():
    with pytest.raises(ValueError):
        choose_tasks(5, 0, "uniform", random.Random(0))
    with pytest.raises(ValueError, match="distribution"):
        choose_tasks(5, 3, "normal", random.Random(0))


def test_poisson_arrivals_are_seeded_increasing_with_the_right_mean_gap():
    a = poisson_arrivals(4000, 2.0, random.Random(0))
    assert a == poisson_arrivals(4000, 2.0, random.Random(0))
    assert all(x < y for x, y in zip(a, a[1:], strict=False)) and a[0] > 0
    assert a[-1] / len(a) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0, random.Random(0))


def test_workload_checks_lengths():
    with pytest.raises(ValueError):
        Workload("w", ["a", "b"], [0], 1, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        Workload("w", ["a"], [0], 1, 1, 1, 1, 1, arrivals=[0.1, 0.2])
    wl = Workload("w", ["a", "b"], [0, 0], 1, 20, 1, 32, 64)
    assert wl.num_requests == 2 and wl.describe()["distinct_tasks_used"] == 1


@pytest.mark.parametrize("num_tokens", [1, 20, 480])
def test_texts_tokenize_to_exactly_the_requested_count(smol_tokenizer, num_tokens):
    texts = make_texts(smol_tokenizer, 4, num_tokens, random.Random(num_tokens))
    assert len(texts) == 4 and len(set(texts)) == 4
    assert [len(smol_tokenizer(t)["input_ids"]) for t in texts] == [num_tokens] * 4
    assert texts == make_texts(smol_tokenizer, 4, num_tokens, random.Random(num_tokens))
