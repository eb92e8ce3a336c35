"""The operator surface: the admin API, the metrics and the dashboard on a listener of their own (gone
from the public one), a bearer key for the metrics, and several named admin keys, revocable without a
restart, whose names (never the keys) are logged."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN, ADMIN_KEY, make_settings

from gateway.app import AccessLogger, create_app
from gateway.cli import main
from gateway.embedded import free_port
from gateway.secret import Secret
from gateway.settings import Settings


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _start(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings))
    await server.start_server(access_log_class=AccessLogger)
    return server


async def _status(session: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as resp:
        body = await resp.read()
        return resp.status, body


async def test_the_admin_api_metrics_and_dashboard_move_to_their_own_listener(
        config_dir: Path, redis_url: str, session: aiohttp.ClientSession) -> None:
    port = free_port()
    public = await _start(make_settings(config_dir, redis_url, admin_port=port))
    admin = f"http://127.0.0.1:{port}"
    try:
        status, body = await _status(session, "POST", f"{admin}/admin/accounts", json={"name": "a"}, headers=ADMIN)
        assert status == 201, body
        account = json.loads(body)["id"]
        status, body = await _status(session, "POST", f"{admin}/admin/accounts/{account}/keys", json={},
                                     headers=ADMIN)
        key = json.loads(body)["key"]
        for path in ("/admin/stats", "/admin/plans", f"/admin/accounts/{account}", "/metrics", "/health", "/ready",
                     "/dashboard"):
            assert (await _status(session, "GET", f"{admin}{path}", headers=ADMIN))[0] == 200, path
        # gone from the public listener, with the ordinary 404, whatever the key
        for method, path in (("GET", "/admin/stats"), ("POST", "/admin/accounts"), ("GET", "/metrics"),
                             ("GET", f"/admin/accounts/{account}/usage"),
                             ("PUT", f"/admin/accounts/{account}/webhook")):
            status, body = await _status(session, method, public.make_url(path), headers=ADMIN, json={})
            assert status == 404 and b"No route" in body, (path, body)
        # the public listener still serves key holders; the admin one does not
        me = {"Authorization": f"Bearer {key}"}
        assert (await _status(session, "GET", public.make_url("/gateway/credits"), headers=me))[0] == 200
        assert (await _status(session, "GET", f"{admin}/gateway/credits", headers=me))[0] == 404
        assert (await _status(session, "GET", public.make_url("/health")))[0] == 200
    finally:
        await public.close()
    with pytest.raises(aiohttp.ClientConnectionError):  # the admin listener stops with the app
        await _status(session, "GET", f"{admin}/health")


async def test_the_admin_listener_binds_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_PORT", "9091")
    monkeypatch.delenv("GATEWAY_ADMIN_HOST", raising=False)
    settings = Settings.from_env()
    assert (settings.admin_port, settings.admin_host) == (9091, "127.0.0.1")
    assert Settings.from_env(admin_host="10.0.0.5").admin_host == "10.0.0.5"
    monkeypatch.delenv("GATEWAY_ADMIN_PORT")
    assert Settings.from_env().admin_port is None  # unset: everything on the public listener, as before


async def test_metrics_want_the_metrics_key_when_one_is_set(config_dir: Path, redis_url: str,
                                                            session: aiohttp.ClientSession) -> None:
    server = await _start(make_settings(config_dir, redis_url, metrics_key=Secret("metrics-key-123")))
    try:
        url = server.make_url("/metrics")
        assert (await _status(session, "GET", url))[0] == 401
        assert (await _status(session, "GET", url, headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert (await _status(session, "GET", url, headers=ADMIN))[0] == 401  # the admin key is not the metrics key
        status, body = await _status(session, "GET", url, headers={"Authorization": "Bearer metrics-key-123"})
        assert status == 200 and b"gateway_requests_total" in body and b"metrics-key-123" not in body
    finally:
        await server.close()


async def test_named_admin_keys_work_are_logged_by_name_and_one_is_revoked_without_a_restart(
        config_dir: Path, redis_url: str, tmp_path: Path, session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys_file = tmp_path / "admin-keys"
    keys_file.write_text("# name:key, one a line\nops:ops-key-0123456789\nbilling:billing-key-0123456789\n")
    keys_file.chmod(0o600)
    server = await _start(make_settings(config_dir, redis_url, admin_keys_file=keys_file,
                                        admin_keys=(("deploy", Secret("deploy-key-0123456789")),)))
    try:
        url = server.make_url("/admin/stats")
        for key in ("ops-key-0123456789", "billing-key-0123456789", "deploy-key-0123456789", ADMIN_KEY):
            assert (await _status(session, "GET", url, headers={"Authorization": f"Bearer {key}"}))[0] == 200, key
        assert (await _status(session, "GET", url, headers={"X-Admin-Key": "billing-key-0123456789"}))[0] == 200
        # billing's key is revoked: the file is replaced, the gateway keeps running
        replacement = tmp_path / "admin-keys.new"
        replacement.write_text("ops:ops-key-0123456789\n")
        os.replace(replacement, keys_file)
        assert (await _status(session, "GET", url,
                              headers={"Authorization": "Bearer billing-key-0123456789"}))[0] == 401
        assert (await _status(session, "GET", url, headers={"Authorization": "Bearer ops-key-0123456789"}))[0] == 200
        assert (await _status(session, "GET", url, headers={"Authorization": "Bearer nope"}))[0] == 401
    finally:
        await server.close()
    names = [r.getMessage() for r in caplog.records if r.name == "gateway.admin"]
    assert any("'ops'" in m for m in names) and any("'billing'" in m for m in names)
    assert any("'deploy'" in m for m in names) and any("'admin'" in m for m in names)
    assert "key-0123456789" not in caplog.text and ADMIN_KEY not in caplog.text


def test_admin_keys_come_named_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", "ops:KEY1, billing:KEY:2")
    settings = Settings.from_env()
    assert [(name, key.reveal()) for name, key in settings.admin_keys] == [("ops", "KEY1"), ("billing", "KEY:2")]
    assert "KEY1" not in repr(settings)
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", "ops-without-a-key")
    with pytest.raises(ValueError, match="entry 1") as error:
        Settings.from_env()
    assert "ops-without-a-key" not in str(error.value)


def test_serve_refuses_a_malformed_admin_keys_setting_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", "ops:KEY1,forgot-the-key")
    assert main(["serve", "--config-dir", str(config_dir), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "admin key entry 2" in err and "Traceback" not in err and "KEY1" not in err
