"""Issue 5: the ledger (one event per request, admin actions), the usage API, exports and retention."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from conftest import ADMIN, ROOT, Harness

from gateway.keys import KeySchema
from gateway.ledger import parse_entry, render, trim, usage_view
from gateway.money import credits_to_micro


def _body(text: str, stream: bool = False, model: str = "demo-mini") -> dict[str, Any]:
    return {"model": model, "max_tokens": 30, "stream": stream, "messages": [{"role": "user", "content": text}]}


async def _call(harness: Harness, key: str, body: dict[str, Any]) -> tuple[int, str]:
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-request-id", "")


async def _workload(harness: Harness, keys: list[str]) -> list[tuple[int, str]]:
    texts = ["plain [[emu out=4]]", "long [[emu out=25]]", "cached [[emu cached=3 out=2]]", "bad [[emu fail=500]]",
             "cut [[emu fail=cut]]", "quiet [[emu fail=nousage]]"]
    calls = [_call(harness, keys[i % len(keys)], _body(texts[i % len(texts)], stream=i % 2 == 0,
                                                       model="demo-large" if i % 5 == 0 else "demo-mini"))
             for i in range(60)]
    return list(await asyncio.gather(*calls))


async def _get(harness: Harness, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with harness.client.get(path, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_every_request_has_exactly_one_event_and_events_sum_to_the_charges(harness: Harness) -> None:
    account, key = await harness.account(credits=5)
    async with harness.client.post(f"/admin/accounts/{account}/keys", json={"label": "second"}, headers=ADMIN) as r:
        second = (await r.json())["key"]
    results = await _workload(harness, [key, second])
    state = await harness.assert_conserved(account)  # usage events sum to exactly the charges
    events = harness.ledger(account)
    per_request = [e for e in events if e["type"] in ("usage", "released")]
    assert sorted(e["rid"] for e in per_request) == sorted(rid for _, rid in results)  # one each, none twice
    usage = [e for e in events if e["type"] == "usage"]
    assert sum(int(e["cost"]) for e in usage) == state["charged"]
    assert {e["rid"] for e in usage} == {rid for status, rid in results if status == 200}
    assert {e["key_id"] for e in usage} == {k.decode() for k in harness.redis.smembers(
        KeySchema().for_account(account).key_ids)}
    sample = next(e for e in usage if e["outcome"] == "ok")
    for field in ("ts", "model", "upstream", "endpoint", "in", "out", "cost", "usd_micro", "latency_ms", "status"):
        assert field in sample, field


async def test_admin_actions_are_ledger_events(harness: Harness) -> None:
    account, key = await harness.account(credits=1)  # a grant and a key
    async with harness.client.put(f"/admin/accounts/{account}/plan", json={"plan": "pro", "effective": "now"},
                                  headers=ADMIN) as r:
        assert r.status == 200
    key_id = next(k.decode() for k in harness.redis.smembers(KeySchema().for_account(account).key_ids))
    async with harness.client.post(f"/admin/keys/{key_id}/rotate", json={"grace_seconds": 60}, headers=ADMIN) as r:
        assert r.status == 201
        new_key = await r.json()
    async with harness.client.patch(f"/admin/keys/{new_key['id']}", json={"label": "ci"}, headers=ADMIN) as r:
        assert r.status == 200
    async with harness.client.put(f"/admin/accounts/{account}/webhook", headers=ADMIN,
                                  json={"url": "https://hooks.example/x", "secret": "whsec-ledger"}) as r:
        assert r.status == 200
    async with harness.client.delete(f"/admin/keys/{key_id}", headers=ADMIN) as r:
        assert r.status == 200
    types = [e["type"] for e in harness.ledger(account)]
    assert types == ["account_created", "grant", "key_created", "plan_change", "key_created", "key_rotated",
                     "key_updated", "webhook_set", "key_revoked"]
    assert key and new_key["key"]  # neither raw key nor the webhook secret is in any event
    assert all(secret not in json.dumps(e) for e in harness.ledger(account)
               for secret in (key, new_key["key"], "whsec-ledger"))


async def test_usage_api_filters_pages_and_summarises(harness: Harness) -> None:
    account, key = await harness.account(credits=5)
    results = await _workload(harness, [key])
    served = {rid for status, rid in results if status == 200}
    me = {"Authorization": f"Bearer {key}"}
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await _get(harness, f"/gateway/usage?limit=7{cursor}", me)
        assert status == 200 and len(page["data"]) <= 7
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert sorted(seen) == sorted(served)  # pages cover every event once
    status, large = await _get(harness, "/gateway/usage?model=demo-large&limit=1000", me)
    assert {e["model"] for e in large["data"]} == {"demo-large"} and large["data"]
    status, none = await _get(harness, "/gateway/usage?from=2000-01-01T00:00:00Z&to=2000-02-01T00:00:00Z", me)
    assert status == 200 and none["data"] == []
    status, summary = await _get(harness, "/gateway/usage/summary", me)
    state = harness.state(account)
    assert summary["credits_used_micro"] == state["charged"]
    assert sum(m["requests"] for m in summary["by_model"]) == len(served)
    assert {m["model"] for m in summary["by_model"]} == {"demo-mini", "demo-large"}
    assert summary["projected_credits_at_cycle_end_micro"] >= summary["credits_used_micro"]
    assert summary["lifetime"]["requests"] == len(served)
    status, as_admin = await _get(harness, f"/admin/accounts/{account}/usage?provider=demo&limit=1000", ADMIN)
    assert status == 200 and sorted(e["id"] for e in as_admin["data"]) == sorted(served)
    operator_view = (await _get(harness, f"/admin/accounts/{account}/usage/summary", ADMIN))[1]
    assert operator_view["by_model"] == summary["by_model"] and operator_view["lifetime"] == summary["lifetime"]
    assert (await _get(harness, "/gateway/usage?limit=0", me))[0] == 400
    assert (await _get(harness, "/gateway/usage?cursor=abc", me))[0] == 400
    assert (await _get(harness, "/gateway/usage?from=yesterday", me))[0] == 400
    assert (await _get(harness, f"/admin/accounts/{account}/usage", me))[0] == 401


async def _export(config_dir: Path, redis_url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "export", "--config-dir", str(config_dir), "--redis-url",
        redis_url, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_exports_round_trip_are_idempotent_and_resume_without_duplicates(harness: Harness, config_dir: Path,
                                                                                redis_url: str) -> None:
    account, key = await harness.account(credits=5)
    first = {rid for status, rid in await _workload(harness, [key]) if status == 200}
    jsonl = [json.loads(line) for line in (await _export(config_dir, redis_url, "--format", "jsonl")).splitlines()]
    assert {e["id"] for e in jsonl} == first and len(jsonl) == len(first)
    again = [json.loads(line) for line in (await _export(config_dir, redis_url)).splitlines()]
    assert again == jsonl  # the same events, the same ids
    rows = list(csv.DictReader(io.StringIO(await _export(config_dir, redis_url, "--format", "csv"))))
    assert {r["id"] for r in rows} == first and sum(int(r["credits_micro"]) for r in rows) > 0
    events = [json.loads(line) for line in (await _export(config_dir, redis_url, "--format", "cloudevents"))
              .splitlines()]
    assert {e["id"] for e in events} == first
    assert all(e["specversion"] == "1.0" and e["subject"] == account and e["source"] and e["type"] for e in events)
    # resumable: the first run takes everything, the second only what came after it
    resumed = await _export(config_dir, redis_url, "--resume", "billing")
    assert {json.loads(line)["id"] for line in resumed.splitlines()} == first
    assert await _export(config_dir, redis_url, "--resume", "billing") == ""
    later = {rid for status, rid in await _workload(harness, [key]) if status == 200}
    tail = [json.loads(line)["id"] for line in (await _export(config_dir, redis_url, "--resume", "billing"))
            .splitlines()]
    assert sorted(tail) == sorted(later)


async def test_retention_never_trims_an_event_an_export_has_not_read(harness: Harness, config_dir: Path,
                                                                     redis_url: str) -> None:
    account, key = await harness.account(credits=5)
    await _workload(harness, [key])
    schema = KeySchema()
    stream = schema.for_account(account).ledger
    total = harness.redis.xlen(stream)
    far_future = 10**13
    # the export "billing" has read nothing yet: nothing may go, however old
    assert await trim(harness.gw.redis, schema, account, 1000, ["billing"], far_future) == 0
    assert harness.redis.xlen(stream) == total
    await _export(config_dir, redis_url, "--resume", "billing")
    cursor = harness.redis.hget(schema.for_account(account).exports, "billing").decode()  # under the account's tag
    removed = await trim(harness.gw.redis, schema, account, 1000, ["billing"], far_future)
    assert 0 < removed < total  # everything before the cursor's millisecond, nothing at or after it
    assert all(entry_id.decode() >= cursor.split("-")[0] for entry_id, _ in harness.redis.xrange(stream))
    # with no export to protect, the retention alone decides
    await trim(harness.gw.redis, schema, account, 1000, [], far_future)
    assert harness.redis.xlen(stream) == 0


# ---------------------------------------------------------------- fidelity (issue 10, item 15)

LONG = " ".join(["word"] * 60)


async def _priced_workload(harness: Harness, key: str) -> dict[str, dict[str, Any]]:
    """Requests that report every kind of priced quantity, streamed and not, in all three dialects;
    returns what each OpenAI call's response reported, by request id."""
    reported: dict[str, dict[str, Any]] = {}
    for stream in (False, True):
        for text in ("[[emu cached=3 out=5]]", "[[emu out=7 reasoning=4]]", "[[emu fail=cut]]"):
            body = {**_body(f"{LONG} {text}", stream=stream, model="demo-large")}
            if stream:
                body["stream_options"] = {"include_usage": True}
            async with harness.client.post("/v1/chat/completions", json=body,
                                           headers={"Authorization": f"Bearer {key}"}) as resp:
                raw = await resp.read()
                if not stream and resp.status == 200:
                    reported[resp.headers["x-request-id"]] = json.loads(raw)["usage"]
        claude = {"model": "demo-claude", "max_tokens": 20, "stream": stream,
                  "messages": [{"role": "user", "content": f"{LONG} [[emu cached=5 cache_write=10 cache_write_1h=15"
                                                           " out=6]]"}]}
        async with harness.client.post("/v1/messages", json=claude,
                                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
        gemini = {"contents": [{"role": "user", "parts": [{"text": f"{LONG} [[emu cached=4 reasoning=3 out=5]]"}]}]}
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        async with harness.client.post(f"/v1beta/models/demo-gemini:{method}", json=gemini,
                                       headers={"x-goog-api-key": key}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
    await harness.gw.quiesce()
    return reported


def _micro(credits: str) -> int:
    """An exported decimal string of credits as micro-credits, exactly (a float would not be)."""
    assert isinstance(credits, str) and "e" not in credits.lower(), credits
    return credits_to_micro(credits)


def _recomputed(harness: Harness, plan: str, event: dict[str, Any]) -> int:
    """An event's charge from its exported quantities and the configured prices alone."""
    route = next(r for r in harness.gw.config.routes if r.pattern == event["route"])
    rates = harness.gw.config.rates(plan, route)
    total = (event["input_tokens"] * rates.input + event["cached_input_tokens"] * rates.cached_input
             + event["cache_write_tokens"] * rates.cache_write
             + event["cache_write_1h_tokens"] * rates.cache_write_long + event["output_tokens"] * rates.output)
    cost = -(-total // 1_000_000) + rates.per_request
    return min(cost, _micro(event["credits_held"])) if event["estimated"] else cost


async def test_exports_carry_every_priced_quantity_and_reproduce_each_charge(harness: Harness, config_dir: Path,
                                                                            redis_url: str) -> None:
    account, key = await harness.account(credits=5)
    await _priced_workload(harness, key)
    jsonl = [json.loads(line) for line in (await _export(config_dir, redis_url, "--format", "jsonl")).splitlines()]
    assert len(jsonl) == 10
    claude = [e for e in jsonl if e["model"] == "demo-claude"]
    assert [(e["cached_input_tokens"], e["cache_write_tokens"], e["cache_write_1h_tokens"]) for e in claude] == [
        (5, 10, 15), (5, 10, 15)]  # the 5-minute and 1-hour writes apart: they have different prices
    assert any(e["reasoning_tokens"] for e in jsonl) and any(e["estimated"] for e in jsonl)
    ledger = {e["rid"]: e for e in harness.ledger(account) if e["type"] == "usage"}
    for event in jsonl:
        assert _recomputed(harness, "free", event) == _micro(event["credits"]) + _micro(event["credits_uncollected"])
        assert _micro(event["credits"]) == int(ledger[event["id"]]["cost"])
    rows = list(csv.DictReader(io.StringIO(await _export(config_dir, redis_url, "--format", "csv"))))
    cloud = [json.loads(line) for line in (await _export(config_dir, redis_url, "--format", "cloudevents"))
             .splitlines()]
    by_id = {e["id"]: e for e in jsonl}
    for row, ce in zip(rows, cloud, strict=True):
        view = by_id[row["id"]]
        assert ce["data"] == {k: v for k, v in by_id[ce["id"]].items() if k not in ("id", "time", "account_id")}
        for field in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                      "output_tokens", "reasoning_tokens"):
            assert int(row[field]) == view[field], field
        assert (row["credits"], int(row["credits_micro"]), row["credits_held"], row["route"]) == (
            view["credits"], view["credits_micro"], view["credits_held"], view["route"])
        assert row["estimated"] in ("true", "false") and row["stream"] in ("true", "false")
    api = (await _get(harness, "/gateway/usage?limit=1000", {"Authorization": f"Bearer {key}"}))[1]["data"]
    assert sorted(api, key=lambda e: e["id"]) == sorted(jsonl, key=lambda e: e["id"])


async def test_a_cycles_events_sum_to_its_summary_field_by_field(harness: Harness) -> None:
    account, key = await harness.account(credits=5)
    reported = await _priced_workload(harness, key)
    me = {"Authorization": f"Bearer {key}"}
    events = (await _get(harness, "/gateway/usage?limit=1000", me))[1]["data"]
    summary = (await _get(harness, "/gateway/usage/summary", me))[1]
    assert (await _get(harness, f"/admin/accounts/{account}/usage/summary", ADMIN))[1]["totals"] == summary["totals"]
    fields = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens", "output_tokens",
              "reasoning_tokens")
    totals = summary["totals"]
    assert totals["requests"] == len(events) == sum(m["requests"] for m in summary["by_model"])
    for field in fields:
        assert totals[field] == sum(e[field] for e in events) == sum(m[field] for m in summary["by_model"]), field
    for field in ("credits", "credits_uncollected"):
        assert _micro(totals[field]) == sum(_micro(e[field]) for e in events), field
    assert _micro(summary["credits_used"]) == _micro(totals["credits"]) == harness.state(account)["charged"]
    # `input_tokens` is the uncached input everywhere: with the cached part, the prompt the provider reported
    by_id = {e["id"]: e for e in events}
    for request_id, usage in reported.items():
        event = by_id[request_id]
        assert event["input_tokens"] + event["cached_input_tokens"] == usage["prompt_tokens"]
        assert event["cached_input_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    # the platform stats count every priced token once: all input kinds and the output
    stats = (await _get(harness, "/admin/stats", ADMIN))[1]
    assert stats["tokens_lifetime"] == sum(totals[f] for f in fields if f != "reasoning_tokens")


def test_fields_an_event_carries_beyond_the_named_ones_are_exported_under_other() -> None:
    entry = {"type": "usage", "ts": "1767225600000", "rid": "req_1", "key_id": "key_1", "cost": "1500", "hold": "2000",
             "uncollected": "0", "data": json.dumps({"model": "m", "route": "m", "upstream": "u", "in": 10,
                                                     "cache_write_1h": 4, "out": 2, "web_search_calls": 1})}
    view = usage_view("acct_1", parse_entry("1767225600000-0", entry))
    assert (view["input_tokens"], view["cache_write_tokens"], view["cache_write_1h_tokens"]) == (10, 0, 4)
    assert view["other"] == {"web_search_calls": 1} and view["credits"] == "0.0015"
    [row] = csv.DictReader(io.StringIO(render([view], "csv")))
    assert json.loads(row["other"]) == {"web_search_calls": 1} and row["cache_write_1h_tokens"] == "4"
