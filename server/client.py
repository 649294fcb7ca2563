"""A small Python client for softprompt-server, on httpx.

Example::

    from server.client import SoftpromptClient

    with SoftpromptClient("http://127.0.0.1:8000", admin_token="dev-admin-token") as c:
        print(c.generate("date-format", "2024-07-09", max_new_tokens=12)["generated_text"])
        for event in c.generate_stream("date-format", "1999-12-31", max_new_tokens=12):
            print(event["text"], end="", flush=True)
        c.upload("my-dates", "examples/prompts/date-format")
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class SoftpromptError(RuntimeError):
    """The server answered with an error. Attributes: ``status`` (HTTP), ``code`` and ``message`` from the
    server's error JSON."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.code = status, message, code


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json().get("error", {})
        message, code = err.get("message", resp.text), err.get("code")
    except (ValueError, AttributeError):
        message, code = resp.text, None
    raise SoftpromptError(resp.status_code, message, code)


class SoftpromptClient:
    """Client of the native API (generation, tasks, admin prompts).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        admin_token: bearer token for the admin routes.
        timeout: seconds per request (generation included).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, admin_token: str | None = None,
                 timeout: float = 300.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SoftpromptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _path(task: str | None) -> str:
        return f"/v1/tasks/{task}/generate" if task else "/v1/generate"

    def generate(self, task: str | None, inputs: str, **parameters: Any) -> dict:
        """Generate; ``task=None`` uses the base model. ``parameters``: ``max_new_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``seed``, ``stop``. Returns the response JSON. Raises :class:`SoftpromptError`."""
        resp = self._http.post(self._path(task), json={"inputs": inputs, "parameters": parameters})
        _raise_for(resp)
        return resp.json()

    def generate_stream(self, task: str | None, inputs: str, **parameters: Any) -> Iterator[dict]:
        """Stream events: ``{"text", "token_ids"}`` per delta, the last one also carrying ``finish_reason`` and
        ``usage``. Raises :class:`SoftpromptError` for an error answer or an ``error`` event."""
        body = {"inputs": inputs, "parameters": parameters, "stream": True}
        with self._http.stream("POST", self._path(task), json=body) as resp:
            if not resp.is_success:
                resp.read()
                _raise_for(resp)
            event = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:].strip())
                    if event == "error":
                        err = data.get("error", {})
                        raise SoftpromptError(503, err.get("message", "stream error"), err.get("code"))
                    yield data
                    if "finish_reason" in data:
                        return
                elif not line:
                    event = None

    def tasks(self) -> list[dict]:
        """The servable tasks: ``[{"task", "num_virtual_tokens", "version", "peft_type", "nbytes"}]``."""
        resp = self._http.get("/v1/tasks")
        _raise_for(resp)
        return resp.json()["tasks"]

    # ------------------------------------------------------------------ admin
    def upload(self, task: str, path: str | Path) -> dict:
        """Upload a soft prompt: a ``.safetensors`` file, a ``.zip``/``.tar.gz`` of a PEFT adapter, or a PEFT
        adapter directory (sent as a ``.tar.gz`` made in memory). Returns the prompt's metadata (with
        ``action``: created/replaced/unchanged)."""
        path = Path(path)
        if path.is_dir():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    if (path / name).is_file():
                        tar.add(path / name, arcname=name)
            data, filename = buf.getvalue(), f"{path.name}.tar.gz"
        else:
            data, filename = path.read_bytes(), path.name
        resp = self._http.put(f"/v1/admin/prompts/{task}", headers=self._admin, files={"file": (filename, data)})
        _raise_for(resp)
        return resp.json()

    def list_prompts(self) -> list[dict]:
        resp = self._http.get("/v1/admin/prompts", headers=self._admin)
        _raise_for(resp)
        return resp.json()["prompts"]

    def get_prompt(self, task: str) -> dict:
        resp = self._http.get(f"/v1/admin/prompts/{task}", headers=self._admin)
        _raise_for(resp)
        return resp.json()

    def delete_prompt(self, task: str) -> dict:
        resp = self._http.delete(f"/v1/admin/prompts/{task}", headers=self._admin)
        _raise_for(resp)
        return resp.json()
