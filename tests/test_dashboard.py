"""The dashboard in a real headless Chromium (Debian's `chromium`): the page's JavaScript renders the
figures of the JSON APIs for a key holder and for an operator, and a screenshot of each is saved."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN, ADMIN_KEY, ROOT, Harness

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` "
                                "installs it with apt-get when it runs as root)")
PLANS = """
default_plan: free
plans:
  free:
    monthly_credits: 0.001
    models: ["demo-*"]
  pro:
    monthly_credits: 20
    models: ["demo-*"]
"""
SCREENSHOTS = ROOT / "var" / "screenshots"


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


class Page(HTMLParser):
    """The rendered DOM's figures: `data-value` by id, chart bars, alerts, keys, stats and table rows."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}
        self.bars: dict[str, Any] = {}
        self.marked: dict[str, list[str]] = {"data-alert": [], "data-key": [], "data-account": [], "data-plan": []}
        self.stats: dict[str, Any] = {}
        self.ready = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.ready = a.get("data-ready", "")
        if "id" in a and "data-value" in a:
            self.values[a["id"]] = json.loads(a["data-value"])
        if a.get("class") == "usage-bar":
            self.bars[a["data-model"]] = json.loads(a["data-credits"])
        if "data-stat" in a:
            self.stats[a["data-stat"]] = json.loads(a["data-value"])
        for attr, found in self.marked.items():
            if attr in a:
                found.append(a[attr])


def _chromium(url: str, profile: Path, *extra: str) -> str:
    done = subprocess.run(  # noqa: S603
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
         "--window-size=1100,1500", *extra, url],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


async def _render(harness: Harness, key: str, tmp_path: Path, shot: str) -> Page:
    url = str(harness.client.make_url("/dashboard")) + f"#key={key}"  # a fragment: never sent to the server
    html = await asyncio.to_thread(_chromium, url, tmp_path / f"profile-{shot}", "--dump-dom")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    png = SCREENSHOTS / f"{shot}.png"
    png.unlink(missing_ok=True)
    await asyncio.to_thread(_chromium, url, tmp_path / f"profile-{shot}-shot", f"--screenshot={png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return Page(html)


async def _get(harness: Harness, path: str, headers: dict[str, str]) -> Any:
    async with harness.client.get(path, headers=headers) as resp:
        assert resp.status == 200
        return await resp.json()


async def _chat(harness: Harness, key: str, model: str, out: int) -> None:
    body = {"model": model, "max_tokens": out, "messages": [{"role": "user", "content": f"go [[emu out={out}]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}):
        pass


async def test_key_holder_dashboard_shows_the_api_figures(harness: Harness, tmp_path: Path) -> None:
    account, key = await harness.account(credits="0.002")  # a tiny allowance and a small grant
    await _chat(harness, key, "demo-large", 20)
    for _ in range(6):
        await _chat(harness, key, "demo-mini", 200)
    await harness.gw.quiesce()
    me = {"Authorization": f"Bearer {key}"}
    credits = await _get(harness, "/gateway/credits", me)
    summary = await _get(harness, "/gateway/usage/summary", me)
    alerts = (await _get(harness, "/gateway/alerts", me))["data"]
    keys = (await _get(harness, "/gateway/keys", me))["data"]
    assert alerts and len(summary["by_model"]) == 2 and summary["account_id"] == account  # something to show

    page = await _render(harness, key, tmp_path, "dashboard-key-holder")
    assert page.ready == "holder"
    assert page.values["credits-remaining"] == credits["credits_remaining"]
    assert page.values["credits-limit"] == credits["credits_limit"]
    assert page.values["allowance-remaining"] == credits["allowance_remaining"]
    assert page.values["purchased-remaining"] == credits["purchased_remaining"]
    share = 100 * credits["allowance_remaining_micro"] / credits["credits_limit_micro"]
    assert page.values["allowance-percent"] == pytest.approx(share, abs=0.05) and share < 20
    assert page.values["reset-date"] == credits["reset_date"] and credits["reset_date"]
    assert page.values["used-cycle"] == credits["credits_used_this_cycle"]
    assert page.values["projected"] == summary["projected_credits_at_cycle_end"]
    assert page.bars == {m["model"]: m["credits"] for m in summary["by_model"]}
    assert page.marked["data-alert"] == [a["id"] for a in alerts]
    assert page.marked["data-key"] == [k["id"] for k in keys]
    assert key not in json.dumps(keys)


async def test_operator_dashboard_shows_accounts_plans_and_spend(harness: Harness, tmp_path: Path) -> None:
    accounts = [await harness.account(credits=1, plan=plan) for plan in ("free", "pro", "pro")]
    for _, key in accounts:
        await _chat(harness, key, "demo-mini", 30)
    await harness.gw.quiesce()
    stats = await _get(harness, "/admin/stats", ADMIN)
    page = await _render(harness, ADMIN_KEY, tmp_path, "dashboard-operator")
    assert page.ready == "operator"
    assert page.stats == {k: stats[k] for k in page.stats} and len(page.stats) == 6
    assert stats["requests_this_cycle"] == 3 and stats["credits_used_this_cycle_micro"] > 0
    assert page.marked["data-plan"] == ["free", "pro"]
    assert sorted(page.marked["data-account"]) == sorted(account for account, _ in accounts)


async def test_a_bad_key_shows_an_error_and_nothing_else(harness: Harness, tmp_path: Path) -> None:
    page = Page(await asyncio.to_thread(_chromium, str(harness.client.make_url("/dashboard")) + "#key=gwk_nope",
                                        tmp_path / "profile", "--dump-dom"))
    assert page.ready == "error" and page.values == {} and page.bars == {}


async def test_the_page_is_served_with_strict_headers(harness: Harness) -> None:
    async with harness.client.get("/dashboard") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Referrer-Policy"] == "no-referrer"
    async with harness.client.get("/dashboard/dashboard.js") as resp:
        assert resp.status == 200 and "sessionStorage" in await resp.text()
    async with harness.client.get("/dashboard/secrets.txt") as resp:
        assert resp.status == 404
