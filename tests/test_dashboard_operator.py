"""The operator's dashboard in a real headless Chromium: platform figures, plans in plans.yaml's units,
accounts sorted and filtered, the page of one account (figures, statements, keys, events) and its
actions (grant, change plan; adjust, suspend and reactivate where the gateway has them), no sideways
overflow at 390 px, and screenshots at desktop and phone widths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN, ADMIN_KEY, Harness
from test_dashboard import CHROMIUM, DAY, DESKTOP, PHONE, PLANS, Page, browser, chat, get, later, status_of, url

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
ROWS = "[...document.querySelectorAll('#accounts tbody tr[data-account]')].map((r) => r.dataset.account)"


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _account(harness: Harness, name: str, plan: str, credits: str) -> tuple[str, str]:
    status, body = await harness.admin("POST", "/admin/accounts", {"name": name, "plan": plan})
    assert status == 201
    account = body["id"]
    if credits != "0":
        assert (await harness.admin("POST", f"/admin/accounts/{account}/credits", {"credits": credits}))[0] == 200
    status, created = await harness.admin("POST", f"/admin/accounts/{account}/keys", {"label": f"{name} app"})
    assert status == 201
    return account, created["key"]


async def _fill(page: Page, values: dict[str, str]) -> None:
    """Type into the page's inputs (the `input` event the page listens to, as typing fires it)."""
    for element, value in values.items():
        await page.js(f"""(() => {{ const n = document.getElementById({json.dumps(element)});
            n.value = {json.dumps(value)}; n.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")


async def _submit(page: Page, form: str, values: dict[str, str], button: str = "") -> str:
    """Fill and submit one of the account page's action forms; returns what the page reported."""
    await page.js("delete document.body.dataset.action")
    await _fill(page, values)
    submitter = f"document.getElementById({json.dumps(button)})" if button else "undefined"
    await page.js(f"document.getElementById({json.dumps(form)}).requestSubmit({submitter})")
    await page.wait("document.body.dataset.action")
    message: str = await page.js("document.getElementById('action-message').textContent")
    assert await page.js("document.body.dataset.action") == "ok", message
    return message


async def test_operator_overview_sorts_and_filters_accounts_and_shows_plans_in_their_units(
        harness: Harness, tmp_path: Path) -> None:
    made = {name: await _account(harness, name, plan, credits) for name, plan, credits in [
        ("Acme Corp", "pro", "250"), ("beta labs", "free", "3.5"), ("Zeta GmbH", "pro", "0.25"),
        ("delta.io", "free", "1200")]}
    for _, key in made.values():
        await chat(harness, key, "demo-mini", 30)
    await harness.gw.quiesce()
    stats = await get(harness, "/admin/stats", ADMIN)
    plans = (await get(harness, "/admin/plans", ADMIN))["data"]
    accounts = (await get(harness, "/admin/accounts?limit=500", ADMIN))["data"]
    pro = next(p for p in plans if p["name"] == "pro")
    usd_cap = next(lim for lim in pro["limits"] if lim["id"] == "max_cost_usd_per_cycle")
    assert (usd_cap["cap"], usd_cap["cap_micro"], usd_cap["unit"], pro["markup"]) == (
        "100", 100_000_000, "USD", "1.2")  # as plans.yaml says

    async with browser(tmp_path / "profile") as page:
        await page.size(*DESKTOP)
        await page.open(url(harness, ADMIN_KEY), "operator")
        shown = await page.js("""Object.fromEntries([...document.querySelectorAll('[data-stat]')]
                                 .map((n) => [n.dataset.stat, JSON.parse(n.dataset.value)]))""")
        assert shown == {k: stats[k] for k in shown} and len(shown) == 6 and stats["requests_this_cycle"] == 4
        assert await page.js("[...document.querySelectorAll('#plans tbody tr')].map((r) => r.dataset.plan)") \
            == [p["name"] for p in plans]
        chips = await page.js("[...document.querySelectorAll('#plans [data-limit]')].map((c) => c.textContent)")
        assert "$100.00 / cycle" in chips and "10.00 credits / 5h" in chips and "600 requests / minute" in chips
        assert not any("100000000" in c for c in chips)
        assert "\u00d7 1.2" in await page.js("document.querySelector('#plans tr[data-plan=pro]').textContent")

        # names, ascending by default; then by available credits, biggest first, and back
        by_name = sorted(accounts, key=lambda a: (a["name"].lower(), a["id"]))
        assert await page.js(ROWS) == [a["id"] for a in by_name]
        await page.js("document.querySelector('th[data-sort=remaining] button').click()")
        richest = sorted(accounts, key=lambda a: (float(a["credits_remaining"]), a["id"]), reverse=True)
        assert await page.js(ROWS) == [a["id"] for a in richest]
        assert await page.js("document.querySelector('th[data-sort=remaining]').ariaSort") == "descending"
        await page.js("document.querySelector('th[data-sort=remaining] button').click()")
        assert await page.js(ROWS) == [a["id"] for a in reversed(richest)]
        shown_credits = await page.js("""[...document.querySelectorAll('#accounts tbody tr')].map((r) =>
                                         JSON.parse(r.cells[3].dataset.value))""")
        assert shown_credits == [a["credits_remaining"] for a in reversed(richest)]

        # filters: text over name and id, plan, status, balance range
        await _fill(page, {"filter-text": "ZETA"})
        assert await page.js(ROWS) == [made["Zeta GmbH"][0]]
        await _fill(page, {"filter-text": made["beta labs"][0][-6:]})
        assert await page.js(ROWS) == [made["beta labs"][0]]
        await _fill(page, {"filter-text": "", "filter-plan": "pro"})
        assert sorted(await page.js(ROWS)) == sorted(made[n][0] for n in ("Acme Corp", "Zeta GmbH"))
        await _fill(page, {"filter-plan": "", "filter-min": "1", "filter-max": "300"})
        assert sorted(await page.js(ROWS)) == sorted(a["id"] for a in accounts
                                                     if 1 <= float(a["credits_remaining"]) <= 300)
        await _fill(page, {"filter-min": "", "filter-max": "", "filter-status": "suspended"})
        assert await page.js(ROWS) == []
        assert "No account" in await page.js("document.querySelector('#accounts tbody').textContent")
        await _fill(page, {"filter-status": ""})
        await page.js("document.querySelector('th[data-sort=name] button').click()")
        await page.screenshot("dashboard-operator-desktop")

        await page.size(*PHONE)
        scroll, width = await page.overflow()
        assert scroll <= width == PHONE[0]
        await page.screenshot("dashboard-operator-phone")


async def _open_account(page: Page, harness: Harness, account: str) -> None:
    await page.open(url(harness, ADMIN_KEY, f"account={account}"), "account")


async def test_account_page_shows_the_apis_figures_and_its_actions_work(harness: Harness, tmp_path: Path) -> None:
    account, key = await _account(harness, "Acme Corp", "free", "40")
    await _account(harness, "Other", "free", "1")
    await chat(harness, key, "demo-large", 300)
    await later(harness, DAY)
    for _ in range(3):
        await chat(harness, key, "demo-mini", 600)
    await harness.gw.quiesce()
    view = await get(harness, f"/admin/accounts/{account}", ADMIN)
    keys = (await get(harness, f"/admin/accounts/{account}/keys", ADMIN))["data"]
    events = (await get(harness, f"/admin/accounts/{account}/events?limit=25", ADMIN))["data"]
    series = await get(harness, f"/admin/accounts/{account}/usage/daily?days=30", ADMIN)
    current_status, current = await status_of(harness, f"/admin/accounts/{account}/statements/current", ADMIN)

    async with browser(tmp_path / "profile") as page:
        await page.size(*DESKTOP)
        await page.open(url(harness, ADMIN_KEY), "operator")
        await page.js(f"document.querySelector('tr[data-account={json.dumps(account)}] a').click()")
        await page.wait("document.body.dataset.ready === 'account'")  # the drill-down, from the list
        shown = await page.js("""Object.fromEntries([...document.querySelectorAll('#account [id][data-value]')]
                                 .map((n) => [n.id, JSON.parse(n.dataset.value)]))""")
        assert {k: shown[k] for k in ("acct-available", "acct-allowance", "acct-purchased", "acct-used",
                                      "acct-plan", "acct-status", "acct-name")} == {
            "acct-available": view["credits_remaining"], "acct-allowance": view["allowance_remaining"],
            "acct-purchased": view["purchased_remaining"], "acct-used": view["credits_used_this_cycle"],
            "acct-plan": view["plan"], "acct-status": view["status"], "acct-name": view["name"]}
        assert await page.js("[...document.querySelectorAll('#acct-keys tbody tr')].map((r) => r.dataset.key)") \
            == [k["id"] for k in keys]
        assert await page.js("[...document.querySelectorAll('#acct-events tbody tr')].map((r) => r.dataset.event)") \
            == [e["id"] for e in events]
        days = await page.js("""[...document.querySelectorAll('#acct-chart .chart-day')].map((g) =>
                                Number(g.dataset.creditsMicro))""")
        assert sum(days) == sum(r["credits_micro"] for r in series["data"]) == harness.state(account)["cycle_used"]
        assert await page.js("document.getElementById('acct-statement-card').hidden") == (current_status == 404)
        if current_status == 200:
            tiles = await page.js("""Object.fromEntries(['opening', 'credited', 'used', 'closing'].map((f) =>
                [f, JSON.parse(document.getElementById('acct-statement-' + f).dataset.value)]))""")
            assert tiles == {f: current[f] for f in tiles}
        await page.screenshot("dashboard-account-desktop")
        await page.size(*PHONE)
        scroll, width = await page.overflow()
        assert scroll <= width == PHONE[0]
        await page.screenshot("dashboard-account-phone")
        await page.size(*DESKTOP)

        # grant: the balance grows by exactly what was typed, once
        before = harness.state(account)
        said = await _submit(page, "grant-form", {"grant-credits": "12.345", "grant-note": "goodwill"})
        after = harness.state(account)
        assert after["extra"] - before["extra"] == 12_345_000 and "12.345" in said
        grant = harness.ledger(account)[-1]
        assert grant["type"] == "grant" and grant["note"] == "goodwill" and len(grant["idempotency_key"]) == 36
        shown_now = await page.js("JSON.parse(document.getElementById('acct-available').dataset.value)")
        assert shown_now == (await get(harness, f"/admin/accounts/{account}", ADMIN))["credits_remaining"]
        # a refused grant says why and changes nothing
        await page.js("delete document.body.dataset.action")
        await _fill(page, {"grant-credits": "1.0000001"})
        await page.js("document.getElementById('grant-form').requestSubmit()")
        await page.wait("document.body.dataset.action")
        assert await page.js("document.body.dataset.action") == "error"
        assert "6 decimal" in await page.js("document.getElementById('action-message').textContent")
        assert harness.state(account)["extra"] == after["extra"]

        # change plan
        await _submit(page, "plan-form", {"plan-select": "pro"})
        assert (await get(harness, f"/admin/accounts/{account}", ADMIN))["plan"] == "pro"
        assert await page.js("JSON.parse(document.getElementById('acct-plan').dataset.value)") == "pro"


async def test_account_page_adjusts_suspends_and_reactivates(harness: Harness, tmp_path: Path) -> None:
    """Adjustments and the account lifecycle (contracts.md: the bill-ledger branch's API)."""
    account, _key = await _account(harness, "Acme Corp", "free", "40")
    before = (await get(harness, f"/admin/accounts/{account}", ADMIN))["credits_remaining_micro"]
    async with browser(tmp_path / "profile") as page:
        await page.size(*DESKTOP)
        await _open_account(page, harness, account)
        said = await _submit(page, "adjust-form", {"adjust-credits": "-2.5", "adjust-reason": "duplicate charge"})
        view: dict[str, Any] = await get(harness, f"/admin/accounts/{account}", ADMIN)
        assert view["credits_remaining_micro"] == before - 2_500_000 and "-2.5 credits" in said
        adjustment = [e for e in harness.ledger(account) if e["type"] == "adjustment"]
        assert len(adjustment) == 1 and "duplicate charge" in json.dumps(adjustment[0])
        assert await page.js("document.querySelector('#acct-events tbody tr').dataset.type") == "adjustment"

        await _submit(page, "status-form", {"status-reason": "unpaid invoice"}, button="suspend")
        assert (await get(harness, f"/admin/accounts/{account}", ADMIN))["status"] == "suspended"
        assert await page.js("document.getElementById('acct-status').textContent") == "suspended"
        assert await page.js("document.getElementById('suspend').hidden") is True
        await _submit(page, "status-form", {"status-reason": ""}, button="reactivate")
        assert (await get(harness, f"/admin/accounts/{account}", ADMIN))["status"] == "active"
