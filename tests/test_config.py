"""Config loading: interpolation, validation errors that name file, path and problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, providers_yaml

from gateway.config import ConfigError, interpolate, load_config
from gateway.config_schema import PlansFile, ProvidersFile, render_schemas


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    return tmp_path / "config"


def test_shipped_config_loads_with_prices_compiled(folder: Path) -> None:
    config = load_config(folder)
    route = config.route("gpt-4o-mini")
    assert route is not None and route.upstream == "openai"
    assert config.rates("free", route).input == 150_000
    assert config.upstreams["openai"].base_url == os.environ.get("UPSTREAM_OPENAI_BASE_URL", "https://api.openai.com/v1")
    assert "sk-" not in repr(config.upstreams["openai"])  # keys are Secret: repr redacts


def test_environment_interpolation_with_defaults(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("UPSTREAM_OPENAI_API_KEY", "sk-from-env")
    config = load_config(folder)
    assert config.upstreams["openai"].base_url == "http://127.0.0.1:9/v1"
    assert config.upstreams["openai"].api_key.reveal() == "sk-from-env"


def test_wildcard_routes_after_exact_names(folder: Path) -> None:
    text = (folder / "providers.yaml").read_text()
    text += '  "gpt-*":\n    upstream: openai\n    input: 1\n    output: 2\n    max_output_tokens: 100\n'
    (folder / "providers.yaml").write_text(text)
    config = load_config(folder)
    assert config.route("gpt-4o-mini").pattern == "gpt-4o-mini"  # type: ignore[union-attr]
    assert config.route("gpt-9-turbo").pattern == "gpt-*"  # type: ignore[union-attr]
    assert config.route("claude") is None


@pytest.mark.parametrize(("file", "old", "new", "path", "problem"), [
    ("plans.yaml", "credit_usd: 1.0\n", "credit_usd: -1\n", "plans.free.credit_usd", "positive"),
    ("plans.yaml", "monthly_credits: 20", "monthly_credit: 20", "plans.pro.monthly_credit", "unknown key"),
    ("plans.yaml", "default_plan: free", "default_plan: gold", "default_plan", "unknown plan"),
    ("plans.yaml", 'models: ["gpt-4o-mini"', 'models: ["mistral-*"', "plans.free.models[0]",
     "matches no model"),
    ("providers.yaml", "gpt-5-nano:\n    upstream: openai\n", "gpt-5-nano:\n    upstream: nowhere\n",
     "models.gpt-5-nano.upstream", "unknown upstream"),
    ("providers.yaml", "output: 0.60\n    max_output_tokens: 16384", "output: lots\n    max_output_tokens: 16384",
     "models.gpt-4o-mini.output", "expected a number"),
    ("providers.yaml", "output: 2.00\n    max_output_tokens: 4096", "output: 2.00\n    max_output_tokens: 0",
     "models.gpt-3.5-turbo-instruct.max_output_tokens",
     "at least 1"),
    ("providers.yaml", "dialect: openai", "dialect: smoke-signals", "upstreams.openai.dialect", "must be one of"),
    ("providers.yaml", "${UPSTREAM_OPENAI_API_KEY:-}", "${GATEWAY_TEST_UNSET_VAR}",
     "upstreams.openai.api_key", "GATEWAY_TEST_UNSET_VAR is not set"),
    ("providers.yaml", "\nupstreams:\n", "\nupstreams: [\n", "line", "invalid YAML"),
])
def test_errors_name_the_file_the_path_and_the_problem(folder: Path, file: str, old: str, new: str, path: str,
                                                       problem: str) -> None:
    target = folder / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    message = str(info.value)
    assert message.startswith(str(target)), message
    assert path in message and problem in message, message


def test_check_config_and_serve_exit_non_zero_on_a_bad_file(folder: Path) -> None:
    (folder / "plans.yaml").write_text("plans: {}\ndefault_plan: x\n")
    for command in (["check-config"], ["serve", "--port", "1"]):
        out = subprocess.run([sys.executable, "-m", "gateway", *command, "--config-dir", str(folder)],  # noqa: S603
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        assert "plans.yaml: plans: define at least one plan" in out.stderr


def test_the_readme_plans_example_is_a_valid_plans_yaml(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("#### plans.yaml", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "providers.yaml").write_text(providers_yaml())
    (tmp_path / "plans.yaml").write_text(example)
    config = load_config(tmp_path)
    team = config.plans["team"]
    assert team.timezone == "Europe/Paris" and team.max_keys == 10
    assert {limit.id for limit in team.limits} >= {"requests_per_minute", "spend_5h", "openai.calls_per_cycle",
                                                    "max_cost_usd_per_cycle", "requests_per_cycle"}
    assert config.packs["starter-pack"].credits == 100_000_000


def test_the_readme_alerts_example_is_a_valid_plans_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("### Alerts and webhooks", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "providers.yaml").write_text(providers_yaml())
    (tmp_path / "plans.yaml").write_text(example)
    monkeypatch.setenv("ALERTS_WEBHOOK_URL", "https://billing.example/hooks/gateway")
    policy = load_config(tmp_path).plans["pro"].alerts
    assert (policy.low_credit_share, policy.thresholds) == (0.25, (80, 90, 100))
    assert policy.webhook_url == "https://billing.example/hooks/gateway"


MANY_PROBLEMS = """
default_plan: gold
packs:
  p: {credits: 0.0000001}
