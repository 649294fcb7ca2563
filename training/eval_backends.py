"""The two back ends of ``softprompt eval`` (:mod:`training.evaluate`): each turns a list of
:class:`~training.evaluate.Job` into one :class:`~training.evaluate.Generation` per job, in order.

* :class:`EngineBackend`: the server's engine in this process, the adapters loaded and checked as the server does;
* :class:`HTTPBackend`: a running server, through its HTTP API.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.evaluate import DEFAULT_PROMPT, Generation, Job


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` by the chat template with the generation prompt, as ``/v1/chat/completions``
    builds them (for one user message: :func:`training.data.input_ids_for` with ``chat_template=True``)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(x) for x in ids]


class EngineBackend:
    """Generations by the server's engine in this process.

    Args:
        loaded: the base model (as the server loads it).
        task: the task evaluated (for messages only).
        prompt_path: the soft prompts: ``{name: path}`` (a PEFT adapter directory of prompt tuning, p-tuning or
            prefix tuning, or a RAW ``.safetensors`` file), each registered under its name, which is what a
            :class:`Job`'s ``prompt`` refers to; a single path is ``{"soft_prompt": path}``; None: no job uses
            a prompt.
        max_num_seqs: rows decoded together.

    Raises:
        prompt_store.errors.PromptError: an adapter cannot be loaded (same checks as the server's), or a name is
            not a valid task name.
    """

    def __init__(self, loaded, task: str, prompt_path: Path | str | dict[str, Path] | None,
                 max_num_seqs: int = 64) -> None:
        from prompt_store.formats import load_path
        from prompt_store.registry import PromptRegistry

        self.loaded, self.task, self.max_num_seqs = loaded, task, max_num_seqs
        if prompt_path is None:
            paths: dict[str, Path] = {}
        elif isinstance(prompt_path, dict):
            paths = {k: Path(v) for k, v in prompt_path.items()}
        else:
            paths = {DEFAULT_PROMPT: Path(prompt_path)}
        limits = loaded.prompt_limits()  # the server's checks and default caps, with the KV shape prefixes need
        registry = PromptRegistry()
        self.prompts = {name: registry.put(name, load_path(p, limits), str(p))[0] for name, p in paths.items()}

    @property
    def prompt(self):
        """The prompt of a single-prompt backend (``soft_prompt``), or None."""
        return self.prompts.get(DEFAULT_PROMPT)

    def run(self, jobs: list[Job], max_new_tokens: int, progress: bool = True) -> list[Generation]:
        """Submit every job at once (the engine batches them), wait for all; one :class:`Generation` per job.
        A job the engine refuses (e.g. longer than the context) is that job's error."""
        from tqdm.auto import tqdm

        from server.engine import Engine, EngineConfig
        from server.kv_pool import kv_bytes_per_token, model_kv_shape
        from server.request import SamplingParams
        from server.request_builder import make_request

        tok = self.loaded.tokenizer
        nv = max((p.num_virtual_tokens for p in self.prompts.values()), default=0)
        ids = [chat_ids(tok, j.messages()) if j.chat else None for j in jobs]
        longest = max(len(i) if i is not None else len(tok(j.text)["input_ids"]) for i, j in zip(ids, jobs,
                                                                                                 strict=True))
        per_seq = nv + longest + max_new_tokens + 16
        bpt = kv_bytes_per_token(*model_kv_shape(self.loaded.model.config), self.loaded.dtype)
        kv = bpt * per_seq * self.max_num_seqs * 2
        engine = Engine(self.loaded, EngineConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max(2048, self.max_num_seqs),
            kv_cache_bytes=max(kv, 16 * 1024**2), prompt_kv_cache_bytes=max(16 * 1024**2, 2 * bpt * nv * len(
                self.prompts)), max_virtual_tokens=max(128, nv), max_waiting=len(jobs) + 1,
        ))
        engine.start()
        results: list[Generation] = []
        try:
            streams = []
            for job, tids in zip(jobs, ids, strict=True):
                if job.prompt is not None and job.prompt not in self.prompts:
                    raise ValueError(f"job of condition {job.condition!r} needs prompt {job.prompt!r}, which "
                                     f"was not given (prompts: {sorted(self.prompts)})")
                prompt = self.prompts[job.prompt] if job.prompt is not None else None
                params = SamplingParams(max_new_tokens=max_new_tokens, stop=job.stop)
                try:
                    req = make_request(engine, prompt, job.text, params, token_ids=tids)
                    streams.append(engine.submit(req))
                except ValueError as exc:  # server.engine.RequestRejectedError included
                    streams.append(exc)
            for s in tqdm(streams, disable=not progress, desc="eval", unit="req"):
                if isinstance(s, Exception):
                    results.append(Generation("", None, str(s)))
                    continue
                parts, last = [], None
                for out in s.iter_sync():
                    parts.append(out.text)
                    last = out
                if last is not None and last.finish_reason == "error":
                    results.append(Generation("", "error", last.error or "engine error"))
                else:
                    results.append(Generation("".join(parts), last.finish_reason if last else None))
        finally:
            engine.stop()
        return results


