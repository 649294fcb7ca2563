"""What the benchmark sends: soft prompts, texts of an exact token count, task choice per request, arrivals.

Everything is seeded. A task's soft prompt depends only on ``(seed, task index)``, so tasks can be made lazily
(5,000 of them need not sit in memory at once) and every leg of a run sees the same tensors.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

DISTRIBUTIONS = ("cycle", "uniform", "zipf")


def task_name(i: int) -> str:
    """The server-side name of bench task ``i``: ``bench-00000`` ... ``bench-99999``."""
    if not 0 <= i < 100_000:
        raise ValueError(f"task index must be in [0, 100000), got {i}")
    return f"bench-{i:05d}"


class PromptBank:
    """Soft prompts ``[num_virtual, hidden]`` (float32) by task index, made on demand and cached.

    Prompt ``i`` is ``num_virtual`` random rows of the input-embedding matrix plus Gaussian noise of 10% of its
    standard deviation (so it is scaled like real embeddings), drawn from a generator seeded with ``(seed, i)``.
    """

    def __init__(self, embed: torch.Tensor, num_virtual: int, seed: int, cache: bool = True) -> None:
        self.embed = embed.detach()
        self.num_virtual = num_virtual
        self.seed = seed
        self.std = float(self.embed.float().std())
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rows = self.embed[torch.randint(0, self.embed.shape[0], (self.num_virtual,), generator=g)].float()
        out = (rows + 0.1 * self.std * torch.randn(rows.shape, generator=g)).contiguous()
        if self._cache is not None:
            self._cache[i] = out
        return out

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one prompt tensor as uploaded (float32)."""
        return self.num_virtual * int(self.embed.shape[1]) * 4


def make_texts(tokenizer, n: int, num_tokens: int, rng: random.Random) -> list[str]:
    """``n`` texts of random lower-case vocabulary words, each tokenizing (tokenizer defaults, as the server
    does) to exactly ``num_tokens`` tokens."""
    words = sorted({m.group(1) for t in tokenizer.get_vocab() if (m := re.fullmatch(r"Ġ([a-z]{3,10})", t))})
    texts: list[str] = []
    for _ in range(n):
        for _attempt in range(200):
            text = " ".join(rng.choice(words) for _ in range(num_tokens))
            ids = tokenizer(text)["input_ids"]
            while len(ids) > num_tokens and " " in text:  # a word split in two: drop words from the end
                text = text.rsplit(" ", 1)[0]
                ids = tokenizer(text)["input_ids"]
            if len(ids) == num_tokens:
                texts.append(text)
                break
        else:
            raise RuntimeError(f"could not build a text of exactly {num_tokens} tokens")
    return texts


def zipf_weights(num_tasks: int, s: float) -> list[float]:
    """Normalised Zipf weights: task ``k`` (0-based) has weight proportional to ``1 / (k + 1) ** s``."""
    if num_tasks < 1 or s <= 0:
        raise ValueError(f"need num_tasks >= 1 and s > 0, got {num_tasks}, {s}")
    w = [1.0 / (k + 1) ** s for k in range(num_tasks)]
    total = sum(w)
    return [x / total for x in w]


def choose_tasks(num_requests: int, num_tasks: int, distribution: str, rng: random.Random,
                 zipf_s: float = 1.1) -> list[int]:
    """The task index of each request: ``cycle`` (request ``j`` -> ``j % num_tasks``), ``uniform`` (independent,
    uniform over ``0..num_tasks-1``) or ``zipf`` (independent, :func:`zipf_weights`)."""
    if num_tasks < 1 or num_requests < 0:
        raise ValueError(f"need num_tasks >= 1 and num_requests >= 0, got {num_tasks}, {num_requests}")
    if distribution == "cycle":
        return [j % num_tasks for j in range(num_requests)]
    if distribution == "uniform":
        return [rng.randrange(num_tasks) for _ in range(num_requests)]
    if distribution == "zipf":
        return rng.choices(range(num_tasks), weights=zipf_weights(num_tasks, zipf_s), k=num_requests)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival offsets (s, increasing) of a Poisson process of ``rate`` requests/s: cumulative sums of
    exponential gaps, so the first request arrives after one gap."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    t, out = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        out.append(t)
    return out


@dataclass
class Workload:
    """The requests of one leg: request ``j`` sends ``texts[j]`` to task ``tasks[j]`` (an index into the
    :class:`PromptBank`), greedy, ``max_new_tokens`` new tokens. Closed loop with at most ``concurrency`` in
    flight, or, with ``arrivals``, open loop: request ``j`` is sent ``arrivals[j]`` seconds after the start."""

    name: str
    texts: list[str]
    tasks: list[int]
    num_tasks: int
    virtual_tokens: int
    text_tokens: int
    max_new_tokens: int
    concurrency: int
    distribution: str = "cycle"
    arrivals: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.tasks):
            raise ValueError(f"{len(self.texts)} texts for {len(self.tasks)} task choices")
        if self.arrivals is not None and len(self.arrivals) != len(self.texts):
            raise ValueError(f"{len(self.arrivals)} arrivals for {len(self.texts)} requests")

    @property
    def num_requests(self) -> int:
        return len(self.texts)

    def describe(self) -> dict:
        return {
            "name": self.name, "requests": self.num_requests, "tasks": self.num_tasks,
            "distribution": self.distribution, "distinct_tasks_used": len(set(self.tasks)),
            "virtual_tokens": self.virtual_tokens, "text_tokens": self.text_tokens,
            "max_new_tokens": self.max_new_tokens, "concurrency": self.concurrency,
            "open_loop": self.arrivals is not None,
        }
