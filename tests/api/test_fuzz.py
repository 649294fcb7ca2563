"""A small schemathesis run in ``make test`` (``make fuzz`` is the big one, bench/fuzz.py): every operation of
``/openapi.json`` gets 25 generated requests against a live server on the tiny model, and every response must be
a documented status and content type with a body on its schema, never a 5xx."""

from __future__ import annotations

from srv_helpers import rand_tensor, raw_bytes

from bench.fuzz import fuzz, summarize
from server.api.openapi import ROUTES

EXAMPLES = 25


def test_fuzz_every_operation_without_failures(live_server, tmp_path):
    prompts = tmp_path / "fuzz-prompts"
    prompts.mkdir()
    for i, task in enumerate(("alpha", "beta")):
        (prompts / f"{task}.safetensors").write_bytes(raw_bytes(rand_tensor(4, seed=i)))
    srv = live_server(prompts=prompts, default_max_new_tokens=4, request_timeout=2.0)
    upload = ("prompt.safetensors", raw_bytes(rand_tensor(3, seed=7)))
    lines: list[str] = []
    results = fuzz(srv.url, admin_token=srv.admin_token, examples=EXAMPLES, seed=1, timeout=30.0, upload=upload,
                   log=lines.append)
    ok, text = summarize(results, EXAMPLES)
    assert ok, text
    by_op = {r.label: r for r in results}
    assert set(by_op) == {f"{m} {p}" for m, p in ROUTES}  # every route was fuzzed
    assert all(r.examples >= EXAMPLES for r in results), text
    assert all(set(r.statuses) <= set(ROUTES[tuple(r.label.split(" ", 1))].statuses) for r in results), text
    # the realistic values reach past the 404s: some generations and some uploads succeed
    assert by_op["POST /v1/tasks/{task}/generate"].statuses[200] > 0, text
    assert by_op["PUT /v1/admin/prompts/{task}"].statuses[200] + by_op["PUT /v1/admin/prompts/{task}"].statuses[201] \
        > 0, text
    assert srv.engine.alive