class HTTPBackend:
    """Generations by a running server, ``concurrency`` requests in flight (so the server batches them).

    Args:
        url: server base URL.
        task: the served task whose prompt the ``soft_prompt`` condition uses.
        http: an ``httpx.Client``-like object to use instead of a new one (tests pass a FastAPI TestClient).
        prompts: prompt name (a :class:`Job`'s ``prompt``) -> served task name; default
            ``{"soft_prompt": task}``.
    """

    def __init__(self, url: str, task: str, http=None, concurrency: int = 16, timeout: float = 600.0,
                 prompts: dict[str, str] | None = None) -> None:
        import httpx

        self.task, self.concurrency = task, concurrency
        self.prompts = {DEFAULT_PROMPT: task} if prompts is None else dict(prompts)
        self._own = http is None
        self.http = http if http is not None else httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._base_id: str | None = None

    def base_model_id(self) -> str:
        if self._base_id is None:
            resp = self.http.get("/v1/models")
            resp.raise_for_status()
            self._base_id = resp.json()["data"][0]["id"]
        return self._base_id

    def _one(self, job: Job, max_new_tokens: int) -> Generation:
        try:
            served = self.prompts[job.prompt] if job.prompt is not None else None
            if job.chat:
                body = {"model": served or self.base_model_id(), "messages": job.messages(),
                        "max_tokens": max_new_tokens, "temperature": 0.0}
                if job.stop:
                    body["stop"] = list(job.stop)
                resp = self.http.post("/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    return Generation("", None, f"HTTP {resp.status_code}: {resp.text[:300]}")
                choice = resp.json()["choices"][0]
                return Generation(choice["message"]["content"], choice["finish_reason"])
            path = f"/v1/tasks/{served}/generate" if served else "/v1/generate"
            params: dict = {"max_new_tokens": max_new_tokens}
            if job.stop:
                params["stop"] = list(job.stop)
            resp = self.http.post(path, json={"inputs": job.text, "parameters": params})
            if resp.status_code != 200:
                return Generation("", None, f"HTTP {resp.status_code}: {resp.text[:300]}")
            data = resp.json()
            return Generation(data["generated_text"], data["finish_reason"])
        except Exception as exc:  # noqa: BLE001 - a failed request is a row's error, not the run's
            return Generation("", None, f"{type(exc).__name__}: {exc}")

    def run(self, jobs: list[Job], max_new_tokens: int, progress: bool = True) -> list[Generation]:
        from tqdm.auto import tqdm

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                it = pool.map(lambda j: self._one(j, max_new_tokens), jobs)
                return list(tqdm(it, total=len(jobs), disable=not progress, desc="eval", unit="req"))
        finally:
            if self._own:
                self.http.close()
