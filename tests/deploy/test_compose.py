"""docker/compose.yaml, its Prometheus config and the provisioned Grafana dashboard, checked offline.

No Docker engine is needed: the files are parsed and cross-checked against each other and against the server
itself (``server.config.Settings`` for ``SOFTPROMPT_*`` variables, ``server.metrics.Metrics`` for metric names).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SERVER_IMAGE = "softprompt-server:cpu"
DATASOURCE_UID = "softprompt-prometheus"

# PromQL words that are not metric names: binary/set operators, modifiers, and the label-list clauses
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan", "atan2"}
PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    # functions the dashboard may use (Prometheus 3 function list, the common part)
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "delta", "deriv",
    "exp", "floor", "histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction", "idelta",
    "increase", "irate", "label_replace", "label_join", "ln", "log2", "log10", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time", "last_over_time",
    "stddev_over_time", "present_over_time",
}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the function names a PromQL expression uses.

    String literals, label matchers (``{...}``), range and subquery brackets (``[...]``), label lists of
    ``by`` / ``without`` / ``on`` / ``ignoring`` / ``group_left`` / ``group_right`` and Grafana variables are
    removed first; what is left is a metric name unless it is followed by ``(`` (a function) or is a keyword.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    metrics: set[str] = set()
    functions: set[str] = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call:
            functions.add(word)
        elif word.lower() not in PROMQL_KEYWORDS:
            metrics.add(word)
    return metrics, functions


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a Grafana dashboard."""
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))  # a collapsed row keeps its panels inside

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
            out.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return out


def unknown_metrics(dashboard: dict, exported: set[str]) -> dict[str, set[str]]:
    """Where a dashboard query names a metric the server does not export, or calls an unknown function."""
    bad = {}
    for where, expr in dashboard_queries(dashboard):
        metrics, functions = promql_names(expr)
        wrong = (metrics - exported) | {f"{f}()" for f in functions - PROMQL_FUNCTIONS}
        if not metrics:
            wrong.add("<no metric>")
        if wrong:
            bad[where] = wrong
    return bad


def unknown_labels(expr: str, exported: dict[str, frozenset[str]]) -> set[str]:
    """Label names an expression matches or groups by that none of its metrics carries.

    A scrape adds ``job`` and ``instance`` to every series; the rest must be labels the server renders.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    metrics = promql_names(expr)[0]
    known = {"job", "instance"}.union(*(exported.get(m, frozenset()) for m in metrics))
    used = set()
    for matchers in re.findall(r"\{([^{}]*)\}", s):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", s):
        used |= {label.strip() for label in m.group(1).split(",") if label.strip()}
    return used - known


def all_panels(panels: list[dict]) -> list[dict]:
    """Panels, rows' nested panels included."""
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker/compose.yaml."""
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    """The provisioned Grafana dashboard."""
    return json.loads((DOCKER / "grafana" / "dashboards" / "softprompt.json").read_text())


def _server_service(compose: dict) -> tuple[str, dict]:
    [(name, svc)] = [(n, s) for n, s in compose["services"].items() if s.get("image") == SERVER_IMAGE]
    return name, svc


def _bind_mounts(svc: dict) -> dict[str, Path]:
    """container path -> host path of a service's relative bind mounts (short syntax)."""
    out = {}
    for vol in svc.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DOCKER / src).resolve()
    return out


def _published(svc: dict) -> dict[int, str]:
    """container port -> host address:port of a service's published ports."""
    out = {}
    for p in svc.get("ports", []):
        *host, container = str(p).split(":")
        out[int(container)] = ":".join(host)
    return out


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, duration
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


# --- the parser itself ---------------------------------------------------------------------------------------


def test_promql_names_parses_real_expressions():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(softprompt_request_latency_seconds_bucket'
            '{task=~"$task", reason="softprompt_not_a_metric"}[$__rate_interval])))')
    assert promql_names(expr) == ({"softprompt_request_latency_seconds_bucket"}, {"histogram_quantile", "sum", "rate"})
    expr = "softprompt_kv_cache_used_blocks / ignoring(owner) sum without (owner) (softprompt_kv_cache_blocks) > bool 0"
    assert promql_names(expr) == ({"softprompt_kv_cache_used_blocks", "softprompt_kv_cache_blocks"}, {"sum"})
    assert promql_names("sum(rate(a_total[5m] offset 1h)) * 1e3 and on(instance) b")[0] == {"a_total", "b"}


def test_a_misspelled_metric_is_caught(dashboard, exported):
    bad = copy.deepcopy(dashboard)
    target = next(t for p in all_panels(bad["panels"]) for t in p.get("targets", [])
                  if "softprompt_generated_tokens_total" in t["expr"])
    target["expr"] = target["expr"].replace("softprompt_generated_tokens_total", "softprompt_generated_token_total")
    [(where, names)] = unknown_metrics(bad, set(exported)).items()
    assert names == {"softprompt_generated_token_total"} and "target" in where
    # the un-suffixed histogram name is not exported either: only _bucket/_sum/_count are
    target["expr"] = "histogram_quantile(0.5, rate(softprompt_request_latency_seconds[5m]))"
    assert list(unknown_metrics(bad, set(exported)).values()) == [{"softprompt_request_latency_seconds"}]


# --- the dashboard ------------------------------------------------------------------------------------------


def test_every_dashboard_query_names_only_exported_metrics(dashboard, exported):
    assert len(dashboard_queries(dashboard)) >= 20
    assert unknown_metrics(dashboard, set(exported)) == {}