plans:
  free:
    monthly_credits: -1
    credit_usd: 0
    models: ["gpt-*", 3]
    limits: {requests_per_minute: 0, bogus: 1}
    alerts: {low_credit_share: 2, webhook_url: ftp://x}
  pro: 7
"""


def test_every_problem_is_reported_at_once_with_its_path(folder: Path) -> None:
    (folder / "plans.yaml").write_text(MANY_PROBLEMS)
    (folder / "providers.yaml").write_text((folder / "providers.yaml").read_text().replace(
        "dialect: gemini", "dialect: carrier-pigeon").replace("max_output_tokens: 1\n", "max_output_tokens: 0\n"))
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    found = {(Path(file).name, path): problem for file, path, problem in info.value.problems}
    assert found == {
        ("providers.yaml", "upstreams.gemini.dialect"):
            "must be one of openai, anthropic, gemini, http, got 'carrier-pigeon'",
        ("providers.yaml", "models.text-embedding-3-small.max_output_tokens"): "expected a whole number of at least 1",
        ("providers.yaml", "models.text-embedding-3-large.max_output_tokens"): "expected a whole number of at least 1",
        ("providers.yaml", "models.gemini-embedding-001.max_output_tokens"): "expected a whole number of at least 1",
        ("plans.yaml", "packs.p.credits"): "at most 6 decimal places",
        ("plans.yaml", "plans.free.monthly_credits"): "must be zero or more",
        ("plans.yaml", "plans.free.credit_usd"): "must be a positive number",
        ("plans.yaml", "plans.free.models[1]"): "expected a non-empty string",
        ("plans.yaml", "plans.free.limits.requests_per_minute"): "expected a whole number of at least 1",
        ("plans.yaml", "plans.free.limits.bogus"): (
            "unknown key (allowed: concurrent_requests, max_cost_usd_per_cycle, max_keys, providers, "
            "requests_per_cycle, requests_per_day, requests_per_minute, spend_windows, tokens_per_cycle, "
            "tokens_per_day, tokens_per_minute)"),
        ("plans.yaml", "plans.free.alerts.low_credit_share"): "must be between 0 and 1",
        ("plans.yaml", "plans.free.alerts.webhook_url"): "must start with http:// or https://, got 'ftp://x'",
        ("plans.yaml", "plans.pro"): "expected a mapping, got int",
    }
    assert str(info.value).count("\n") == len(found) - 1  # one line per problem


def test_the_checks_across_both_files_are_reported_together(folder: Path) -> None:
    text = (folder / "plans.yaml").read_text().replace("default_plan: free", "default_plan: gold")
    text = text.replace('models: ["gpt-4o-mini"', 'models: ["mistral-*"').replace("spend_windows: {5h: 10}",
                                                                                "spend_windows: {5x: 10}")
    (folder / "plans.yaml").write_text(text + "    timezone: Mars/Olympus_Mons\n")
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    paths = [path for _, path, _ in info.value.problems]
    assert paths == ["plans.pro.limits.spend_windows.5x", "plans.team.timezone", "default_plan",
                     "plans.free.models[0]"], info.value


def test_check_config_prints_every_problem_and_json_errors(folder: Path) -> None:
    (folder / "plans.yaml").write_text(MANY_PROBLEMS)
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--json", "--config-dir",  # noqa: S603
                          str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False and len(report["errors"]) == 9
    assert {"file": str(folder / "plans.yaml"), "path": "plans.pro", "problem": "expected a mapping, got int"} \
        in report["errors"]
    assert out.stderr.startswith("configuration error: 9 problem(s)\n")
    assert f"{folder / 'plans.yaml'}: plans.free.limits.requests_per_minute: expected a whole number" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--json", "--config-dir",  # noqa: S603
                         str(ROOT / "config" / "demo")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(ok.stdout)["ok"] is True and json.loads(ok.stdout)["default_plan"] == "demo"


def test_the_published_json_schemas_are_the_models_and_every_shipped_file_references_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in render_schemas().items():
        assert (ROOT / "schema" / name).read_text() == text, f"regenerate: python -m gateway.config_schema ({name})"
    tool_fee = json.loads(render_schemas()["providers.schema.json"])["$defs"]["ToolFeeSpec"]
    assert tool_fee["anyOf"][0] == {"minimum": 0, "type": "number"}  # `web_search: 0.01`, the short form, too
    for folder, relative in ((ROOT / "config", "../schema"), (ROOT / "config" / "demo", "../../schema")):
        for kind in ("plans", "providers"):
            first = (folder / f"{kind}.yaml").read_text().splitlines()[0]
            assert first == f"# yaml-language-server: $schema={relative}/{kind}.schema.json"
            assert (folder / first.split("=", 1)[1]).resolve() == ROOT / "schema" / f"{kind}.schema.json"


@pytest.mark.parametrize("folder", [ROOT / "config", ROOT / "config" / "demo"], ids=["shipped", "demo"])
def test_the_shipped_and_demo_configs_validate_against_the_schemas(folder: Path) -> None:
    for kind, model in (("plans", PlansFile), ("providers", ProvidersFile)):
        raw = yaml.safe_load((folder / f"{kind}.yaml").read_text())
        try:
            import jsonschema  # type: ignore[import-untyped,unused-ignore]
        except ImportError:  # not installed: the models the schemas are generated from decide
            model.model_validate(interpolate(raw, lambda path, problem: pytest.fail(f"{path}: {problem}")))
        else:
            jsonschema.validate(raw, json.loads((ROOT / "schema" / f"{kind}.schema.json").read_text()))
    assert load_config(folder).plans


def test_a_key_given_twice_in_the_yaml_is_a_problem_not_a_silent_replacement(folder: Path) -> None:
    """A second `upstreams:` block (or a plan named twice) would silently replace the first."""
    text = (folder / "providers.yaml").read_text()
    (folder / "providers.yaml").write_text(text + "\nupstreams: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    [(file, where, problem)] = info.value.problems
    assert Path(file).name == "providers.yaml" and where.startswith("line ")
    assert "the key 'upstreams' is given twice" in problem
