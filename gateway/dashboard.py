"""The billing dashboard at `/dashboard`: one static page, a stylesheet and a few ES modules, no build step.

The page asks for a key (or takes it from the URL fragment, which browsers never send to a server, and
then clears it), keeps it in the tab's sessionStorage only, and renders what the JSON APIs return: a key
holder (a `gwk_` key) sees the balance, the current statement, usage per day and model, a projection,
keys with their budgets and alerts; an operator (the admin key) sees platform stats, plans, a sortable
and filterable account list and a page per account (`#account=ID`) with its statements, keys, recent
events and actions. Every value reaches the page through `textContent`, never as markup. Strict
headers: no inline script or style, no third-party origin, no caching, no referrer.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway import usage_series

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
#: The files the page is made of (no directory walk: a name outside this set is a 404).
_FILES = {name: _TYPES[Path(name).suffix] for name in (
    "dashboard.html", "dashboard.css", "dashboard.js", "format.js", "chart.js", "holder.js", "operator.js",
    "account.js")}
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
}


def _serve(name: str) -> web.Response:
    return web.Response(body=(STATIC / name).read_bytes(), content_type=_FILES[name], charset="utf-8",
                        headers=_HEADERS)


async def page(request: web.Request) -> web.Response:
    return _serve("dashboard.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES or name == "dashboard.html":
        raise web.HTTPNotFound()
    return _serve(name)


def add_routes(app: web.Application) -> None:
    usage_series.add_routes(app)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/{name}", asset)
