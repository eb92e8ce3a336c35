"""Billing hand-off (issue 15, items 1-3): exact amounts, statements, adjustments, the account
lifecycle, external ids and the Stripe / Lago / OpenMeter export mappings."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ADMIN, ROOT, Harness

DAY = 86_400_000
FIXTURES = Path(__file__).parent / "fixtures"
PLANS = """
default_plan: free
packs:
  small: {credits: 5, price_usd: 4.99}
plans:
  free: {monthly_credits: 1, models: ["demo-*"]}
  pro: {monthly_credits: 20, models: ["demo-*"]}
  team: {monthly_credits: 50, models: ["demo-*"]}
"""
MONEY = ("opening", "allowance", "grants", "packs", "adjustments", "expired", "credited", "used", "closing")


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _chat(harness: Harness, key: str, model: str = "demo-mini") -> tuple[int, Any]:
    body = {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi [[emu out=10]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def _admin(harness: Harness, method: str, path: str, body: dict[str, Any] | None = None,
                 idempotency_key: str | None = None) -> tuple[int, Any]:
    headers = {**ADMIN, **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    async with harness.client.request(method, path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def _no_floats(text: str) -> Any:
    """Parse JSON, failing on any float (money must be a decimal string or an integer)."""
    def refuse(number: str) -> None:
        raise AssertionError(f"a float in an export or answer: {number}")
    return json.loads(text, parse_float=refuse)


def _check_identity(s: dict[str, Any]) -> None:
    for name in MONEY:  # each amount twice, the same value
        assert isinstance(s[name], str) and "e" not in s[name].lower(), (name, s[name])
        assert Decimal(s[name]) * 1_000_000 == s[f"{name}_micro"], name
    credited = sum(s[f"{n}_micro"] for n in ("allowance", "grants", "packs", "adjustments")) - s["expired_micro"]
    assert s["credited_micro"] == credited, s
    assert s["opening_micro"] + s["credited_micro"] - s["used_micro"] == s["closing_micro"], s
    assert Decimal(s["opening"]) + Decimal(s["credited"]) - Decimal(s["used"]) == Decimal(s["closing"]), s


async def test_statements_balance_exactly_through_grants_packs_adjustments_plan_changes_and_rollovers(
        harness: Harness) -> None:
    account, key = await harness.account(plan="pro")
    # cycle 1: usage, a grant, a pack, a refund and a deduction, an upgrade at once
    assert (await _chat(harness, key))[0] == 200
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/credits", {"credits": "3"}))[0] == 200
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/packs", {"pack": "small"}, "p1"))[0] == 200
    for credits, idem in (("2", "a1"), ("-1.25", "a2")):
        status, _ = await _admin(harness, "POST", f"/admin/accounts/{account}/adjustments",
                                 {"credits": credits, "reason": "test"}, idem)
        assert status == 200
    assert (await _admin(harness, "PUT", f"/admin/accounts/{account}/plan", {"plan": "team"}))[0] == 200
    assert (await _chat(harness, key))[0] == 200
    # cycle 2 (started by the first request after the boundary): a deduction, a downgrade at once, a grant
    harness.shift_clock(32 * DAY)
    assert (await _chat(harness, key))[0] == 200
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/adjustments",
                         {"credits": -0.5, "reason": "test"}, "a3"))[0] == 200
    assert (await _admin(harness, "PUT", f"/admin/accounts/{account}/plan",
                         {"plan": "free", "effective": "now"}))[0] == 200
    assert (await _chat(harness, key))[0] == 200
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/credits", {"credits": 1}))[0] == 200
    # cycle 3, open
    harness.shift_clock(32 * DAY)
    assert (await _chat(harness, key))[0] == 200
    await harness.gw.quiesce()

    status, listing = await _admin(harness, "GET", f"/admin/accounts/{account}/statements")
    assert status == 200
    current, second, first = listing["data"]
    assert [s["status"] for s in listing["data"]] == ["open", "closed", "closed"]
    for s in listing["data"]:
        _check_identity(s)
    assert first["opening_micro"] == 0 and second["opening_micro"] == first["closing_micro"]
    assert current["opening_micro"] == second["closing_micro"]
    # what the test did, cycle by cycle
    assert (first["grants_micro"], first["packs_micro"], first["adjustments_micro"]) == (3_000_000, 5_000_000, 750_000)
    assert first["allowance_micro"] == 50_000_000  # pro's 20, then team's 30 more on the upgrade
    assert (second["grants_micro"], second["adjustments_micro"], second["allowance_micro"]) == (
        1_000_000, -500_000, 50_000_000)
    assert second["expired_micro"] > 0  # the downgrade removed most of team's allowance
    assert (first["plan"], second["plan"], current["plan"]) == ("team", "free", "free")
    # the open cycle closes on the live balance, and every charge is in exactly one cycle
    state = harness.state(account)
    assert current["closing_micro"] == state["allow"] + state["extra"]
    assert sum(s["used_micro"] for s in listing["data"]) == state["charged"] > 0
    assert sum(s["credited_micro"] for s in listing["data"]) == state["granted"] - state["expired"]
    # each cycle's usage by model and by key sums to its `used`; the key holder sees the same
    me = {"Authorization": f"Bearer {key}"}
    for s in listing["data"]:
        status, detail = await _admin(harness, "GET", f"/admin/accounts/{account}/statements/{s['cycle']}")
        assert status == 200 and detail["cycle"] == s["cycle"] and not detail["truncated"]
        assert sum(m["used_micro"] for m in detail["by_model"]) == s["used_micro"]
        assert [(k["name"], k["used_micro"]) for k in detail["by_key"]] == [("test", s["used_micro"])]
        async with harness.client.get(f"/gateway/statements/{s['cycle']}", headers=me) as resp:
            assert resp.status == 200 and _no_floats(await resp.text()) == detail
    async with harness.client.get("/gateway/statements", headers=me) as resp:
        assert (await resp.json())["data"] == listing["data"]
    status, now = await _admin(harness, "GET", f"/admin/accounts/{account}/statements/current")
    assert status == 200 and now["status"] == "open" and now["cycle"] == current["cycle"]
    assert (await _admin(harness, "GET", f"/admin/accounts/{account}/statements/1999-01"))[0] == 404
    assert (await _admin(harness, "GET", f"/admin/accounts/{account}/statements/october"))[0] == 400


async def test_an_adjustment_applies_once_under_retries_and_concurrency(harness: Harness) -> None:
    account, _ = await harness.account(credits=10)  # free: 1 + 10 purchased
    path = f"/admin/accounts/{account}/adjustments"
    body = {"credits": "-2.5", "reason": "reversed refund"}
    answers = await asyncio.gather(*[_admin(harness, "POST", path, body, "adj-1") for _ in range(10)])
    assert {status for status, _ in answers} == {200}
    assert sorted(a["replayed"] for _, a in answers) == [False] + [True] * 9
    assert len({a["adjustment_id"] for _, a in answers}) == 1
    assert {(a["credits"], a["credits_micro"], a["credits_remaining"]) for _, a in answers} == {
        ("-2.5", -2_500_000, "8.5")}
    events = [e for e in harness.ledger(account) if e["type"] == "adjustment"]
    assert [(e["amount"], e["reason"]) for e in events] == [("-2500000", "reversed refund")]
    # the same key with another body, no key, zero, too precise, more than the balance: refused, no change
    assert (await _admin(harness, "POST", path, {**body, "credits": "-3"}, "adj-1"))[0] == 422
    assert (await _admin(harness, "POST", path, body))[0] == 400
    assert (await _admin(harness, "POST", path, {"credits": 0, "reason": "x"}, "adj-2"))[0] == 400
    assert (await _admin(harness, "POST", path, {"credits": "0.0000001", "reason": "x"}, "adj-3"))[0] == 400
    assert (await _admin(harness, "POST", path, {"credits": "1"}, "adj-4"))[0] == 400  # a reason is required
    status, refused = await _admin(harness, "POST", path, {"credits": "-100", "reason": "x"}, "adj-5")
    assert status == 409 and "8.5 are available" in refused["error"]["message"]
    assert harness.state(account)["allow"] + harness.state(account)["extra"] == 8_500_000
    # a refund goes to purchased credits
    status, refund = await _admin(harness, "POST", path, {"credits": 1, "reason": "goodwill"}, "adj-6")
    assert status == 200 and refund["credits_remaining"] == "9.5" and not refund["replayed"]
    status, view = await _admin(harness, "GET", f"/admin/accounts/{account}")
    assert view["purchased_remaining"] == "8.5" and view["credits_remaining_micro"] == 9_500_000
    await harness.assert_conserved(account)


async def test_suspended_and_closed_accounts_are_refused_in_each_dialect_and_closed_is_final(
        harness: Harness) -> None:
    account, key = await harness.account(credits=5)
    status, view = await _admin(harness, "POST", f"/admin/accounts/{account}/suspend", {"reason": "unpaid invoice"})
    assert status == 200 and (view["status"], view["status_reason"]) == ("suspended", "unpaid invoice")

    async def refused(word: str) -> None:
        status, body = await _chat(harness, key)
        assert status == 403 and word in body["error"]["message"], body
        assert body["error"]["code"] == f"account_{word}"  # not a model error: what an SDK user can act on
        anthropic = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        claude = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):  # token counting cannot get through either
            async with harness.client.post(path, json=claude, headers=anthropic) as resp:
                body = await resp.json()
                assert resp.status == 403 and body["type"] == "error" and word in body["error"]["message"], body
        async with harness.client.post("/v1beta/models/demo-gemini:generateContent", headers={"x-goog-api-key": key},
                                       json={"contents": [{"parts": [{"text": "hi"}]}]}) as resp:
            body = await resp.json()
            assert resp.status == 403 and body["error"]["code"] == 403 and word in body["error"]["message"], body
        assert harness.holds(account) == {} and harness.state(account)["charged"] == 0

    await refused("suspended")
    me = {"Authorization": f"Bearer {key}"}
    for path in ("/gateway/credits", "/gateway/statements/current", "/gateway/keys"):  # reading stays open
        async with harness.client.get(path, headers=me) as resp:
            assert resp.status == 200, (path, await resp.text())
    async with harness.client.get("/gateway/credits", headers=me) as resp:
        assert (await resp.json())["status"] == "suspended"
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/reactivate"))[0] == 200
    assert (await _chat(harness, key))[0] == 200
    charged = harness.state(account)["charged"]
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/close", {"reason": "churned"}))[0] == 200
    status, body = await _chat(harness, key)
    assert status == 403 and "closed" in body["error"]["message"] and body["error"]["code"] == "account_closed"
    async with harness.client.get("/gateway/credits", headers=me) as resp:
        assert resp.status == 403  # a closed account's keys read nothing either
    for action in ("reactivate", "suspend"):
        assert (await _admin(harness, "POST", f"/admin/accounts/{account}/{action}"))[0] == 409
    assert (await _admin(harness, "POST", f"/admin/accounts/{account}/close"))[0] == 200  # idempotent
    assert [e["type"] for e in harness.ledger(account) if e["type"].startswith("account_")] == [
        "account_created", "account_suspended", "account_reactivated", "account_closed"]
    assert harness.state(account)["charged"] == charged
    await harness.assert_conserved(account)


async def _cli(config_dir: Path, redis_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config-dir", str(config_dir), "--redis-url", redis_url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_exports_carry_exact_amounts_and_the_external_id_in_each_providers_published_shape(
        harness: Harness, config_dir: Path, redis_url: str) -> None:
    status, created = await _admin(harness, "POST", "/admin/accounts", {"name": "Acme", "external_id": "cus_Acme1"})
    assert status == 201 and created["external_id"] == "cus_Acme1"
    account = created["id"]
    status, new_key = await _admin(harness, "POST", f"/admin/accounts/{account}/keys", {"label": "ci"})
    assert status == 201
    await _admin(harness, "POST", f"/admin/accounts/{account}/credits", {"credits": 5})
    for _ in range(2):
        assert (await _chat(harness, new_key["key"]))[0] == 200
    await harness.gw.quiesce()
    export = ("usage", "export", "--account", account, "--format")
    rc, out, err = await _cli(config_dir, redis_url, *export, "jsonl")
    assert rc == 0, err
    views = [_no_floats(line) for line in out.splitlines()]
    assert len(views) == 2 and {v["external_id"] for v in views} == {"cus_Acme1"}
    by_id = {v["id"]: v for v in views}
    for v in views:
        assert Decimal(v["credits"]) * 1_000_000 == v["credits_micro"] > 0
        assert Decimal(v["usd"]) * 1_000_000 == v["usd_micro"]
    # each provider mapping against the schema written from its published API reference (see fixtures)
    for fmt, schema_file in (("stripe", "stripe_meter_event"), ("lago", "lago_event"),
                             ("openmeter", "openmeter_cloudevent")):
        schema = json.loads((FIXTURES / f"{schema_file}.schema.json").read_text())
        rc, out, err = await _cli(config_dir, redis_url, *export, fmt)
        assert rc == 0, err
        events = [_no_floats(line) for line in out.splitlines()]
        assert len(events) == 2
        for event in events:
            jsonschema.validate(event, schema, format_checker=jsonschema.FormatChecker())
            if fmt == "stripe":
                view = by_id[event["identifier"]]
                assert event["payload"] == {"stripe_customer_id": "cus_Acme1", "value": str(view["credits_micro"])}
            elif fmt == "lago":
                view = by_id[event["transaction_id"]]
                assert (event["external_customer_id"], event["properties"]["credits_micro"]) == (
                    "cus_Acme1", view["credits_micro"])
            else:
                view = by_id[event["id"]]
                assert (event["subject"], event["data"]["credits_micro"]) == ("cus_Acme1", view["credits_micro"])
    # a mapping that breaks the schema is caught: the check is not vacuous
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"event_name": "x", "identifier": "y", "timestamp": 1,
                             "payload": {"stripe_customer_id": "c", "value": 1.5}},
                            json.loads((FIXTURES / "stripe_meter_event.schema.json").read_text()))
    # CSV: the same exact strings, booleans as true/false
    rc, out, err = await _cli(config_dir, redis_url, *export, "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and {(r["id"], r["credits"], r["external_id"]) for r in rows} == {
        (v["id"], v["credits"], "cus_Acme1") for v in views}
    assert {r["stream"] for r in rows} <= {"true", "false"} and {r["cap_lowered"] for r in rows} <= {"true", "false"}
    # --from / --until: dates or times; a bad value names its option
    rc, out, _ = await _cli(config_dir, redis_url, *export, "jsonl", "--from", "2000-01-01", "--until", "2000-02-01")
    assert rc == 0 and out == ""
    rc, out, _ = await _cli(config_dir, redis_url, *export, "jsonl", "--from", "2000-01-01T00:00:00Z")
    assert rc == 0 and len(out.splitlines()) == 2
    for option in ("--from", "--until"):
        rc, _, err = await _cli(config_dir, redis_url, *export, "jsonl", option, "last tuesday")
        assert rc == 1 and f"invalid {option} 'last tuesday'" in err
    # the external id changes with PATCH and shows in the account view
    status, view = await _admin(harness, "PATCH", f"/admin/accounts/{account}", {"external_id": "cus_Acme2"})
    assert status == 200 and view["external_id"] == "cus_Acme2"
    assert (await _admin(harness, "PATCH", f"/admin/accounts/{account}", {"external_id": "x" * 129}))[0] == 400


async def test_the_cli_prints_statements_and_adjusts_suspends_and_updates_accounts(
        harness: Harness, config_dir: Path, redis_url: str) -> None:
    account, key = await harness.account(credits=2)
    assert (await _chat(harness, key))[0] == 200
    await harness.gw.quiesce()
    rc, out, err = await _cli(config_dir, redis_url, "accounts", "adjust", "--account", account, "--credits", "-0.5",
                              "--reason", "correction", "--idempotency-key", "cli-1", "--json")
    assert rc == 0, err
    first = _no_floats(out)
    rc, out, _ = await _cli(config_dir, redis_url, "accounts", "adjust", "--account", account, "--credits", "-0.5",
                            "--reason", "correction", "--idempotency-key", "cli-1", "--json")
    again = _no_floats(out)
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert first["adjustment_id"] == again["adjustment_id"] and first["credits_remaining"] == again["credits_remaining"]
    rc, out, err = await _cli(config_dir, redis_url, "statement", "--account", account, "--json")
    assert rc == 0, err
    printed = _no_floats(out)
    _status, api = await _admin(harness, "GET", f"/admin/accounts/{account}/statements/current")
    assert printed == api and printed["adjustments"] == "-0.5" and printed["by_model"]
    _check_identity(printed)
    rc, out, _ = await _cli(config_dir, redis_url, "statement", "--account", account, "--cycle", printed["cycle"])
    assert rc == 0 and "closing balance" in out and printed["closing"] in out and "demo-mini" in out
    rc, out, _ = await _cli(config_dir, redis_url, "accounts", "update", "--account", account, "--external-id",
                            "cus_9", "--json")
    assert rc == 0 and json.loads(out)["external_id"] == "cus_9"
    rc, out, _ = await _cli(config_dir, redis_url, "accounts", "suspend", "--account", account, "--reason", "fraud",
                            "--json")
    assert rc == 0 and json.loads(out)["status"] == "suspended"
    assert (await _chat(harness, key))[0] == 403
    rc, _, _ = await _cli(config_dir, redis_url, "accounts", "close", "--account", account)
    rc, _, err = await _cli(config_dir, redis_url, "accounts", "reactivate", "--account", account)
    assert rc == 1 and "closed" in err


async def test_credits_answers_exact_decimal_strings(harness: Harness) -> None:
    """`/gateway/credits` once showed `1.8e-05`: every amount is now a decimal string with a `_micro` twin."""
    _account, key = await harness.account(credits="0.000018")
    async with harness.client.get("/gateway/credits", headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
    view = json.loads(text)
    assert "e-" not in text.lower() and not any(isinstance(v, float) for k, v in view.items() if "credits" in k)
    assert (view["purchased_remaining"], view["purchased_remaining_micro"]) == ("0.000018", 18)
    assert (view["credits_remaining"], view["credits_remaining_micro"]) == ("1.000018", 1_000_018)
