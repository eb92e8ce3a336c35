"""The `gateway` command's sharp edges (issue 14, items 4 and 5): the demo apart from the shipped
config, which Redis an operator command uses, option and environment errors without tracebacks, and
human output that reads as sentences and tables with ISO-8601 dates."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_KEY, ROOT
from served import Served, wait_ready

from gateway.cli import build_parser, main
from gateway.config import load_config
from gateway.embedded import free_port
from gateway.settings import Settings, SettingsError

DATE = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def gateway(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ...` with this checkout's package, the environment cleaned of the demo's and
    the tests' Redis/config variables unless given."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("REDIS_URL", "GATEWAY_CONFIG_DIR", "GATEWAY_DATA_DIR", "EMULATOR_URL", "EMULATOR_PORT")}
    full = {**base, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=full,  # noqa: S603
                          capture_output=True, text=True, timeout=90, check=False)


def json_of(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the demo, apart


def test_the_shipped_config_holds_no_demo() -> None:
    for name in ("plans.yaml", "providers.yaml"):
        text = "\n".join(line.split("#", 1)[0] for line in (ROOT / "config" / name).read_text().splitlines())
        assert "demo" not in text and "8090" not in text and "127.0.0.1" not in text, name
    config = load_config(ROOT / "config")
    assert not [r.pattern for r in config.routes if r.pattern.startswith("demo")]
    assert all(not plan.allows("demo-mini") for plan in config.plans.values())
    assert all(u.base_url.startswith("https://") for u in config.upstreams.values())


def test_the_demo_upstreams_follow_the_emulator_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMULATOR_URL", "http://127.0.0.1:9123")
    config = load_config(ROOT / "config" / "demo")
    assert {u.base_url for u in config.upstreams.values()} == {"http://127.0.0.1:9123", "http://127.0.0.1:9123/v1"}
    assert config.route("demo-mini") is not None and config.plans[config.default_plan].allows("demo-mini")


async def test_serve_with_the_emulator_on_another_port_answers_through_the_demo_model(tmp_path: Path) -> None:
    """`serve --with-emulator --emulator-port N` (no --config-dir): the demo config, its upstreams on N."""
    port, emulator_port, data = free_port(), free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG_DIR", "EMULATOR_URL", "REDIS_URL")}
    env.update({"PYTHONPATH": str(ROOT), "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_DATA_DIR": str(data)})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port),  # noqa: S603
                                 "--with-emulator", "--emulator-port", str(emulator_port)],
                                cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    served = Served(proc, port, data, log_path)
    try:
        await wait_ready(served)
        assert f"provider emulator on http://127.0.0.1:{emulator_port}/v1" in served.log()
        # the CLI, run from another directory, finds the running gateway's Redis through --data-dir, and
        # its configuration (the demo's: the account is on the demo's default plan)
        made = gateway("accounts", "create", "--name", "demo", "--json", "--data-dir", str(data), cwd=tmp_path)
        account = json_of(made)["id"]
        assert json_of(made)["plan"] == "demo"
        assert f"using the embedded Redis of the gateway running on {data.resolve()}" in made.stderr
        key = json_of(gateway("keys", "create", "--account", account, "--json", "--data-dir", str(data),
                              cwd=tmp_path))["key"]
        async with aiohttp.ClientSession() as session, session.post(
                served.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {key}"},
                json={"model": "demo-mini", "messages": [{"role": "user", "content": "Hello"}]}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["usage"]["prompt_tokens"] > 0 and float(resp.headers["x-credits-remaining"]) < 1
    finally:
        assert served.stop() == 0, served.log()
    assert not (data / "config_dir").exists()  # a stopped gateway's config is not an operator command's


# ---------------------------------------------------------------- which Redis


def test_an_operator_command_refuses_a_data_directory_without_data(tmp_path: Path) -> None:
    done = gateway("stats", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"no gateway is running on the data directory {tmp_path / 'var'}" in done.stderr
    assert "holds no data" in done.stderr and "--create-data-dir" in done.stderr
    assert not (tmp_path / "var").exists()  # nothing started, nothing made
    made = gateway("stats", "--create-data-dir", "--json", cwd=tmp_path)
    assert json_of(made)["accounts"] == 0
    assert f"the embedded Redis in {tmp_path / 'var'} (started for this command)" in made.stderr
    assert gateway("stats", cwd=tmp_path).returncode == 0  # the directory holds a store now


def test_an_operator_command_says_which_redis_without_its_password(redis_url: str) -> None:
    done = gateway("stats", env={"REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    password = redis_url.split("//:", 1)[1].split("@", 1)[0]
    assert password and password not in done.stderr + done.stdout
    assert re.search(r"^using Redis at redis://127\.0\.0\.1:\d+/0$", done.stderr, re.M), done.stderr


# ---------------------------------------------------------------- options and environment


@pytest.mark.parametrize(("args", "expected"), [
    (["accounts", "list", "--limit", "0"], "argument --limit: must be a whole number of at least 1, got '0'"),
    (["accounts", "list", "--limit", "-3"], "argument --limit: must be a whole number of at least 1"),
    (["accounts", "list", "--status", "bogus"], "(choose from 'active', 'suspended', 'closed')"),
    (["plans", "renew", "--account", "a", "--months", "0"], "argument --months: must be a whole number"),
    (["serve", "--port", "70000"], "argument --port: must be a port number from 1 to 65535"),
    (["serve", "--workers", "none"], "argument --workers: must be a whole number of at least 1"),
])
def test_bad_option_values_are_argparse_errors(args: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


def _numeric_settings_variables() -> list[str]:
    source = (ROOT / "gateway" / "settings.py").read_text()
    return sorted(set(re.findall(r'env_(?:int|float)\("([A-Z_]+)"', source)))


def test_every_numeric_environment_variable_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _numeric_settings_variables()
    assert "GATEWAY_MAX_BODY_BYTES" in names and len(names) >= 20
    for name in names:
        for bad in ("10MB", "-1", "nan"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(SettingsError, match=rf"^{name} must be a (whole )?number.*got '{bad}'"):
                Settings.from_env()
        monkeypatch.delenv(name)


@pytest.mark.parametrize(("variable", "command"), [
    ("GATEWAY_MAX_BODY_BYTES", ["serve"]), ("GATEWAY_PORT", ["serve"]), ("GATEWAY_WORKERS", ["serve"]),
    ("EMULATOR_PORT", ["serve", "--with-emulator"]), ("GATEWAY_HOLD_LEASE_SECONDS", ["stats"]),
])
def test_a_bad_environment_value_is_one_clear_error(variable: str, command: list[str], tmp_path: Path) -> None:
    done = gateway(*command, cwd=tmp_path, env={variable: "10MB"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(f"configuration error: {variable} must be a whole number") or \
        done.stderr.strip().startswith(f"configuration error: {variable} must be a number"), done.stderr


def test_serve_log_format_sets_the_variable_before_anything_starts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "text")  # recorded, so the json serve sets is undone after the test
    (tmp_path / "plans.yaml").write_text("plans: {}\n")  # refused: serve stops before any worker starts
    assert main(["serve", "--log-format", "json", "--config-dir", str(tmp_path)]) == 2
    assert os.environ["GATEWAY_LOG_FORMAT"] == "json"
    with pytest.raises(SystemExit):
        main(["serve", "--log-format", "xml"])


def test_version_and_help_on_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"gateway \d+\.\d+\.\d+\n", capsys.readouterr().out)
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "gateway")
    assert missing == []


def test_the_readme_documents_every_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    names = set()
    for module in ("settings.py", "cli_serve.py", "embedded.py"):
        names |= set(re.findall(r'"((?:GATEWAY|EMULATOR)_[A-Z_]+|REDIS_URL)"', (ROOT / "gateway" / module).read_text()))
    assert {"GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_WORKERS", "GATEWAY_MAX_BODY_BYTES", "EMULATOR_PORT"} <= names
    assert sorted(n for n in names if f"`{n}`" not in readme) == []


# ---------------------------------------------------------------- human output


def test_human_output_reads_as_sentences_and_tables(redis_url: str, config_dir: Path) -> None:
    env, where = {"REDIS_URL": redis_url}, ["--config-dir", str(config_dir)]
    account = json_of(gateway("accounts", "create", "--name", "Ada", "--plan", "starter", "--json", *where,
                              env=env))["id"]
    stats = gateway("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.startswith("1 account(s). By plan: 1 starter. By status: 1 active.\n"), stats.stdout
    assert "Credits: 0 used this cycle" in stats.stdout and "5 remaining" in stats.stdout
    shown = gateway("accounts", "show", account, *where, env=env).stdout
    assert re.search(r"^created at\s+" + DATE.pattern, shown, re.M) and "None" not in shown and "[]" not in shown
    listed = gateway("accounts", "list", *where, env=env).stdout.splitlines()
    assert listed[0].split() == ["id", "plan", "status", "credits", "left", "name"]
    assert listed[1].split() == [account, "starter", "active", "5", "Ada"]
    gateway("keys", "create", "--account", account, *where, env=env)
    keys = gateway("keys", "list", "--account", account, *where, env=env).stdout.splitlines()
    assert keys[0].split()[:3] == ["id", "key", "status"] and "never" in keys[1]


def test_plans_renew_prints_an_iso_date_and_refuses_a_subscription_without_an_end(
        redis_url: str, config_dir: Path) -> None:
    env, where = {"REDIS_URL": redis_url}, ["--config-dir", str(config_dir)]
    account = json_of(gateway("accounts", "create", "--name", "a", "--json", *where, env=env))["id"]
    refused = gateway("plans", "renew", "--account", account, *where, env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "has no end date to extend" in refused.stderr
    assert json_of(gateway("accounts", "show", account, "--json", *where, env=env))["plan_expires_at"] is None
    gateway("plans", "change", "--account", account, "--plan", "pro", "--effective", "now",
            "--expires-at", "2100-01-15T00:00:00Z", *where, env=env)
    renewed = gateway("plans", "renew", "--account", account, "--months", "2", *where, env=env)
    assert renewed.stdout.strip() == f"{account}: subscription renewed until 2100-03-15T00:00:00Z", renewed.stderr
