"""What every `gateway` operator command shares: which Redis it uses (said on stderr), its output
(human sentences and tables, or `--json`), and how errors end it (a message and an exit code, never a
traceback)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.embedded import EmbeddedRedis, discover_url
from gateway.errors import GatewayError
from gateway.keys import KeySchema
from gateway.scripts import REDIS_DOWN, ScriptRunner, load_scripts
from gateway.settings import Settings
from gateway.store import Store

EXIT_ERROR, EXIT_USAGE = 1, 2  # a refused operation; a bad setting, configuration or invocation


class UsageError(GatewayError):
    """The command cannot run as invoked (exit 2): no Redis to use, a bad option value."""


SERVED_CONFIG = "config_dir"  # in the data directory: the config directory the running `gateway serve` uses


def settings(args: argparse.Namespace) -> Settings:
    """The command's settings; with no config directory named, that of the gateway running on the
    data directory (so `make run`'s demo plans are the ones an operator command sees)."""
    current = Settings.from_env(config_dir=getattr(args, "config_dir", None),
                                redis_url=getattr(args, "redis_url", None), data_dir=getattr(args, "data_dir", None))
    served = current.data_dir / SERVED_CONFIG
    if getattr(args, "config_dir", None) is None and not os.environ.get("GATEWAY_CONFIG_DIR") \
            and served.exists() and discover_url(current.data_dir) is not None:
        current = dataclasses.replace(current, config_dir=Path(served.read_text(encoding="utf-8").strip()))
    return current


def config(args: argparse.Namespace) -> Config:
    return load_config(settings(args).config_dir)


def redact_url(url: str) -> str:
    """A Redis URL without its credentials (for messages)."""
    return re.sub(r"//[^@/]*@", "//", url)


def has_data(data_dir: Path) -> bool:
    """Whether an embedded redis-server has kept data here before (its password and append-only files)."""
    return (data_dir / "redis.pass").exists() or any(data_dir.glob("appendonly*"))


def open_redis(current: Settings, create: bool) -> tuple[str, EmbeddedRedis | None, str]:
    """(URL, an embedded server started for this command or None, what it is for the operator).

    REDIS_URL wins; else the embedded server a running `gateway serve` wrote into the data directory;
    else an embedded server started here, but only on a directory that holds data (or with `create`):
    run from the wrong directory, an operator command must not answer from a new, empty store."""
    if current.redis_url:
        return current.redis_url, None, f"Redis at {redact_url(current.redis_url)}"
    folder = current.data_dir.resolve()
    url = discover_url(current.data_dir)
    if url is not None:
        return url, None, f"the embedded Redis of the gateway running on {folder}"
    if not create and not has_data(folder):
        raise UsageError(
            f"no Redis to use: REDIS_URL is not set, no gateway is running on the data directory {folder}, and "
            "that directory holds no data. Run the command where `gateway serve` runs, or give --data-dir "
            "(GATEWAY_DATA_DIR) or --redis-url (REDIS_URL); --create-data-dir starts a new, empty store there.")
    embedded = EmbeddedRedis(current.data_dir)
    embedded.start()
    return embedded.url, embedded, f"the embedded Redis in {folder} (started for this command)"


@contextlib.asynccontextmanager
async def store(args: argparse.Namespace) -> AsyncIterator[Store]:
    """A store on the Redis `open_redis` picks (said on stderr); the legacy global indexes are copied
    into the sharded ones first if no process has done it yet."""
    from gateway.migrate import migrate_once
    from gateway.redis_client import connect_redis

    current = settings(args)
    url, embedded, where = open_redis(current, getattr(args, "create_data_dir", False))
    print(f"using {where}", file=sys.stderr)
    client = connect_redis(url, 5.0)
    try:
        runner = ScriptRunner(client, load_scripts())
        schema = KeySchema(current.key_prefix)
        await migrate_once(client, schema)
        yield Store(client, schema, runner)
    finally:
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def output(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def iso(ms: int | None) -> str:
    """Unix milliseconds as ISO-8601 UTC, to the second ("never" for none)."""
    if not ms:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns (numbers right-aligned) under a header line."""
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)
                               ).rstrip() for row in cells)


def run(coro: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]) -> Callable[[argparse.Namespace], int]:
    """An async command as an argparse handler: a refusal prints `error: ...` (exit 1); no Redis or a
    bad configuration exits 2. (Bad environment values are caught once, in `main`.)"""
    def runner(args: argparse.Namespace) -> int:
        try:
            asyncio.run(coro(args))
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except GatewayError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except REDIS_DOWN as exc:  # unreachable, refused, timed out: one line, never the URL (its password)
            print(f"error: Redis did not answer ({type(exc).__name__}: {redact_url(str(exc))})", file=sys.stderr)
            return EXIT_ERROR
        except ValueError as exc:  # a Redis URL that cannot be one (parse_redis_url)
            if "Redis URL" not in str(exc):
                raise
            print(f"configuration error: REDIS_URL: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return 0

    return runner


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return value
