"""`gateway serve`, `gateway emulator` and `gateway check-config`: the commands that run or check the
gateway itself (the operator commands on accounts and keys are in gateway.cli)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from gateway import logs
from gateway.app import AccessLogger
from gateway.cli_common import SERVED_CONFIG, output, redact_url
from gateway.config import ConfigError, load_config
from gateway.embedded import EmbeddedRedis
from gateway.master import Master, cleanup_metrics_dir, make_metrics_dir
from gateway.redis_client import parse_redis_url
from gateway.settings import Settings, env_int

DEMO_CONFIG_DIR = Path("config/demo")  # `--with-emulator` without --config-dir / GATEWAY_CONFIG_DIR
DEFAULT_EMULATOR_PORT = 8090


def _say(line: str) -> None:
    """The banner `serve` prints at start: plain lines on stderr, or log records with JSON logs (so that
    every line a JSON-logging gateway writes parses)."""
    if logs.log_format() == "json":
        logging.getLogger("gateway").info(line)
    else:
        print(line, file=sys.stderr)


def _serve_worker(settings: Settings, host: str, port: int, reuse_port: bool,
                  embedded: EmbeddedRedis | None = None) -> None:
    """Run one gateway process until SIGTERM or SIGINT, then drain it. `embedded`: a started server
    this process takes over (restarts it if it dies, stops it once everything is settled)."""
    from gateway.app import EMBEDDED, create_app

    logs.setup()  # GATEWAY_LOG_FORMAT: text or JSON, the master and every worker alike
    app = create_app(settings)
    if embedded is not None:
        app[EMBEDDED] = embedded
    asyncio.run(_serve(app, settings, host, port, reuse_port))


async def _serve(app: web.Application, settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    """Serve `app` until SIGTERM or SIGINT; then the listener closes, requests in flight may finish for
    up to the grace period (aiohttp's shutdown timeout), and the cleanup contexts settle everything.

    The signals only set an event (not aiohttp's run_app, which raises into the main task): a signal
    during startup is acted on once startup is done, where a cancellation raised into it could be
    swallowed by a Redis call and leave the process serving on, deaf to the signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # aiohttp cancels the handlers still running after its shutdown timeout: a metered one is cut at the end
    # of the grace period instead (`drain_on_shutdown`), then reads on and settles, within the stop deadline
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=settings.stop_deadline_seconds)
    await runner.setup()
    try:
        if not stop.is_set():
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            await stop.wait()
    finally:
        await runner.cleanup()
        logs.flush()  # the access lines still buffered: every request's line is out before the process ends


def _emulator_worker(host: str, port: int, latency_ms: float = 0.0, chunk_delay_ms: float = 0.0) -> None:
    from gateway.emulator import EmulatorState, create_emulator_app

    logging.basicConfig(level=logging.WARNING)
    state = EmulatorState(latency_ms=latency_ms, chunk_delay_ms=chunk_delay_ms)
    web.run_app(create_emulator_app(state), host=host, port=port, print=None, access_log=None)


def _listen(args: argparse.Namespace) -> tuple[str, int, int]:
    """--host/--port/--workers, else GATEWAY_HOST/GATEWAY_PORT/GATEWAY_WORKERS, else the defaults."""
    host = args.host or os.environ.get("GATEWAY_HOST") or "127.0.0.1"
    port = args.port or env_int("GATEWAY_PORT", 8080, minimum=1, maximum=65535)
    workers = args.workers or env_int("GATEWAY_WORKERS", 1, minimum=1)
    return host, int(port or 8080), int(workers or 1)


def _demo_environment(args: argparse.Namespace, host: str) -> int:
    """With the emulator: the demo config directory (unless one is named) and EMULATOR_URL from the
    emulator's port, which the demo upstreams' base URLs are made of. Returns the port."""
    port = args.emulator_port or env_int("EMULATOR_PORT", DEFAULT_EMULATOR_PORT, minimum=1, maximum=65535)
    if args.config_dir is None and not os.environ.get("GATEWAY_CONFIG_DIR"):
        args.config_dir = DEMO_CONFIG_DIR
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a comparison)
    os.environ["EMULATOR_URL"] = f"http://{reachable}:{port}"
    return int(port or DEFAULT_EMULATOR_PORT)


