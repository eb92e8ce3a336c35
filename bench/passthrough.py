"""A bare aiohttp pass-through proxy: the baseline the gateway's overhead is measured against.

It forwards POST bodies to UPSTREAM_ROOT + the request's path and streams answers back chunk by
chunk, with no auth and no metering. With `--uvloop` it runs on uvloop (as the gateway then does).
Usage: python bench/passthrough.py PORT UPSTREAM_ROOT [--uvloop]
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream = request.app[UPSTREAM] + request.path
    async with request.app[SESSION].post(upstream, data=body, headers={"Content-Type": "application/json",
                                                                        "Authorization": "Bearer bench"}) as up:
        if up.content_type != "text/event-stream":
            return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)
        response = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


async def nothing(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    app = web.Application()
    app[UPSTREAM] = sys.argv[2].rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/nothing", nothing)
    app.router.add_post("/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
