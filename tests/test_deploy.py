"""deploy/: the compose stack, Prometheus, its alert rules, Grafana's provisioning and dashboard, the
Dockerfile. No container runs here: the files are parsed and cross-checked, and every metric a panel
or an alert rule queries is checked against what the gateway declares and what /metrics serves (metric
names with their _total/_bucket/_sum/_count suffixes, and every label a query filters or groups by),
with a real PromQL parser (promql-parser, the Rust one, from PyPI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import pytest
import yaml
from conftest import Harness
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
RULES = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "gateway.json").read_text(encoding="utf-8"))
GATEWAYS = sorted(name for name in SERVICES if name.startswith("gateway-"))
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - inside a container: the published ports decide who reaches it

# labels Prometheus adds itself (target labels), and the series it makes for every target
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_SERIES = {"up": frozenset()}
# the values a query may compare these labels with (the contract of the metrics; a typo such as
# result="failed" for a config reload would match nothing and never alert)
LABEL_VALUES = {
    ("gateway_config_reloads_total", "result"): {"ok", "error"},
    ("gateway_webhook_deliveries_total", "result"): {"delivered", "failed", "gave_up"},
    ("gateway_upstream_errors_total", "cause"): {"connect", "timeout", "redirect", "protocol", "status_4xx",
                                                 "status_5xx"},
    ("gateway_settlement_retries_total", "op"): {"settle", "release"},
    ("gateway_settlements_abandoned_total", "op"): {"settle", "release"},
}
# Grafana's variables, replaced by what they stand for before parsing
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


# ---------------------------------------------------------------- what the gateway exports


def declared_series() -> dict[str, frozenset[str]]:
    """Every series name the gateway's registry can expose, with its label names."""
    series: dict[str, frozenset[str]] = {}
    for collector in Metrics().registry._collector_to_names:
        name, kind, labels = collector._name, collector._type, frozenset(collector._labelnames)
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "gauge":
            series[name] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:  # pragma: no cover - a new kind of metric: teach this test its series
            raise AssertionError(f"{name}: a {kind} metric")
    return series


# ---------------------------------------------------------------- PromQL


def parse(expr: str) -> pq.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return pq.parse(expr)


class Usage:
    """What one expression asks of the series: names, matchers, grouping labels."""

    def __init__(self) -> None:
        self.selectors: list[tuple[str, list[tuple[str, str, str]]]] = []  # name, [(label, op, value)]
        self.groupings: list[tuple[str, frozenset[str], frozenset[str]]] = []  # (what, labels, names below)


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, pq.AggregateExpr):
        yield node.expr
        if node.param is not None:
            yield node.param
    elif isinstance(node, pq.BinaryExpr):
        yield node.lhs
        yield node.rhs
    elif isinstance(node, pq.Call):
        yield from node.args
    elif isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        yield node.expr
    elif isinstance(node, pq.MatrixSelector):
        yield node.vector_selector


def _analyse(node: Any, usage: Usage) -> frozenset[str]:
    """Record `node`'s selectors and groupings in `usage`; returns the series names below it."""
    if isinstance(node, pq.VectorSelector):
        matchers = [(m.name, str(m.op), m.value) for m in node.matchers.matchers if m.name != "__name__"]
        assert node.name, f"a selector without a metric name: {node}"
        usage.selectors.append((node.name, matchers))
        return frozenset({node.name})
    names = frozenset().union(*(_analyse(child, usage) for child in _children(node)))
    if isinstance(node, pq.AggregateExpr) and node.modifier is not None:
        usage.groupings.append((f"{node.op} by/without", frozenset(node.modifier.labels), names))
    if isinstance(node, pq.BinaryExpr) and node.modifier is not None and node.modifier.matching is not None:
        matching = node.modifier.matching
        usage.groupings.append(("on/ignoring", frozenset(matching.labels), names))
        if node.modifier.group_labels:
            usage.groupings.append(("group_left/right", frozenset(node.modifier.group_labels), names))
    if isinstance(node, pq.Call) and node.func.name == "histogram_quantile":
        assert all(n.endswith("_bucket") for n in names), f"histogram_quantile over {sorted(names)}"
    return names


def usage_of(expr: str) -> Usage:
    usage = Usage()
    _analyse(parse(expr), usage)
    return usage


