"""The billing dashboard at `/dashboard`: one static page, a stylesheet and a small script, no build step.

The page asks for a key (or takes it from the URL fragment, which browsers never send to a server, and
then clears it), keeps it in the tab's sessionStorage only, and renders what the JSON APIs return: a key
holder (a `gwk_` key) sees credits, the reset date, usage by model, alerts and the account's keys; an
operator (the admin key) sees platform stats, plans and accounts. Strict headers: no inline script, no
caching, no referrer.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
_FILES = {"dashboard.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}
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
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/{name}", asset)
