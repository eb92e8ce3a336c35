"""The dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol
(aiohttp's websocket client: no extra package): the page's JavaScript renders the figures of the JSON
APIs for a key holder, nothing overflows a 390 px phone screen, and screenshots of each view at desktop
and phone widths are saved under var/screenshots/. The operator's views: test_dashboard_operator.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, Harness

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
    markup: 1.2
    models: ["demo-*"]
    limits:
      requests_per_minute: 600
      max_cost_usd_per_cycle: 100
      spend_windows: {5h: 10}
"""
SCREENSHOTS = ROOT / "var" / "screenshots"
DESKTOP, PHONE = (1280, 800), (390, 844)
DAY = 86_400_000
STATUS = "document.getElementById('status').textContent"  # what the page says it is doing


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


class Page:
    """One browser tab over the DevTools protocol: navigate, evaluate JavaScript, size, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, until_event: str = "", **params: Any) -> dict[str, Any]:
        """Call `method`; with `until_event`, also wait for that event (e.g. a navigation's load)."""
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        result: dict[str, Any] | None = None
        seen = not until_event
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                result = reply["result"]
            elif reply.get("method") == until_event:
                seen = True
            if result is not None and seen:
                return result
        raise AssertionError("the browser went away")

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def size(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=width < 600)
        await self.js("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")

    async def open(self, url: str, ready: str) -> None:
        """Load `url` in a fresh tab state and wait until the page says it rendered (`data-ready`)."""
        await self.send("Page.navigate", "Page.loadEventFired", url="about:blank")
        await self.send("Page.navigate", "Page.loadEventFired", url=url)
        await self.wait(f"document.body && document.body.dataset.ready === {json.dumps(ready)}"
                        " || document.body && document.body.dataset.ready === 'error'")
        assert await self.js("document.body.dataset.ready") == ready, await self.js(STATUS)

    async def wait(self, condition: str) -> None:
        """Wait in the page (one frame at a time) until `condition` holds; the test's timeout bounds it."""
        await self.js(f"""new Promise((done) => {{
            const check = () => {{ try {{ if ({condition}) return done(true); }} catch (e) {{}}
                                  requestAnimationFrame(check); }};
            check(); }})""")

    async def overflow(self) -> tuple[int, int]:
        """(document scroll width, viewport width): the page overflows sideways when the first is larger."""
        found = await self.js("[document.documentElement.scrollWidth, window.innerWidth]")
        return found[0], found[1]

    async def screenshot(self, name: str) -> Path:
        """A full-page PNG under var/screenshots/."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        return path


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one tab, closed afterwards."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        endpoint = ""
        while not endpoint:
            line = (await proc.stderr.readline()).decode()
            assert line, "chromium exited before it listened"
            if line.startswith("DevTools listening on "):
                endpoint = line.split("on ", 1)[1].strip()
        port = endpoint.split(":")[2].split("/")[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                tabs = [t for t in await resp.json() if t["type"] == "page"]
            async with session.ws_connect(tabs[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                yield page
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def url(harness: Harness, key: str, page: str = "") -> str:
    """The dashboard with the key in the fragment (never sent to the server) and an optional page."""
    return str(harness.client.make_url("/dashboard")) + f"#key={key}" + (f"&{page}" if page else "")


async def get(harness: Harness, path: str, headers: dict[str, str]) -> Any:
    async with harness.client.get(path, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def status_of(harness: Harness, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with harness.client.get(path, headers=headers) as resp:
        return resp.status, await resp.json()


async def chat(harness: Harness, key: str, model: str, out: int) -> None:
    body = {"model": model, "max_tokens": out, "messages": [{"role": "user", "content": f"go [[emu out={out}]]"}]}
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()


async def later(harness: Harness, ms: int) -> None:
    """The scripts' clock a while later (a day of usage passing, as other tests move it)."""
    await harness.gw.quiesce()
    harness.shift_clock(ms)


def values(found: Any) -> Any:
    """data-value attributes as the page stored them (JSON), for comparison with the APIs."""
    return {k: json.loads(v) for k, v in found.items()}


async def test_key_holder_dashboard_shows_the_api_figures(harness: Harness, tmp_path: Path) -> None:
    account, key = await harness.account(credits="12.5", plan="pro")
    await chat(harness, key, "demo-large", 400)
    await later(harness, DAY)
    for _ in range(4):
        await chat(harness, key, "demo-mini", 900)
    await later(harness, DAY)
    await chat(harness, key, "demo-large", 700)
    await chat(harness, key, "demo-mini", 300)
    await harness.gw.quiesce()
    me = {"Authorization": f"Bearer {key}"}
    credits = await get(harness, "/gateway/credits", me)
    series = await get(harness, "/gateway/usage/daily?days=30", me)
    keys = (await get(harness, "/gateway/keys", me))["data"]
    alerts = (await get(harness, "/gateway/alerts", me))["data"]
    statement_status, statement = await status_of(harness, "/gateway/statements/current", me)
    assert len({r["date"] for r in series["data"]}) == 3  # something to chart

    async with browser(tmp_path / "profile") as page:
        await page.size(*DESKTOP)
        await page.open(url(harness, key), "holder")
        assert await page.js("location.hash") == ""  # the key left the address bar
        shown = values(await page.js("""Object.fromEntries([...document.querySelectorAll('#holder [id][data-value]')]
                                        .map((n) => [n.id, n.dataset.value]))"""))
        for field, element in [("credits_remaining", "credits-remaining"), ("credits_limit", "credits-limit"),
                               ("allowance_remaining", "allowance-remaining"),
                               ("purchased_remaining", "purchased-remaining"),
                               ("credits_used_this_cycle", "used-cycle"), ("requests_this_cycle", "requests-cycle"),
                               ("plan", "plan"), ("reset_date", "reset-date"), ("cycle_start", "cycle-start")]:
            assert shown[element] == credits[field], field
        assert await page.js("document.getElementById('credits-remaining').textContent") == "12.50" or \
            float(credits["credits_remaining"]) != 12.5  # human numbers: two decimals, no float noise
        # the chart: one bar per day of the window, each day's sum as the series says, to the micro-credit
        days = await page.js("""[...document.querySelectorAll('#daily-chart .chart-day')].map((g) =>
                                [g.dataset.date, Number(g.dataset.creditsMicro), Number(g.dataset.usdMicro)])""")
        assert len(days) == 30 and days[0][0] == series["from"] and days[-1][0] == series["to"]
        expected: dict[str, list[int]] = {}
        for r in series["data"]:
            sums = expected.setdefault(r["date"], [0, 0])
            sums[0] += r["credits_micro"]
            sums[1] += r["usd_micro"]
        assert {d: [c, u] for d, c, u in days if c or u} == expected
        assert sum(c for _, c, _ in days) == harness.state(account)["cycle_used"]
        # by model, over the window: the table's rows and total
        rows = await page.js("""[...document.querySelectorAll('#usage-table tbody tr[data-model]')].map((r) =>
                                [r.dataset.model, Number(r.dataset.creditsMicro), Number(r.dataset.usdMicro)])""")
        by_model: dict[str, list[int]] = {}
        for r in series["data"]:
            sums = by_model.setdefault(r["model"], [0, 0])
            sums[0] += r["credits_micro"]
            sums[1] += r["usd_micro"]
        assert {m: [c, u] for m, c, u in rows} == by_model and rows[0][1] >= rows[-1][1]
        # the USD view redraws the same days in dollars
        await page.js("document.querySelector('#usage-metric button[value=usd]').click()")
        assert await page.js("document.querySelector('#usage-metric button[value=usd]').ariaPressed") == "true"
        # keys: every key, used in the window (budgets once the gateway has them)
        key_rows = values(await page.js("""Object.fromEntries([...document.querySelectorAll('#keys tbody tr')]
                                           .map((r) => [r.dataset.key, r.cells[4].dataset.value]))"""))
        used = {k["key_id"]: k["credits"] for k in series["by_key"]}
        if statement_status == 200:  # keys without a budget: their usage from the statement
            used = {k["key_id"]: k["used"] for k in statement["by_key"]}
        assert key_rows == {k["id"]: k["spent_this_cycle"] if k.get("spent_this_cycle") is not None
                            else used.get(k["id"]) for k in keys}
        assert any(v not in (None, "0") for v in key_rows.values())  # the key that made the requests shows them
        assert await page.js("[...document.querySelectorAll('#alerts [data-alert]')].map((a) => a.dataset.alert)") \
            == [a["id"] for a in alerts]
        # the statement, where the gateway has statements
        assert await page.js("document.getElementById('holder-statement').hidden") == (statement_status == 404)
        if statement_status == 200:
            tiles = values(await page.js("""Object.fromEntries(['opening', 'credited', 'used', 'closing'].map((f) =>
                                            [f, document.getElementById('statement-' + f).dataset.value]))"""))
            assert tiles == {f: statement[f] for f in tiles}
        # a burst on the first days projects nothing: it says when it will
        assert await page.js("document.getElementById('projection').dataset.ready") == "false"
        assert "3 days" in await page.js("document.getElementById('projection').textContent")
        assert key not in await page.js("document.documentElement.outerHTML")
        await page.screenshot("dashboard-key-holder-desktop")

        await page.size(*PHONE)
        await page.js("window.dispatchEvent(new Event('resize'))")
        scroll, width = await page.overflow()
        assert scroll <= width == PHONE[0]
        assert await page.js("document.querySelector('#usage-table thead').getBoundingClientRect().width") <= 1
        await page.screenshot("dashboard-key-holder-phone")


async def test_the_projection_waits_for_enough_of_the_cycle_and_is_bounded(harness: Harness, tmp_path: Path) -> None:
    """The page's projection function, run in the browser: a one-minute burst on a 1,000-credit plan
    projects nothing (today's API says 32,856); ten days in, the pace is extrapolated, and never past
    what the account can still spend (then it says when the credits run out)."""
    async with browser(tmp_path / "profile") as page:
        await page.open(str(harness.client.make_url("/dashboard")), "")
        start = "2026-11-01T00:00:00Z"
        end = "2026-12-01T00:00:00Z"
        minute = 1_793_491_260_000  # 2026-11-01 00:01 UTC

        async def project(used: float, requests: int, available: float, now_ms: int) -> Any:
            return await page.js(f"""import('/dashboard/format.js').then((m) => m.projection(
                {used}, {requests}, {available}, '{start}', '{end}', {now_ms}))""")

        burst = await project(1.095, 60, 998.9, minute)
        assert burst["ready"] is False and "3 days" in burst["reason"]
        ten_days = minute - 60_000 + 10 * DAY
        steady = await project(100, 400, 900, ten_days)
        assert steady["ready"] is True and steady["value"] == pytest.approx(300) and steady["runsOut"] is None
        assert steady["perDay"] == pytest.approx(10)
        bounded = await project(500, 400, 100, ten_days)
        assert bounded["value"] == pytest.approx(600) and bounded["runsOut"].startswith("2026-11-13")
        assert (await project(100, 5, 900, ten_days))["ready"] is False  # too few requests to say
        formatted = await page.js("""import('/dashboard/format.js').then((m) => [m.credits('1234567.5'),
            m.credits(0.000018), m.credits('0.0123'), m.credits(0), m.credits('-1.25'), m.usd('0.0012'),
            m.usd(1234.5), m.day('2026-11-30T23:30:00Z', 'Pacific/Auckland'), m.credits('12.5'),
            m.credits('52.341889'), m.credits('0.00282'), m.usd('100')])""")
        assert formatted == ["1,234,567.50", "0.000018", "0.0123", "0.00", "-1.25", "$0.0012", "$1,234.50",
                             "2026-12-01", "12.50", "52.3419", "0.00282", "$100.00"]


async def test_a_bad_key_shows_an_error_and_nothing_else(harness: Harness, tmp_path: Path) -> None:
    async with browser(tmp_path / "profile") as page:
        await page.open(url(harness, "gwk_nope"), "error")
        assert await page.js("['holder', 'operator', 'account'].every((id) => document.getElementById(id).hidden)")
        assert "Could not load" in await page.js(STATUS)


async def test_the_page_is_served_with_strict_headers(harness: Harness) -> None:
    async with harness.client.get("/dashboard") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Referrer-Policy"] == "no-referrer"
        page = await resp.text()
    assert "<script type=\"module\" src=\"/dashboard/dashboard.js\">" in page and " style=" not in page
    for name in ("dashboard.js", "format.js", "chart.js", "holder.js", "operator.js", "account.js"):
        async with harness.client.get(f"/dashboard/{name}") as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            assert ".innerHTML" not in await resp.text()  # values reach the page as text only
    async with harness.client.get("/dashboard/secrets.txt") as resp:
        assert resp.status == 404
    async with harness.client.get("/dashboard/..%2Fdashboard.py") as resp:
        assert resp.status == 404
