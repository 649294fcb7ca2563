"""Fuzz the HTTP API with schemathesis against its own ``/openapi.json`` (``make fuzz``; README "Reliability").

``python -m bench.fuzz`` starts a real ``softprompt serve`` on loopback (default model, a temporary prompt directory
holding two example prompts, an admin token), then, for every operation of the document (admin included, with the
token), sends at least ``--examples`` generated requests (schemathesis's positive and negative data, Hypothesis
driven) and checks each response: no 5xx (``not_a_server_error``), a documented status
(``status_code_conformance``), a documented content type (``content_type_conformance``) and a body that matches
the documented schema (``response_schema_conformance``; Server-Sent Events are checked event by event). It prints
one line per operation (examples, failures, statuses seen), then each distinct failure with a curl command that
reproduces it, and exits 1 on any failure (0 otherwise).

So that the generated data reaches past the 404s, some requests use a real task (path ``task``, or ``model`` of
the OpenAI routes) or the base model, and some uploads are a valid prompt file. ``DELETE`` runs last, since it
removes the tasks the other operations use.

Generation is bounded (the fuzzer asks for huge ``max_new_tokens``/``max_tokens``): the server runs with
``--default-max-new-tokens 8``, ``--request-timeout 2`` (seconds; a request past it ends with finish reason
``timeout``) and ``--max-input-tokens 256``; the client gives up on a request after ``--timeout`` seconds (a
failure). ``tests/api/test_fuzz.py`` runs :func:`fuzz` with fewer examples against the tiny test model.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

#: The checks applied to every response (schemathesis names).
CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance")
#: Flags of the fuzzed server that bound generation (see the module docstring).
SERVER_BOUNDS = ["--default-max-new-tokens", "8", "--request-timeout", "2", "--max-input-tokens", "256"]
#: Example prompts copied into the fuzzed server's prompt directory.
EXAMPLE_PROMPTS = ["topic", "date-format-prefix"]


class ServerGone(Exception):
    """The server stopped answering (connection refused): the rest of the run would only repeat that."""


@dataclass
class OperationStats:
    """What happened to one operation: requests sent, their statuses, and the distinct failures."""

    label: str
    examples: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: dict[str, str] = field(default_factory=dict)  # first line of the failure -> the whole report
    failed_examples: int = 0

    def line(self) -> str:
        codes = " ".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.label:<40} examples {self.examples:>5}  failures {self.failed_examples:>4}  "
                f"statuses {codes}")


def _checks() -> list[Callable]:
    from schemathesis.checks import load_all_checks, not_a_server_error
    from schemathesis.specs.openapi import checks as oas

    load_all_checks()
    return [not_a_server_error, oas.status_code_conformance, oas.content_type_conformance,
            oas.response_schema_conformance]


def _order(label: str) -> tuple[int, str]:
    return (1 if label.startswith("DELETE") else 0, label)


def fuzz(base_url: str, *, admin_token: str, examples: int = 200, seed: int = 0, timeout: float = 60.0,
         upload: tuple[str, bytes] | None = None, log: Callable[[str], None] = print) -> list[OperationStats]:
    """Fuzz every operation of ``{base_url}/openapi.json``; returns one :class:`OperationStats` per operation.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        admin_token: sent as ``Authorization: Bearer`` on every request (admin routes need it; the inference
            routes ignore it unless the server has an ``--api-key``).
        examples: requests per operation, at least (an operation without parameters gets the same request
            repeated).
        seed: Hypothesis seed (a run is reproducible for the same server state).
        timeout: seconds to wait for one response; a request without an answer by then is a failure.
        upload: ``(filename, bytes)`` of a valid prompt file; a share of the admin uploads send it.
        log: where progress lines go.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    checks = _checks()
    auth = {"Authorization": f"Bearer {admin_token}"}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=timeout)
    session = requests.Session()
    tasks = [t["task"] for t in session.get(f"{base_url}/v1/tasks", headers=auth, timeout=timeout).json()["tasks"]]
    base_model = session.get(f"{base_url}/ready", timeout=timeout).json().get("model")
    models = [m for m in [*tasks, base_model] if m]
    ops = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: _order(op.label))
    results = []
    for op in ops:
        stats = OperationStats(op.label)
        t0 = time.monotonic()
        modes = [op.as_strategy(generation_mode=GenerationMode.POSITIVE)]
        try:
            modes.append(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        except Exception:  # noqa: BLE001 - an operation with nothing to negate has positive data only
            pass
        cases = st.one_of(*modes)

        send = _sender(stats, base_url, session, auth, timeout, tasks, models, upload, checks)
        rounds = 0
        while stats.examples < examples and rounds < examples:
            test = settings(max_examples=examples - stats.examples, deadline=None, database=None,
                            phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
                given(case=cases, data=st.data())(send))
            try:
                hseed(seed + rounds)(test)()
            except ServerGone as exc:
                stats.failed_examples += 1
                stats.failures.setdefault(str(exc), f"{exc} after {stats.examples} examples of {op.label}; "
                                          "operations after it were not run")
                log(f"  {stats.line()}  STOPPED: {exc}")
                results.append(stats)
                return results
            rounds += 1
        log(f"  {stats.line()}  ({time.monotonic() - t0:.1f} s)")
        results.append(stats)
    return results


def _sender(stats: OperationStats, base_url, session, auth, timeout, tasks, models, upload, checks):
    """The Hypothesis test body for one operation: send a case, record and check its response."""

    def send(case, data) -> None:
        response = _send(case, data, base_url, session, auth, timeout, tasks, models, upload)
        _record(stats, case, response, checks, auth)

    return send


def _record(stats: OperationStats, case, response, checks, auth) -> None:
    """Count one request and run the checks on its response (a string: no response came)."""
    stats.examples += 1
    if isinstance(response, str):
        stats.failed_examples += 1
        stats.failures.setdefault(response, response)
        return
    stats.statuses[response.status_code] += 1
    try:
        case.validate_response(response, checks=checks, headers=auth)
    except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis: a Failure, or a FailureGroup of them
        stats.failed_examples += 1
        report = str(exc).strip() or repr(exc)
        stats.failures.setdefault(report.splitlines()[0], report)


def _send(case, data, base_url, session, auth, timeout, tasks, models, upload):
    """Send ``case`` (with some realistic values drawn into it); the response, or a string saying why none came."""
    from hypothesis import strategies as st

    path = case.operation.path
    if "task" in (case.path_parameters or {}) and tasks and data.draw(st.booleans(), label="known task"):
        case.path_parameters["task"] = data.draw(st.sampled_from(tasks), label="task")
    if isinstance(case.body, dict) and "model" in case.body and models and data.draw(st.booleans(), label="model"):
        case.body["model"] = data.draw(st.sampled_from(models), label="model")
    try:
        if (case.method.upper() == "PUT" and path.startswith("/v1/admin/prompts") and upload is not None
                and data.draw(st.booleans(), label="valid upload")):
            url = f"{base_url}{path.replace('{task}', str(case.path_parameters.get('task', 'x')))}"
            return session.put(url, files={"file": upload}, headers=auth, timeout=timeout)
        return case.call(base_url=base_url, session=session, headers=auth, timeout=timeout)
    except requests.Timeout:
        return f"no response within {timeout} s: {case.as_curl_command(headers=auth, base_url=base_url)}"
    except requests.ConnectionError as exc:
        raise ServerGone(f"server unreachable ({exc.__class__.__name__}); it died or exited") from exc
    except requests.RequestException as exc:
        return f"request failed ({type(exc).__name__}: {exc}): {case.as_curl_command(base_url=base_url)}"


def summarize(results: list[OperationStats], want: int, show: int = 10) -> tuple[bool, str]:
    """``(passed, text)``: the per-operation lines, the distinct failures (at most ``show`` per operation) and a
    total; passed when no operation failed and each got at least ``want`` examples."""
    lines = ["", "operation                                examples  failures  statuses"]
    lines += [r.line() for r in results]
    for r in results:
        for report in list(r.failures.values())[:show]:
            lines += ["", f"--- {r.label}", report]
    failed = sum(r.failed_examples for r in results)
    short = [r.label for r in results if r.examples < want]
    total = sum(r.examples for r in results)
    least = min((r.examples for r in results), default=0)
    distinct = sum(len(r.failures) for r in results)
    lines += ["", f"{len(results)} operations, {total} examples (at least {least} each), {failed} failing "
              f"examples, {distinct} distinct failures" + (f"; under {want} examples: {', '.join(short)}"
                                                          if short else "")]
    return failed == 0 and not short and bool(results), "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``make fuzz``: start a server (unless ``--server``), fuzz it, print the summary; 0 when nothing failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="requests per operation, at least")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one response")
    parser.add_argument("--server", help="fuzz this running server (URL) instead of starting one")
    parser.add_argument("--admin-token", help="with --server: its admin token")
    parser.add_argument("--show", type=int, default=10, help="distinct failures printed per operation")
    parser.add_argument("--serve-args", default="", help="extra `softprompt serve` flags for the started server")
    args = parser.parse_args(argv)

    from bench.procs import ADMIN_TOKEN, ServerProcess, copy_prompts, raw_prompt_bytes

    upload = ("prompt.safetensors", raw_prompt_bytes(EXAMPLE_PROMPTS[0]))
    t0 = time.monotonic()
    if args.server:
        results = fuzz(args.server.rstrip("/"), admin_token=args.admin_token or ADMIN_TOKEN,
                       examples=args.examples, seed=args.seed, timeout=args.timeout, upload=upload)
    else:
        with tempfile.TemporaryDirectory(prefix="softprompt-fuzz-") as tmp:
            prompts = copy_prompts(Path(tmp) / "prompts", EXAMPLE_PROMPTS)
            log_path = Path(tmp) / "server.log"
            extra = SERVER_BOUNDS + args.serve_args.split()
            with ServerProcess(prompts, log_path, args=extra) as server:
                print(f"server: {server.url}, ready in {server.start():.1f} s; flags {' '.join(extra)}")
                try:
                    results = fuzz(server.url, admin_token=ADMIN_TOKEN, examples=args.examples, seed=args.seed,
                                   timeout=args.timeout, upload=upload)
                except BaseException:
                    print(server.log_tail(60), file=sys.stderr)
                    raise
                if server.proc is not None and server.proc.poll() is not None:
                    print(f"server exited early ({server.proc.returncode}):\n{server.log_tail(60)}")
    ok, text = summarize(results, args.examples, args.show)
    print(text)
    print(f"checks: {', '.join(CHECK_NAMES)}; {time.monotonic() - t0:.0f} s; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