def test_every_dashboard_label_exists_on_its_metrics(dashboard, exported):
    assert unknown_labels('sum by (task, le) (rate(softprompt_request_latency_seconds_bucket{task=~"$task"}[5m]))',
                          exported) == set()
    assert unknown_labels('sum by (tasks) (rate(softprompt_requests_total{statuss="429"}[5m]))', exported) == {
        "tasks", "statuss"}
    assert unknown_labels("sum by (owner) (softprompt_kv_cache_used_blocks)", exported) == {"owner"}
    bad = {where: unknown_labels(expr, exported) for where, expr in dashboard_queries(dashboard)}
    assert {where: labels for where, labels in bad.items() if labels} == {}
    [var] = dashboard["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"]).groups()
    assert label == var["name"] == "task" and label in exported[metric]


def test_dashboard_covers_the_issue_panels(dashboard):
    exprs = [e for _, e in dashboard_queries(dashboard)]
    used = set().union(*(promql_names(e)[0] for e in exprs))
    assert {
        "softprompt_generated_tokens_total", "softprompt_time_to_first_token_seconds_bucket",
        "softprompt_request_latency_seconds_bucket", "softprompt_waiting_requests", "softprompt_running_requests",
        "softprompt_kv_cache_blocks", "softprompt_kv_cache_used_blocks", "softprompt_requests_total",
        "softprompt_prompt_load_errors_total", "softprompt_preemptions_total", "softprompt_queue_wait_seconds_bucket",
    } <= used
    for hist in ("softprompt_time_to_first_token_seconds_bucket", "softprompt_request_latency_seconds_bucket"):
        quantiles = {m.group(1) for e in exprs if hist in e for m in re.finditer(r"histogram_quantile\(([\d.]+)", e)}
        assert quantiles == {"0.5", "0.95"}, hist
    assert any("softprompt_requests_total" in e and "by (task, status)" in e for e in exprs)
    assert any('status=~"429|503"' in e for e in exprs)


def test_every_panel_uses_the_provisioned_datasource(dashboard):
    provisioned = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [ds] = provisioned["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    queried = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(queried) >= 20
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"], panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == ds["uid"]


def test_dashboard_layout_is_sound(dashboard):
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles))


# --- compose ------------------------------------------------------------------------------------------------


def test_services_volumes_and_ports(compose):
    assert set(compose["services"]) == {"softprompt", "prometheus", "grafana"}
    assert set(compose["volumes"]) == {"prompts", "prometheus-data", "grafana-data"}
    name, server = _server_service(compose)
    assert name == "softprompt"
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert _published(server) == {8000: "127.0.0.1:8000"}
    assert _published(compose["services"]["prometheus"]) == {9090: "127.0.0.1:9090"}
    assert _published(compose["services"]["grafana"]) == {3000: "127.0.0.1:3000"}
    # named volumes are declared at the top level
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in compose["volumes"], vol


def test_server_settings_come_from_real_settings_fields(compose):
    _, server = _server_service(compose)
    env = server["environment"]
    fields = set(Settings.model_fields)
    for key in env:
        assert key.startswith("SOFTPROMPT_") and key.removeprefix("SOFTPROMPT_").lower() in fields, key
    assert env["SOFTPROMPT_HOST"] == "0.0.0.0" and env["SOFTPROMPT_PORT"] == "8000"
    assert env["SOFTPROMPT_PROMPTS"] == "/prompts"
    assert "prompts:/prompts" in server["volumes"]
    # the token comes from docker/.env or the caller's environment, blank (= admin off) when unset
    assert re.fullmatch(r"\$\{SOFTPROMPT_ADMIN_TOKEN:-\}", env["SOFTPROMPT_ADMIN_TOKEN"])
    assert server["command"] == []  # the image's CMD would otherwise win over SOFTPROMPT_PROMPTS


def test_server_stops_after_its_drain(compose):
    _, server = _server_service(compose)
    drain = Settings.model_fields["drain_timeout"].default
    assert drain == 30
    from server.cli import SHUTDOWN_SLACK_SECONDS

    assert _seconds(server["stop_grace_period"]) >= drain + SHUTDOWN_SLACK_SECONDS


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    test = " ".join(services["softprompt"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/ready" in test
    assert _seconds(services["softprompt"]["healthcheck"]["start_period"]) >= 120  # first start converts the model
    assert "/-/ready" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])
    assert services["prometheus"]["depends_on"] == {"softprompt": {"condition": "service_started"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_prometheus_scrapes_the_server(compose):
    prom = compose["services"]["prometheus"]
    mounts = _bind_mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = mounts[config_arg.split("=", 1)[1]]
    assert config_path == DOCKER / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "softprompt"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [[target]] = [sc["targets"] for sc in job["static_configs"]]
    host, port = target.split(":")
    name, server = _server_service(compose)
    assert host == name
    assert int(port) == int(server["environment"]["SOFTPROMPT_PORT"]) and int(port) in _published(server)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == DOCKER / "grafana" / "provisioning"
    [ds] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
    assert m and m.group(1) in compose["services"]
    assert int(m.group(2)) in _published(compose["services"][m.group(1)])
    assert compose["services"][m.group(1)]["image"].startswith("prom/prometheus:")
    [provider] = yaml.safe_load((provisioning / "dashboards" / "softprompt.yml").read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / "softprompt.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == dashboards_dir / "softprompt.json"
