"""Issue 12, item 4: the durable ledger. The shipper drains every ledger to a sink at least once, with
cursors; a crash re-ships, never loses; one shipper per shard; trimming never outruns the cursors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Harness, make_settings

from gateway.app import create_app
from gateway.index import add_account
from gateway.keys import KeySchema, bucket_of
from gateway.ledger import parse_entry, render, shipped_id, trim_pass, usage_view
from gateway.redis_client import connect_redis
from gateway.settings import Settings, SettingsError
from gateway.shipper import SHIPPER, Shipper, lease_key, to_cloudevent, trim_shipped
from gateway.sinks import BATCH_CONTENT_TYPE, FileSink, HttpSink, make_sink

SCHEMA = KeySchema()
FAR_FUTURE_MS = 10**13


@dataclass
class Receiver:
    """A CloudEvents batch endpoint (as OpenMeter's ingest): refuses its first `fail` deliveries with
    a 503, records every batch it is sent and every one it accepted."""

    fail: int = 0
    sent: list[list[dict[str, Any]]] = field(default_factory=list)
    accepted: list[list[dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == BATCH_CONTENT_TYPE
        batch = await request.json()
        assert isinstance(batch, list) and batch
        assert all(e["specversion"] == "1.0" and e["id"] and e["source"] and e["type"] for e in batch)
        self.sent.append(batch)
        if len(self.sent) <= self.fail:
            return web.json_response({"error": "try later"}, status=503)
        self.accepted.append(batch)
        return web.Response(status=204)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for batch in self.accepted for e in batch]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, HttpSink]]:
    """The test receiver, and an HTTP sink pointed at it."""
    state = Receiver(fail=1)
    app = web.Application()
    app.router.add_post("/api/v1/events", state.handle)
    server = TestServer(app)
    await server.start_server()
    sink = HttpSink(str(server.make_url("/api/v1/events")))
    yield state, sink
    await sink.close()
    await server.close()


async def _requests(harness: Harness, key: str, texts: list[str]) -> None:
    for text in texts:
        body = {"model": "demo-mini", "max_tokens": 30, "messages": [{"role": "user", "content": text}]}
        async with harness.client.post("/v1/chat/completions", json=body,
                                       headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
    await harness.gw.quiesce()


async def _workload(harness: Harness) -> list[str]:
    """Two accounts with usage, a released hold and admin events; returns their ids."""
    accounts = []
    for texts in (["a [[emu out=4]]", "b [[emu fail=500]]", "c [[emu out=9]]", "d [[emu out=2]]"] * 2,
                  ["e [[emu cached=3 out=2]]", "f [[emu out=5]]"]):
        account, key = await harness.account(credits=5)
        await _requests(harness, key, texts)
        accounts.append(account)
    return accounts


def _entries(harness: Harness, account: str) -> list[tuple[str, dict[str, str]]]:
    return [(sid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for sid, fields in harness.redis.xrange(SCHEMA.for_account(account).ledger)]


def _expected_ids(harness: Harness, account: str) -> list[str]:
    """The ids receivers must see, in ledger order: the request id of a usage event, else account:stream id."""
    return [fields["rid"] if fields["type"] == "usage" else f"{account}:{sid}"
            for sid, fields in _entries(harness, account)]


class CrashAfter:
    """A sink that delivers `survive` batches, then delivers (or, `torn`, half writes) one more and
    hangs, like a process killed before it moved its cursors."""

    def __init__(self, sink: Any, survive: int, torn: Path | None = None) -> None:
        self.sink, self.survive, self.torn = sink, survive, torn
        self.crashed = asyncio.Event()

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        if self.survive == 0:
            if self.torn is None:
                await self.sink.deliver(events)
            else:  # the kill lands in the middle of the write
                data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
                with self.torn.open("ab") as out:
                    out.write(data[: len(data) // 2])
            self.crashed.set()
            await asyncio.Event().wait()
        self.survive -= 1
        await self.sink.deliver(events)

    async def close(self) -> None:
        await self.sink.close()


async def _crash(shipper: Shipper, sink: CrashAfter) -> None:
    task = asyncio.create_task(shipper.ship_once())
    await asyncio.wait_for(sink.crashed.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _file_ids(folder: Path) -> list[str]:
    lines = [line for path in sorted(folder.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line)["id"] for line in lines]  # every line whole JSON, or this raises


# ---------------------------------------------------------------- delivery


async def test_http_sink_receives_every_event_once_in_ledger_order_after_a_refused_first_delivery(
        harness: Harness, receiver: tuple[Receiver, HttpSink]) -> None:
    state, sink = receiver
    accounts = await _workload(harness)
    shipper = Shipper(harness.gw.redis, SCHEMA, sink, batch=7, backoff_seconds=0.01)
    expected = {a: _expected_ids(harness, a) for a in accounts}
    total = sum(len(ids) for ids in expected.values())
    assert await shipper.ship_once() == total
    assert state.sent[0] == state.sent[1]  # the refused batch came again, the same ids in the same order
    assert len(state.ids) == len(set(state.ids)) == total  # nothing twice, nothing missing
    for account, ids in expected.items():
        assert [e["id"] for b in state.accepted for e in b if e["subject"] == account] == ids
        assert await shipped_id(harness.gw.redis, SCHEMA, account) == _entries(harness, account)[-1][0]
    # a usage event is byte for byte what `gateway usage export --format cloudevents` writes
    sid, fields = next((s, f) for s, f in _entries(harness, accounts[0]) if f["type"] == "usage")
    exported = json.loads(render([usage_view(accounts[0], parse_entry(sid, fields))], "cloudevents"))
    assert exported == to_cloudevent(accounts[0], sid, fields)
    assert exported in [e for b in state.accepted for e in b]
    grants = [e for b in state.accepted for e in b if e["type"] == "gateway.grant"]
    assert len(grants) == 2 and (grants[0]["data"]["credits"], grants[0]["data"]["credits_micro"]) == ("5", 5_000_000)
    # caught up: the next pass sends nothing; a new event is the only one sent after it
    assert await shipper.ship_once() == 0
    await harness.admin("POST", f"/admin/accounts/{accounts[1]}/credits", {"credits": 1})
    assert await shipper.ship_once() == 1 and state.accepted[-1][0]["type"] == "gateway.grant"


async def test_a_shipper_killed_between_delivery_and_cursor_loses_nothing(
        harness: Harness, receiver: tuple[Receiver, HttpSink]) -> None:
    state, sink = receiver
    state.fail = 0
    accounts = await _workload(harness)
    expected = [i for a in accounts for i in _expected_ids(harness, a)]
    crashing = CrashAfter(sink, survive=1)
    await _crash(Shipper(harness.gw.redis, SCHEMA, crashing, batch=5), crashing)
    delivered_before = list(state.ids)
    assert len(delivered_before) == 10  # two batches reached the receiver, only the first was committed
    restarted = Shipper(harness.gw.redis, SCHEMA, sink, batch=5)
    assert await restarted.ship_once() == len(expected) - 5
    assert set(state.ids) == set(expected)  # every id at least once
    twice = {i for i in state.ids if state.ids.count(i) > 1}
    assert twice == set(delivered_before[5:])  # the uncommitted batch, and only it, came twice


async def test_a_file_sink_torn_by_a_crash_is_mended_and_loses_nothing(harness: Harness, tmp_path: Path) -> None:
    accounts = await _workload(harness)
    expected = [i for a in accounts for i in _expected_ids(harness, a)]
    first = FileSink(tmp_path, tag="w1")
    crashing = CrashAfter(first, survive=1, torn=first.path_for(0))
    await _crash(Shipper(harness.gw.redis, SCHEMA, crashing, batch=5), crashing)
    assert not first.path_for(0).read_bytes().endswith(b"\n")  # a half line at the end
    restarted = FileSink(tmp_path, tag="w1")  # the same process name after a restart: the same file
    assert await Shipper(harness.gw.redis, SCHEMA, restarted, batch=5).ship_once() == len(expected) - 5
    ids = _file_ids(tmp_path)  # the torn line is gone: every line is whole JSON
    assert set(ids) == set(expected)  # every event is there
    twice = [i for i in set(ids) if ids.count(i) > 1]
    assert len(ids) == len(expected) + len(twice) and len(twice) < 5  # only whole lines of the torn batch twice
    for account in accounts:
        assert await shipped_id(harness.gw.redis, SCHEMA, account) == _entries(harness, account)[-1][0]


async def test_two_shippers_never_ship_the_same_shard_at_once(harness: Harness,
                                                              receiver: tuple[Receiver, HttpSink]) -> None:
    state, sink = receiver
    state.fail = 0
    accounts = await _workload(harness)
    expected = [i for a in accounts for i in _expected_ids(harness, a)]
    one, two = (Shipper(harness.gw.redis, SCHEMA, sink, batch=4) for _ in range(2))  # two processes' shippers
    results = await asyncio.gather(one.ship_once(), two.ship_once())
    assert sum(results) == len(expected)  # the shards were shared out ...
    assert sorted(state.ids) == sorted(expected)  # ... and each event shipped exactly once
    shard = bucket_of(accounts[0])
    assert harness.redis.get(lease_key(SCHEMA, shard)) is None  # released after the pass
    # a shard leased by a process that died is left alone until its lease expires
    await harness.admin("POST", f"/admin/accounts/{accounts[0]}/credits", {"credits": 1})
    harness.redis.set(lease_key(SCHEMA, shard), "dead-process", px=60_000)
    assert await one.ship_once() == 0
    harness.redis.delete(lease_key(SCHEMA, shard))  # expired
    assert await two.ship_once() == 1


# ---------------------------------------------------------------- retention


async def test_trimming_never_removes_an_unshipped_event_and_keeps_the_window(harness: Harness,
                                                                              tmp_path: Path) -> None:
    shipped_account, unshipped_account = await _workload(harness)
    # ship the first account's first five entries only (the second account is read after it, or not at all)
    crashing = CrashAfter(FileSink(tmp_path), survive=1)
    shipper = Shipper(harness.gw.redis, SCHEMA, crashing, batch=5)
    await _crash(shipper, crashing)
    cursors = {a: await shipped_id(harness.gw.redis, SCHEMA, a) for a in (shipped_account, unshipped_account)}
    partly = next(a for a, c in cursors.items() if c is not None)
    never = next(a for a, c in cursors.items() if c is None)
    before = {a: _entries(harness, a) for a in (partly, never)}
    cursor = cursors[partly]
    assert cursor is not None
    redis, day = harness.gw.redis, 86_400_000
    # everything is far older than a day: only what was shipped may go, and the cursor's millisecond stays
    assert await trim_shipped(redis, SCHEMA, never, day, [], FAR_FUTURE_MS) == 0
    assert _entries(harness, never) == before[never]
    removed = await trim_shipped(redis, SCHEMA, partly, day, [], FAR_FUTURE_MS)
    kept = _entries(harness, partly)
    assert 0 < removed <= 5 and kept == before[partly][removed:]
    assert all(int(sid.split("-")[0]) >= int(cursor.split("-")[0]) for sid, _ in kept)
    # a protected export that has read nothing keeps everything, shipped or not
    assert await trim_shipped(redis, SCHEMA, partly, day, ["billing"], FAR_FUTURE_MS) == 0
    # all shipped: the retention window decides. Entries younger than the window stay
    everything = Shipper(redis, SCHEMA, FileSink(tmp_path), batch=50)
    await everything.ship_once()
    entries = _entries(harness, partly)
    middle = int(entries[len(entries) // 2][0].split("-")[0])
    window = 7 * day
    await trim_shipped(redis, SCHEMA, partly, window, [], middle + window)
    assert _entries(harness, partly) == [e for e in entries if int(e[0].split("-")[0]) >= middle]


async def test_the_shipper_trims_each_ledger_to_its_window_after_shipping_it(harness: Harness,
                                                                             tmp_path: Path) -> None:
    accounts = await _workload(harness)
    last = {a: _entries(harness, a)[-1][0] for a in accounts}
    expected = [i for a in accounts for i in _expected_ids(harness, a)]
    clock = FAR_FUTURE_MS / 1000  # a week and more after every event
    shipper = Shipper(harness.gw.redis, SCHEMA, FileSink(tmp_path), batch=3, retention_ms=7 * 86_400_000,
                      trim_every_seconds=0, clock=lambda: clock)
    await shipper.ship_once()  # ships, then trims what it shipped
    for account in accounts:
        left = _entries(harness, account)
        assert left and left[-1][0] == last[account]  # the cursor's millisecond stays
        assert all(sid.split("-")[0] == last[account].split("-")[0] for sid, _ in left)
    assert sorted(_file_ids(tmp_path)) == sorted(expected)  # what went from Redis is on disk


async def test_the_hourly_retention_trim_keeps_what_the_shipper_has_not_shipped(harness: Harness) -> None:
    (account, *_) = await _workload(harness)
    total = len(_entries(harness, account))
    await trim_pass(harness.gw.redis, SCHEMA, 86_400_000, [], FAR_FUTURE_MS, shipped=True)
    assert len(_entries(harness, account)) == total  # nothing shipped yet: nothing goes


# ---------------------------------------------------------------- the file sink and settings


async def test_file_sink_rotates_by_hour_and_size_and_mends_a_torn_tail(tmp_path: Path) -> None:
    now = datetime(2026, 12, 1, 10, 59, 59, tzinfo=UTC).timestamp()
    sink = FileSink(tmp_path, max_bytes=200, tag="w1", clock=lambda: now)
    event = {"id": "x" * 60}
    await sink.deliver([event])
    await sink.deliver([event, event])  # 10:59 file would pass 200 bytes: a second part
    now += 1
    await sink.deliver([event])  # 11:00: a new hour, a new file
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert names == ["2026-12-01/ledger-2026-12-01T10-w1.1.jsonl", "2026-12-01/ledger-2026-12-01T10-w1.jsonl",
                     "2026-12-01/ledger-2026-12-01T11-w1.jsonl"]
    torn = tmp_path / "2026-12-01/ledger-2026-12-01T11-w1.jsonl"
    with torn.open("ab") as out:
        out.write(b'{"id":"half')
    await FileSink(tmp_path, max_bytes=200, tag="w1", clock=lambda: now).deliver([{"id": "y"}])
    assert [json.loads(line)["id"] for line in torn.read_text().splitlines()] == ["x" * 60, "y"]
    day = FileSink(tmp_path / "d", rotate="day", tag="w1", clock=lambda: now)
    await day.deliver([event])
    assert (tmp_path / "d/2026-12-01/ledger-2026-12-01-w1.jsonl").exists()


def test_a_ledger_sink_shortens_the_default_retention_to_a_week(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    assert Settings.from_env().ledger_retention_days == 400 and Settings.from_env().ledger_sink is None
    monkeypatch.setenv("GATEWAY_LEDGER_SINK", "file:///var/lib/gateway/ledger")
    settings = Settings.from_env()
    assert settings.ledger_retention_days == 7
    assert isinstance(make_sink(settings), FileSink)
    assert make_sink(settings).directory == Path("/var/lib/gateway/ledger")  # type: ignore[union-attr]
    monkeypatch.setenv("GATEWAY_LEDGER_RETENTION_DAYS", "30")
    assert Settings.from_env().ledger_retention_days == 30
    monkeypatch.setenv("GATEWAY_LEDGER_SINK", "file")
    assert make_sink(Settings.from_env(data_dir=tmp_path)).directory == tmp_path / "ledger"  # type: ignore[union-attr]
    monkeypatch.setenv("GATEWAY_LEDGER_SINK", "https://openmeter.example/api/v1/events")
    monkeypatch.setenv("GATEWAY_LEDGER_SINK_TOKEN", "om_secret_token")
    settings = Settings.from_env()
    assert isinstance(make_sink(settings), HttpSink) and "om_secret_token" not in repr(settings)
    for bad in ("ftp://host/x", "file://relative/dir", "https://user:om_secret@openmeter.example/api/v1/events"):
        monkeypatch.setenv("GATEWAY_LEDGER_SINK", bad)
        with pytest.raises(SettingsError) as refused:
            Settings.from_env()
        assert "om_secret" not in str(refused.value)


async def test_every_gateway_process_ships_in_the_background_when_a_sink_is_set(
        redis_url: str, config_dir: Path, emulator: TestServer, aiohttp_client: Any, tmp_path: Path) -> None:
    settings = make_settings(config_dir, redis_url, ledger_sink=f"file://{tmp_path}/ledger",
                             ledger_ship_interval_seconds=0.02)
    app = create_app(settings)
    client = await aiohttp_client(app)
    harness = Harness(client, sync_redis.Redis.from_url(redis_url), emulator)
    try:
        account, key = await harness.account(credits=5)
        await _requests(harness, key, ["one [[emu out=3]]", "two [[emu out=4]]"])
        expected = _expected_ids(harness, account)
        await asyncio.wait_for(app[SHIPPER].until_shipped(len(expected)), 10)
        assert _file_ids(tmp_path / "ledger") == expected
    finally:
        await harness.close()


async def test_a_pass_looks_first_and_leases_only_the_shards_with_something_new(redis_url: str,
                                                                               tmp_path: Path) -> None:
    schema, probe = KeySchema("shiplook:"), sync_redis.Redis.from_url(redis_url)
    redis = connect_redis(redis_url, 0.5)
    accounts = [f"acct_look{n:04d}" for n in range(40)]
    for account in accounts:
        await add_account(redis, schema, account)
        await redis.xadd(schema.for_account(account).ledger, {"type": "grant", "ts": "1764000000000"})

    def writes() -> dict[str, int]:  # lease acquisitions and cursor moves are SETs, renewals and releases WATCH
        stats = probe.info("commandstats")
        return {name: int(stats.get(f"cmdstat_{name}", {"calls": 0})["calls"]) for name in ("set", "watch")}

    shipper = Shipper(redis, schema, FileSink(tmp_path / "ledger"), batch=100)
    try:
        assert await shipper.ship_once() == len(accounts)  # the first pass: every shard (their trims are due)
        before = writes()
        assert await shipper.ship_once() == 0
        assert writes() == before  # nothing new, no trim due: not one lease taken
        await redis.xadd(schema.for_account(accounts[3]).ledger, {"type": "grant", "ts": "1764000000001"})
        assert await shipper.ship_once() == 1
        after = writes()
        assert after["set"] - before["set"] == 2  # the one shard's lease, and its account's cursor
        assert len(_file_ids(tmp_path / "ledger")) == len(accounts) + 1
        assert await shipped_id(redis, schema, accounts[3]) == _last_id(probe, schema, accounts[3])
    finally:
        await redis.aclose()
        probe.close()


def _last_id(probe: sync_redis.Redis, schema: KeySchema, account: str) -> str:
    entries: Any = probe.xrevrange(schema.for_account(account).ledger, count=1)
    return str(entries[0][0].decode())