def _startup_problem(settings: Settings, host: str, port: int, workers: int, emulator_port: int) -> str | None:
    """What would otherwise fail later with a traceback (or half-start): a log format, a Redis URL
    that cannot be one, and addresses another process already listens on (the emulator's too: the
    demo must not start and send its upstream calls to whatever holds that port)."""
    if os.environ.get(logs.LOG_FORMAT_ENV, "text").strip().lower() not in ("text", "json", ""):
        return f"{logs.LOG_FORMAT_ENV} must be text or json, got {os.environ[logs.LOG_FORMAT_ENV]!r}"
    if settings.redis_url is not None:
        try:
            parse_redis_url(settings.redis_url)
        except ValueError as exc:
            return f"REDIS_URL: {exc}"
    wanted = [(host, port, "--port")]
    if settings.admin_port is not None and workers <= 1:  # several workers: the master reports their deaths
        wanted.append((settings.admin_host, settings.admin_port, "--admin-port"))
    if emulator_port:
        wanted.append((host, emulator_port, "--emulator-port"))
    for where, number, option in wanted:
        if number:
            try:
                with socket.create_server((where, number)):
                    pass
            except OSError as exc:
                return f"cannot listen on {where}:{number} ({option}): {exc.strerror or exc}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    host, port, workers = _listen(args)
    emulator_port = _demo_environment(args, host) if args.with_emulator else 0
    if args.log_format:  # read by gateway.logs in every worker (spawned: they inherit the environment)
        os.environ["GATEWAY_LOG_FORMAT"] = args.log_format
    listener = {"admin_port": args.admin_port, "admin_host": args.admin_host, "admin_reuse_port": workers > 1}
    try:
        settings = Settings.from_env(config_dir=args.config_dir, redis_url=args.redis_url, data_dir=args.data_dir,
                                     **listener)
        load_config(settings.config_dir)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    problem = _startup_problem(settings, host, port, workers, emulator_port)
    if problem is not None:
        print(f"gateway: {problem}", file=sys.stderr)
        return 2
    logs.setup()  # GATEWAY_LOG_FORMAT: text or JSON, the master and every worker alike
    # until the serving loop (or the master) takes the signals over, SIGTERM unwinds like Ctrl-C: the
    # embedded redis-server (in a session of its own) is stopped on the way out, never orphaned
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    embedded = emulator = metrics_dir = None
    try:
        if settings.redis_url is None:  # the first run on a data directory makes a new store there
            embedded = EmbeddedRedis(settings.data_dir)
            embedded.start()
            settings = dataclasses.replace(settings, redis_url=embedded.url)
            _say(f"using the embedded Redis in {settings.data_dir.resolve()} (at {embedded.location})")
            served_config = settings.data_dir / SERVED_CONFIG  # operator commands load the same config
            served_config.write_text(f"{settings.config_dir.resolve()}\n", encoding="utf-8")
        else:
            _say(f"using Redis at {redact_url(settings.redis_url)}")
        _say(f"configuration from {settings.config_dir.resolve()}")
        ctx = multiprocessing.get_context("spawn")
        if args.with_emulator:
            emulator = ctx.Process(target=_emulator_worker, daemon=True,
                                   args=(host, emulator_port, args.latency_ms, args.chunk_delay_ms))
            emulator.start()
            _say(f"provider emulator on {os.environ['EMULATOR_URL']}/v1")
        _say(f"gateway listening on http://{host}:{port} ({workers} worker(s))")
        if settings.admin_port is not None:
            _say(f"admin API, metrics and dashboard on http://{settings.admin_host}:{settings.admin_port} only")
        if workers <= 1:  # this process serves, and owns (supervises, stops) the embedded server
            _serve_worker(settings, host, port, False, embedded)
            return 0
        metrics_dir = make_metrics_dir()
        settings = dataclasses.replace(settings, metrics_dir=metrics_dir)
        worker_args = (settings, host, port, True)
        return Master(settings, workers, lambda: ctx.Process(target=_serve_worker, args=worker_args),
                      embedded).run()
    except KeyboardInterrupt:  # a signal before anything was serving
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already on the way out
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if emulator is not None and emulator.is_alive():
            emulator.terminate()
            emulator.join(10)
        if embedded is not None:
            embedded.stop()
            (settings.data_dir / SERVED_CONFIG).unlink(missing_ok=True)
        cleanup_metrics_dir(metrics_dir)


def cmd_emulator(args: argparse.Namespace) -> int:
    port = args.port or env_int("EMULATOR_PORT", DEFAULT_EMULATOR_PORT, minimum=1, maximum=65535)
    print(f"provider emulator on http://{args.host}:{port}/v1", file=sys.stderr)
    _emulator_worker(args.host, int(port or DEFAULT_EMULATOR_PORT), args.latency_ms, args.chunk_delay_ms)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem of both files at once; with --json, as a JSON document on stdout too."""
    folder = Settings.from_env(config_dir=args.config_dir).config_dir
    try:
        config = load_config(folder)
    except ConfigError as exc:
        errors = [{"file": file, "path": path, "problem": problem} for file, path, problem in exc.problems]
        if args.json:
            print(json.dumps({"ok": False, "config_dir": str(folder), "errors": errors}, indent=2))
        print(f"configuration error: {len(errors)} problem(s)\n{exc}", file=sys.stderr)
        return 2
    summary = {"ok": True, "config_dir": str(folder), "upstreams": sorted(config.upstreams),
               "models": [r.pattern for r in config.routes], "plans": sorted(config.plans),
               "default_plan": config.default_plan}
    output(args, summary, f"ok: {len(config.upstreams)} upstream(s), {len(config.routes)} model route(s), "
                          f"{len(config.plans)} plan(s) in {folder}")
    return 0
