"""Hot reload of plans.yaml and providers.yaml: on SIGHUP and when either file changes on disk.

A valid edit replaces the running configuration between two requests (requests in flight keep the
prices they were reserved with); an invalid one is logged with its file, path and problem, counted
in `gateway_config_reloads_total{result="error"}`, and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.config import ConfigError, load_config
from gateway.state import GATEWAY, Gateway, in_background, stopping

log = logging.getLogger("gateway.config")
FILES = ("providers.yaml", "plans.yaml")


def _fingerprint(folder: Path) -> tuple[tuple[int, int], ...]:
    stamps = []
    for name in FILES:
        try:
            stat = (folder / name).stat()
            stamps.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append((0, 0))
    return tuple(stamps)


async def reload_config(gw: Gateway) -> bool:
    """Load the configuration again; True when the new one is running."""
    try:
        config = await asyncio.to_thread(load_config, gw.settings.config_dir)
    except ConfigError as exc:
        gw.metrics.config_reloads.labels("error").inc()
        log.error("configuration reload rejected, the running configuration stays: %s", exc)
        return False
    gw.config = config
    gw.cycle_cache.clear()
    gw.metrics.config_reloads.labels("ok").inc()
    log.info("configuration reloaded: %d upstream(s), %d model(s), %d plan(s)",
             len(config.upstreams), len(config.routes), len(config.plans))
    return True


async def _watch(gw: Gateway, wake: asyncio.Event) -> None:
    folder = Path(gw.settings.config_dir)
    seen = _fingerprint(folder)
    while not stopping():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), gw.settings.config_poll_seconds)
        signalled = wake.is_set()
        wake.clear()
        current = _fingerprint(folder)
        if signalled or current != seen:
            seen = current
            await reload_config(gw)


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the config files and listen for SIGHUP for the app's lifetime."""
    gw = app[GATEWAY]
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        loop.add_signal_handler(signal.SIGHUP, wake.set)
        handled = True
    async with in_background(_watch(gw, wake)):
        yield
    if handled:
        loop.remove_signal_handler(signal.SIGHUP)