def unexported(expr: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """What `expr` asks for that `exported` (series name -> label names) does not have."""
    known = {**exported, **PROMETHEUS_SERIES}
    usage = usage_of(expr)
    problems = []
    for name, matchers in usage.selectors:
        if name not in known:
            problems.append(f"metric {name}")
            continue
        for label, op, value in matchers:
            if label not in known[name] | TARGET_LABELS:
                problems.append(f"label {name}{{{label}}}")
            allowed = LABEL_VALUES.get((name, label))
            if allowed is not None and op in ("MatchOp.Equal", "MatchOp.Re"):
                pattern = re.compile(value if op == "MatchOp.Re" else re.escape(value))
                if not any(pattern.fullmatch(v) for v in allowed):
                    problems.append(f"value {name}{{{label}{op}{value!r}}} matches none of {sorted(allowed)}")
    for what, labels, names in usage.groupings:
        available = TARGET_LABELS.union(*(known.get(n, frozenset()) for n in names))
        missing = labels - available
        if missing:
            problems.append(f"{what} {sorted(missing)} not on {sorted(names)}")
    return problems


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
        for inner in panel.get("panels", []):  # panels of a collapsed row
            found.extend((inner["title"], t["expr"]) for t in inner.get("targets", []))
    for variable in DASHBOARD["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
        assert match, variable
        found.append((f"variable {variable['name']}", f"{match[1]}"))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    return [(rule["alert"], rule["expr"]) for group in RULES["groups"] for rule in group["rules"]]


ALL_EXPRESSIONS = [*dashboard_expressions(), *rule_expressions()]


def test_the_parser_finds_names_and_labels_and_refuses_what_prometheus_refuses() -> None:
    """The analysis itself: it sees through functions, aggregations and binary operators."""
    usage = usage_of('histogram_quantile(0.99, sum by (le, upstream) (rate(gateway_upstream_seconds_bucket[5m])))')
    assert usage.selectors == [("gateway_upstream_seconds_bucket", [])]
    assert usage.groupings[0][1] == {"le", "upstream"}
    exported = declared_series()
    assert unexported('sum by (model) (rate(gateway_requests_total{status=~"5.."}[5m])) / on (model) '
                      'sum by (model) (rate(gateway_tokens_total[5m]))', exported) == []
    assert unexported('sum by (nope) (rate(gateway_requests_total{account="a"}[5m]))', exported) == [
        "label gateway_requests_total{account}", "sum by/without ['nope'] not on ['gateway_requests_total']"]
    assert unexported("rate(gateway_requestz_total[5m])", exported) == ["metric gateway_requestz_total"]
    assert unexported('gateway_config_reloads_total{result="failed"}', exported)[0].startswith("value ")
    with pytest.raises(ValueError, match="parenthesis"):
        parse("sum(rate(gateway_requests_total[5m])")


@pytest.mark.parametrize(("where", "expr"), ALL_EXPRESSIONS, ids=[w for w, _ in ALL_EXPRESSIONS])
def test_every_panel_and_rule_queries_series_and_labels_the_gateway_declares(where: str, expr: str) -> None:
    assert unexported(expr, declared_series()) == [], expr


async def test_the_metrics_endpoint_serves_every_series_the_dashboard_and_rules_use(harness: Harness) -> None:
    """After one streamed request, /metrics names every family queried, with the declared labels."""
    _, key = await harness.account(credits=1)
    stream = await harness.sdk(key).chat.completions.create(model="demo-mini", stream=True,
                                                            messages=[{"role": "user", "content": "hi"}])
    assert [chunk async for chunk in stream]
    resp = await harness.client.get("/metrics")
    assert resp.status == 200
    exposed_families: set[str] = set()
    exposed: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(await resp.text()):
        exposed_families.add(family.name)
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).add(frozenset(sample.labels))
    declared = declared_series()
    assert exposed.get("gateway_requests_total") == {declared["gateway_requests_total"]}  # the request is there
    used = {name for _, expr in ALL_EXPRESSIONS for name, _ in usage_of(expr).selectors} - set(PROMETHEUS_SERIES)
    missing = []
    for name in sorted(used):
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if family not in exposed_families:
            missing.append(name)
        for labels in exposed.get(name, ()):
            assert labels == declared.get(name), (name, labels, declared.get(name))
    assert missing == [], f"not in /metrics: {missing}"


def test_the_rules_file_is_prometheus_rule_groups() -> None:
    assert set(RULES) == {"groups"} and RULES["groups"]
    names = [group["name"] for group in RULES["groups"]]
    assert len(names) == len(set(names))
    alerts = []
    for group in RULES["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str) and parse(rule["expr"]) is not None
            if "for" in rule:
                assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert {"summary", "description"} <= set(rule["annotations"])
            alerts.append(rule["alert"])
    assert len(alerts) == len(set(alerts))
    # what the issue asks the rules to watch
    needed = {"GatewayDown", "GatewayRedisErrors", "GatewayUpstreamErrorRate", "GatewayHighOverheadP99",
              "GatewaySettlementsAbandoned", "GatewayUncollectedCredits", "GatewayWebhookBacklogGrowing",
              "GatewayConfigReloadFailed", "GatewayReapedHoldsSpike"}
    assert needed <= set(alerts)


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    queried = " ".join(expr for _, expr in dashboard_expressions())
    for metric in ("gateway_requests_total", "gateway_overhead_seconds_bucket", "gateway_upstream_seconds_bucket",
                   "gateway_time_to_first_token_seconds_bucket", "gateway_credits_charged_total",
                   "gateway_tokens_total", "gateway_usd_charged_total", "gateway_limited_total", "gateway_open_holds",
                   "gateway_reaped_holds_total", "gateway_estimated_settlements_total", "gateway_redis_errors_total",
                   "gateway_upstream_errors_total", "gateway_webhook_queue_depth", "gateway_webhook_deliveries_total",
                   "gateway_config_reloads_total", "gateway_settlement_retries_total",
                   "gateway_settlements_abandoned_total", "gateway_requests_in_flight", "gateway_build_info"):
        assert metric in queried, metric
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)) and DASHBOARD["uid"]
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in DASHBOARD["panels"] if p["type"] != "row"} == {uid}


