"""Fixtures: a real redis-server (the embedded binary), the provider emulator, and the gateway.

The only fake is the upstream provider (gateway.emulator), which speaks OpenAI's wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import redis as sync_redis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google import genai
from google.genai import types

from gateway.app import AccessLogger, create_app
from gateway.embedded import EmbeddedRedis, free_port
from gateway.emulator import EMULATOR, EmulatorState, create_emulator_app
from gateway.keys import KeySchema
from gateway.metering import Quote, ReserveSpec
from gateway.money import MICRO
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.state import GATEWAY, Gateway

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # the admin API's headers
PROVIDER_KEY = "sk-provider-secret-abcdef123456"

TEST_PLANS = """
default_plan: free
plans:
  free:
    monthly_credits: 0
    credit_usd: 1
    models: ["demo-*", "gpt-4o-mini", "claude-*"]
  pro:
    monthly_credits: 0
    credit_usd: 0.01
    markup: 1.5
    models: ["demo-*", "gpt-4o*"]
  starter:
    monthly_credits: 5
    credit_usd: 1
    models: ["demo-mini"]
"""


@pytest.fixture
def root_only() -> Iterator[logging.Logger]:
    """The root logger, given back with its handlers and level as they were."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, to stop, pause or restart without disturbing others."""
    server = EmbeddedRedis(tmp_path / "own-redis", port=free_port(), persist=True)
    server.start()
    yield server
    server.resume()
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    if not redis_server.running:
        redis_server.start()
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def providers_yaml() -> str:
    """The shipped providers.yaml with the demo's upstreams and models (config/demo/) added: the tests
    reach the real providers' entries and the demo's through the emulator."""
    shipped = yaml.safe_load((ROOT / "config" / "providers.yaml").read_text())
    demo = yaml.safe_load((ROOT / "config" / "demo" / "providers.yaml").read_text())
    for section in ("upstreams", "models"):
        shipped[section].update(demo[section])
    return yaml.safe_dump(shipped, sort_keys=False)


