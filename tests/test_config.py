"""Config loading: interpolation, validation errors that name file, path and problem."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, providers_yaml

from gateway.config import ConfigError, load_config


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