# ---------------------------------------------------------------- the compose stack


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command if isinstance(command, list) else command.split()


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _host_path(service: str, container_path: str) -> Path:
    """The file under deploy/ a service sees at `container_path` through its bind mounts."""
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (container_path == target or container_path.startswith(target + "/")):
            return (DEPLOY / source / container_path[len(target):].lstrip("/")).resolve()
    raise AssertionError(f"{service} does not mount {container_path}")


def test_the_stack_has_two_gateways_redis_prometheus_grafana_and_the_emulator() -> None:
    assert len(GATEWAYS) == 2
    assert {"redis", "prometheus", "grafana", "emulator"} <= set(SERVICES)
    for name in [*GATEWAYS, "emulator"]:
        build = SERVICES[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert _command("emulator")[:2] == ["gateway", "emulator"]
    assert SERVICES["redis"]["image"].startswith("redis:7.")


def test_redis_keeps_an_append_only_file_on_a_declared_volume() -> None:
    redis = SERVICES["redis"]
    command = " ".join(_command("redis"))
    assert "--appendonly yes" in command and "--requirepass" in command
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in COMPOSE["volumes"]
    assert "healthcheck" in redis


def test_every_named_volume_is_declared_and_every_bind_mount_exists() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)


def test_the_gateways_are_healthchecked_on_ready_and_configured_from_the_environment() -> None:
    providers = (ROOT / "config" / "providers.yaml").read_text(encoding="utf-8")
    emulator_port = _option(_command("emulator"), "--port")
    for name in GATEWAYS:
        service = SERVICES[name]
        args = _command(name)
        assert args[:2] == ["gateway", "serve"] and _option(args, "--host") == ALL_INTERFACES
        assert "/ready" in " ".join(service["healthcheck"]["test"])
        assert _option(args, "--port") in " ".join(service["healthcheck"]["test"])
        env = service["environment"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:6379/0", env["REDIS_URL"])
        for var in ("GATEWAY_ADMIN_KEY", "GATEWAY_METRICS_KEY"):
            assert re.fullmatch(rf"\$\{{{var}:\?[^}}]*\}}", env[var]), var  # from .env, never a value here
        base_urls = {k: v for k, v in env.items() if k.endswith("_BASE_URL")}
        assert {"UPSTREAM_OPENAI_BASE_URL", "UPSTREAM_ANTHROPIC_BASE_URL", "UPSTREAM_GEMINI_BASE_URL"} <= set(base_urls)
        for var, value in base_urls.items():
            assert "${" + var + ":-" in providers, f"{var} is not read by config/providers.yaml"
            assert f"//emulator:{emulator_port}" in value, (var, value)
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_published_ports_are_distinct_loopback_and_match_what_the_services_listen_on() -> None:
    listens = {"prometheus": {"9090"}, "grafana": {"3000"}, "redis": set(), "emulator": set()}
    for name in GATEWAYS:
        args = _command(name)
        listens[name] = {_option(args, "--port"), _option(args, "--admin-port")}
    host_ports = []
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            address, host_port, container_port = port.split(":")
            assert address == "127.0.0.1", (name, port)  # nothing reachable from other machines by default
            assert container_port in listens[name], (name, port)
            host_ports.append(host_port)
    assert len(host_ports) == len(set(host_ports))
    assert all(any(p.endswith(":8080") for p in SERVICES[n]["ports"]) for n in GATEWAYS)


def test_prometheus_scrapes_both_gateways_metrics_with_the_metrics_key() -> None:
    assert _host_path("prometheus", PROMETHEUS["rule_files"][0]) == DEPLOY / "prometheus" / "alerts.yml"
    assert _host_path("prometheus", "/etc/prometheus/prometheus.yml") == DEPLOY / "prometheus" / "prometheus.yml"
    job = next(j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for config in job["static_configs"] for t in config["targets"]]
    assert sorted(t.split(":")[0] for t in targets) == GATEWAYS
    for target in targets:
        host, port = target.split(":")
        assert port == _option(_command(host), "--admin-port")  # /metrics lives on the operator listener
        assert _option(_command(host), "--admin-host") == ALL_INTERFACES  # reachable from the prometheus container
    credentials = job["authorization"]["credentials_file"]
    secret = credentials.removeprefix("/run/secrets/")
    assert secret in SERVICES["prometheus"]["secrets"]
    assert COMPOSE["secrets"][secret] == {"environment": "GATEWAY_METRICS_KEY"}
    down = next(r for g in RULES["groups"] for r in g["rules"] if r["alert"] == "GatewayDown")
    assert f'job="{job["job_name"]}"' in down["expr"]  # the rule watches this scrape job


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard() -> None:
    datasources = yaml.safe_load(_host_path("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml")
                                 .read_text(encoding="utf-8"))
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(_host_path("grafana", "/etc/grafana/provisioning/dashboards/gateway.yml")
                               .read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    folder = _host_path("grafana", provider["options"]["path"])
    assert folder == DEPLOY / "grafana" / "dashboards" and (folder / "gateway.json").is_file()
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path("grafana", home) == folder / "gateway.json"


def test_secrets_come_from_an_env_file_that_is_not_committed() -> None:
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required and required <= set(example)
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    assert not (DEPLOY / ".env").exists() or ".env" in (DEPLOY / ".gitignore").read_text()


# ---------------------------------------------------------------- the Dockerfile


DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_is_multi_stage_pinned_non_root_with_a_volume_and_a_healthcheck() -> None:
    steps = _instructions()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE)
    assert base and re.fullmatch(r"python:3\.1[12]\.\d+-slim-bookworm", base[1]), "pin the base by its exact tag"
    stages = [arg for op, arg in steps if op == "FROM"]
    assert len(stages) == 2 and all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", "/data") in steps
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "GATEWAY_DATA_DIR=/data" in env and "GATEWAY_CONFIG_DIR=/etc/gateway" in env
    healthcheck = next(arg for op, arg in steps if op == "HEALTHCHECK")
    assert "/ready" in healthcheck and "urllib" in healthcheck
    assert {"8080", "9091"} <= set(next(arg for op, arg in steps if op == "EXPOSE").split())
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    assert cmd == ["gateway", "serve", "--host", ALL_INTERFACES]
    assert any(op == "RUN" and "pip wheel" in arg for op, arg in steps)  # built in the builder ...
    assert any(op == "RUN" and "--no-index" in arg and "python -m venv" in arg for op, arg in steps)  # ... installed


def test_the_docker_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    copied = {arg.split()[-2] for op, arg in _instructions() if op == "COPY" and "--from" not in arg}
    copied |= {a for op, arg in _instructions() if op == "COPY" for a in arg.split()[:-1] if not a.startswith("--")}
    assert "*" in ignore  # everything else (tests, .venv, var/, .git) stays out of the context
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, path
        assert (ROOT / path).exists(), path