@pytest.fixture
def plans_yaml() -> str:
    """The plans.yaml of the harness gateway (override the fixture in a module for other plans)."""
    return TEST_PLANS


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plans_yaml: str) -> Path:
    """The shipped providers.yaml with the demo's (upstream URLs from the environment) and test plans."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "providers.yaml").write_text(providers_yaml())
    (folder / "plans.yaml").write_text(plans_yaml)
    monkeypatch.setenv("UPSTREAM_DEMO_API_KEY", PROVIDER_KEY)
    return folder


@contextlib.asynccontextmanager
async def fake_demo_upstream(app: web.Application, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestServer]:
    """`app` served as the demo upstreams' provider (EMULATOR_URL): a test's own hostile or odd upstream."""
    server = TestServer(app)
    await server.start_server()
    monkeypatch.setenv("EMULATOR_URL", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("UPSTREAM_DEMO_API_KEY", PROVIDER_KEY)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestServer]:
    state = EmulatorState(expected_key=PROVIDER_KEY)
    server = TestServer(create_emulator_app(state))
    await server.start_server()
    monkeypatch.setenv("EMULATOR_URL", str(server.make_url("")).rstrip("/"))  # the demo upstreams
    monkeypatch.setenv("UPSTREAM_OPENAI_BASE_URL", str(server.make_url("/v1")))
    monkeypatch.setenv("UPSTREAM_OPENAI_API_KEY", PROVIDER_KEY)
    monkeypatch.setenv("UPSTREAM_ANTHROPIC_BASE_URL", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("UPSTREAM_ANTHROPIC_API_KEY", PROVIDER_KEY)
    monkeypatch.setenv("UPSTREAM_GEMINI_BASE_URL", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("UPSTREAM_GEMINI_API_KEY", PROVIDER_KEY)
    yield server
    await server.close()


def emulator_state(server: TestServer) -> EmulatorState:
    return server.app[EMULATOR]


def make_settings(config_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"config_dir": config_dir, "redis_url": redis_url, "admin_key": Secret(ADMIN_KEY),
                              "reap_interval_seconds": 3600.0}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Harness:
    """A running gateway with helpers to create accounts and inspect Redis."""

    client: TestClient[Any, Any]
    redis: sync_redis.Redis
    emulator: TestServer
    sdk_clients: list[Any] = field(default_factory=list)

    def shift_clock(self, ms: int) -> None:
        """Move the scripts' clock: the test-only offset the meter and the store hand every script
        (Redis TIME itself can't be moved), to cross cycle ends, lease expiries and key expiries."""
        assert self.gw.meter is not None and self.gw.store is not None
        self.gw.meter.clock_offset_ms += ms
        self.gw.store.clock_offset_ms += ms

    def sdk(self, key: str, **options: Any) -> openai.AsyncOpenAI:
        """An async openai client pointed at the gateway (closed at teardown)."""
        options.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, **options)
        self.sdk_clients.append(client)
        return client

    def anthropic_sdk(self, key: str, **options: Any) -> anthropic.AsyncAnthropic:
        """An async anthropic client pointed at the gateway (base URL without /v1; closed at teardown)."""
        options.setdefault("max_retries", 0)
        client = anthropic.AsyncAnthropic(base_url=str(self.client.make_url("")).rstrip("/"), api_key=key, **options)
        self.sdk_clients.append(client)
        return client

    def genai_client(self, key: str, api_version: str | None = None) -> genai.Client:
        """A google-genai client pointed at the gateway (base URL without the API version)."""
        options = types.HttpOptions(base_url=str(self.client.make_url("")).rstrip("/"), api_version=api_version)
        client = genai.Client(api_key=key, http_options=options)
        self.sdk_clients.append(client)
        return client

    def sync_sdk(self, key: str, **options: Any) -> openai.OpenAI:
        """A blocking openai client (call it through run_sync; closed at teardown)."""
        options.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.base_url, api_key=key, **options)
        self.sdk_clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.sdk_clients:
            if isinstance(client, openai.AsyncOpenAI | anthropic.AsyncAnthropic):
                await client.close()
            elif isinstance(client, genai.Client):
                await client.aio.aclose()
                client.close()
            else:
                client.close()
        self.redis.close()

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None, **kw: Any) -> tuple[int, Any]:
        """Call the admin API with the admin key; returns (status, decoded JSON answer)."""
        if body is not None:
            kw["json"] = body
        async with self.client.request(method, path, headers=ADMIN, **kw) as resp:
            return resp.status, await resp.json()

    async def emulator_post(self, path: str, body: dict[str, Any]) -> bytes:
        """What the fake provider answers when called directly with the provider key."""
        return await self.emulator_post_with_header(path, body, {"Authorization": f"Bearer {PROVIDER_KEY}"})

    async def emulator_post_with_header(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
        async with aiohttp.ClientSession() as session, session.post(
                str(self.emulator.make_url(path)), json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    @property
    def gw(self) -> Gateway:
        return self.client.app[GATEWAY]  # type: ignore[index]

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))

    async def account(self, credits: str | int = 0, plan: str = "free") -> tuple[str, str]:
        """Create an account with `credits` granted and one key; returns (account id, raw key)."""
        headers = ADMIN
        resp = await self.client.post("/admin/accounts", json={"name": "t", "plan": plan}, headers=headers)
        assert resp.status == 201, await resp.text()
        account_id = (await resp.json())["id"]
        if credits and str(credits) != "0":
            resp = await self.client.post(f"/admin/accounts/{account_id}/credits", json={"credits": credits},
                                          headers=headers)
            assert resp.status == 200, await resp.text()
        resp = await self.client.post(f"/admin/accounts/{account_id}/keys", json={"label": "test"}, headers=headers)
        assert resp.status == 201, await resp.text()
        return account_id, (await resp.json())["key"]

    def state(self, account_id: str) -> dict[str, int]:
        """The account's integer balance fields, straight from Redis."""
        keys = KeySchema().for_account(account_id)
        raw = self.redis.hgetall(keys.account)
        return {k.decode(): int(v) for k, v in raw.items()
                if k.decode() in ("allow", "extra", "held", "charged", "granted", "cycle_used", "requests", "expired")}

    def holds(self, account_id: str) -> dict[str, int]:
        """The account's live holds (request id -> micro-credits held); ended holds' tombstones left out."""
        keys = KeySchema().for_account(account_id)
        return {k.decode(): int(v.split()[0]) for k, v in self.redis.hgetall(keys.holds).items()
                if not v.startswith(b"~")}

    def ledger(self, account_id: str) -> list[dict[str, str]]:
        keys = KeySchema().for_account(account_id)
        events = []
        for _id, fields in self.redis.xrange(keys.ledger):
            event = {k.decode(): v.decode() for k, v in fields.items()}
            event.update({k: str(v) for k, v in json.loads(event.pop("data", "{}")).items()})
            events.append(event)
        return events

    async def assert_conserved(self, account_id: str, *others: Gateway) -> dict[str, int]:
        """Invariant 2 at a quiescent point: granted = remaining + held + charged, and the
        ledger's usage events sum to the charged total; no hold is left (invariant 3)."""
        for gw in (self.gw, *others):
            await gw.quiesce()
        s = self.state(account_id)
        remaining = s["allow"] + s["extra"] - s["held"]
        assert s["granted"] == remaining + s["held"] + s["charged"] + s.get("expired", 0), s
        assert s["held"] == 0 and self.holds(account_id) == {}, (s, self.holds(account_id))
        assert remaining >= 0, s
        charged_events = sum(int(e["cost"]) for e in self.ledger(account_id) if e["type"] == "usage")
        assert charged_events == s["charged"], (charged_events, s)
        return s


# The ledger events an account and key made by `Harness.account` start with.
SETUP_EVENTS = ("account_created", "grant", "key_created")

# Hundreds of requests on one test event loop can stall it for longer than the production Redis
# timeout (0.5 s, the fail-closed budget): modules that run such bursts use this.
LOOP_LAG_TOLERANT: dict[str, Any] = {"redis_timeout_seconds": 10.0}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Settings a test module needs changed for the harness gateway (override the fixture in the module)."""
    return {}


@pytest.fixture
async def harness(redis_url: str, config_dir: Path, emulator: TestServer, aiohttp_client: Any,
                  settings_overrides: dict[str, Any]) -> AsyncIterator[Harness]:
    server = TestServer(create_app(make_settings(config_dir, redis_url, **settings_overrides)))
    await server.start_server(access_log_class=AccessLogger)  # the access log `gateway serve` uses
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    h = Harness(client, sync_redis.Redis.from_url(redis_url), emulator)
    yield h
    await h.close()
    await client.close()


@pytest.fixture
async def isolated(own_redis: EmbeddedRedis, config_dir: Path, emulator: TestServer, aiohttp_client: Any
                   ) -> AsyncIterator[Harness]:
    """A gateway on a redis-server of its own (`own_redis`), to stop, pause or restart in a test."""
    client = await aiohttp_client(create_app(make_settings(config_dir, own_redis.url)))
    h = Harness(client, sync_redis.Redis.from_url(own_redis.url), emulator)
    yield h
    await h.close()


def no_limits(q: Quote) -> ReserveSpec:
    """A reserve spec for calling the script directly: no limits, no cycle boundary to cross."""
    return ReserveSpec(q.prompt_tokens_bound + q.max_output_tokens, q.prompt_tokens_bound + 1, 0, 0, "",
                       (0, 2**52), 0, "free", 0)


def credits(micro: int) -> float:
    return micro / MICRO


async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking SDK call off the event loop that serves the gateway."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def start_app(app: web.Application) -> TestServer:
    server = TestServer(app)
    await server.start_server()
    return server
