"""Process settings: from the command line and the environment, never from module globals."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gateway.secret import Secret


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs besides the YAML configuration."""

    config_dir: Path = Path("config")
    redis_url: str | None = None  # None: start the embedded redis-server
    data_dir: Path = Path("var")  # embedded Redis data (append-only file) and socket
    admin_key: Secret = field(default_factory=lambda: Secret(""))
    key_prefix: str = "gw:"
    max_body_bytes: int = 10 * 1024 * 1024
    max_choices: int = 1  # largest `n` accepted; the reservation multiplies by it
    hold_lease_seconds: float = 120.0  # a hold whose lease is not renewed for this long is reaped
    hold_tombstone_seconds: float = 3600.0  # an ended hold is remembered this long (idempotent retries)
    drain_seconds: float = 300.0  # after a client leaves a stream, read on this long for the real usage
    client_stall_seconds: float = 60.0  # a client that takes longer to accept one chunk is dropped
    settle_drain_seconds: float = 30.0  # at shutdown, queued settlements are retried this long
    reap_interval_seconds: float = 5.0
    auth_cache_seconds: float = 30.0
    redis_timeout_seconds: float = 0.5  # fail closed well within a second
    config_poll_seconds: float = 2.0  # how often plans.yaml and providers.yaml are checked for changes
    ledger_retention_days: float = 400.0  # ledger events older than this are trimmed (hourly) ...
    ledger_protect_exports: tuple[str, ...] = ()  # ... unless one of these exports has not read them yet
    ledger_sink: str | None = None  # the shipper's sink: `file`, file:///dir, a directory or an http(s) URL; None: off
    ledger_sink_token: Secret = field(default_factory=lambda: Secret(""))  # bearer token for an HTTP sink
    ledger_ship_batch: int = 500  # events per delivery (one fsync or one HTTP request)
    ledger_ship_interval_seconds: float = 1.0  # pause between passes once every ledger is shipped
    ledger_file_rotate: str = "hour"  # a new file sink file every `hour` or `day` ...
    ledger_file_max_bytes: int = 256 * 1024 * 1024  # ... or once one would grow past this
    webhook_poll_seconds: float = 0.5  # how often due webhook deliveries are looked for
    webhook_backoff_seconds: float = 2.0  # the first retry's delay; doubled on each further failure
    clock_offset_ms: int = 0  # test-only: shifts the scripts' Redis clock; 0 in production
    header_timeout_seconds: float = 10.0  # a request head must arrive whole within this (also the idle keep-alive)
    body_timeout_seconds: float = 30.0  # a request body must arrive whole within this after its head
    max_connections_per_client: int = 1024  # open connections per client address and listener (0: no cap)
    admin_port: int | None = None  # a separate listener for /admin, /metrics and the dashboard; None: public port
    admin_host: str = "127.0.0.1"
    admin_reuse_port: bool = False  # several worker processes share the admin port
    admin_keys: tuple[tuple[str, Secret], ...] = ()  # named admin keys, besides admin_key (named "admin")
    admin_keys_file: Path | None = None  # "name:key" lines, re-read when it changes (revocation without restart)
    metrics_key: Secret = field(default_factory=lambda: Secret(""))  # when set, /metrics wants this bearer key
    shutdown_grace_seconds: float = 30.0  # on SIGTERM, requests in flight (streams too) may finish this long
    restart_backoff_seconds: float = 0.5  # a dead worker or embedded Redis is restarted after this, doubled ...
    max_restarts_per_minute: int = 5  # ... on each restart in the last minute; one more and the gateway gives up
    metrics_dir: Path | None = None  # set by the master of several workers: prometheus-client multiprocess files

    @property
    def stop_deadline_seconds(self) -> float:
        """How long a stop may take at most: the grace period, then a stream cut at its end may read on
        for its usage (`drain_seconds`) and queued settlements are retried (`settle_drain_seconds`)."""
        return self.shutdown_grace_seconds + self.drain_seconds + self.settle_drain_seconds + 10

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from GATEWAY_* variables and REDIS_URL; explicit overrides win when not None."""
        env = os.environ
        sink = ledger_sink_spec(env.get("GATEWAY_LEDGER_SINK", ""))
        values: dict[str, object] = {
            "config_dir": Path(env.get("GATEWAY_CONFIG_DIR", "config")),
            "redis_url": env.get("REDIS_URL") or None,
            "data_dir": Path(env.get("GATEWAY_DATA_DIR", "var")),
            "admin_key": Secret(env.get("GATEWAY_ADMIN_KEY", "")),
            "max_body_bytes": env_int("GATEWAY_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1),
            "max_choices": env_int("GATEWAY_MAX_CHOICES", 1, minimum=1),
            "hold_lease_seconds": env_float("GATEWAY_HOLD_LEASE_SECONDS", 120),
            "hold_tombstone_seconds": env_float("GATEWAY_HOLD_TOMBSTONE_SECONDS", 3600),
            "drain_seconds": env_float("GATEWAY_DRAIN_SECONDS", 300),
            "client_stall_seconds": env_float("GATEWAY_CLIENT_STALL_SECONDS", 60),
            "settle_drain_seconds": env_float("GATEWAY_SETTLE_DRAIN_SECONDS", 30),
            "reap_interval_seconds": env_float("GATEWAY_REAP_INTERVAL_SECONDS", 5.0),
            "redis_timeout_seconds": env_float("GATEWAY_REDIS_TIMEOUT_SECONDS", 0.5),
            "config_poll_seconds": env_float("GATEWAY_CONFIG_POLL_SECONDS", 2.0),
            # with a sink, Redis keeps only a window: the shipper has the rest (and trims only what it shipped)
            "ledger_retention_days": env_float("GATEWAY_LEDGER_RETENTION_DAYS", 7 if sink else 400),
            "ledger_protect_exports": tuple(n for n in env.get("GATEWAY_LEDGER_PROTECT_EXPORTS", "").split(",") if n),
            "ledger_sink": sink,
            "ledger_sink_token": Secret(env.get("GATEWAY_LEDGER_SINK_TOKEN", "")),
            "ledger_ship_batch": env_int("GATEWAY_LEDGER_SHIP_BATCH", 500, minimum=1),
            "ledger_ship_interval_seconds": env_float("GATEWAY_LEDGER_SHIP_INTERVAL_SECONDS", 1.0),
            "ledger_file_rotate": env.get("GATEWAY_LEDGER_FILE_ROTATE") or "hour",
            "ledger_file_max_bytes": env_int("GATEWAY_LEDGER_FILE_MAX_BYTES", 256 * 1024 * 1024),
            "header_timeout_seconds": env_float("GATEWAY_HEADER_TIMEOUT_SECONDS", 10),
            "body_timeout_seconds": env_float("GATEWAY_BODY_TIMEOUT_SECONDS", 30),
            "max_connections_per_client": env_int("GATEWAY_MAX_CONNECTIONS_PER_CLIENT", 1024),
            "admin_port": env_int("GATEWAY_ADMIN_PORT", None, minimum=1, maximum=65535),
            "admin_host": env.get("GATEWAY_ADMIN_HOST") or "127.0.0.1",
            "admin_keys": parse_named_keys(env.get("GATEWAY_ADMIN_KEYS", "")),
            "admin_keys_file": Path(env["GATEWAY_ADMIN_KEYS_FILE"]) if env.get("GATEWAY_ADMIN_KEYS_FILE") else None,
            "metrics_key": Secret(env.get("GATEWAY_METRICS_KEY", "")),
            "shutdown_grace_seconds": env_float("GATEWAY_SHUTDOWN_GRACE_SECONDS", 30),
            "restart_backoff_seconds": env_float("GATEWAY_RESTART_BACKOFF_SECONDS", 0.5),
            "max_restarts_per_minute": env_int("GATEWAY_MAX_RESTARTS_PER_MINUTE", 5),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["ledger_file_rotate"] not in ("hour", "day"):
            raise SettingsError("GATEWAY_LEDGER_FILE_ROTATE must be 'hour' or 'day'")
        return cls(**values)  # type: ignore[arg-type]


class SettingsError(ValueError):
    """A setting from the environment that cannot be used (the message never quotes a secret)."""


def env_int(name: str, default: int | None, *, minimum: int = 0, maximum: int | None = None) -> int | None:
    """A whole-number variable (unset or empty: `default`); SettingsError names it and what it wants."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bound = f" at most {maximum}" if maximum is not None else ""
        raise SettingsError(f"{name} must be a whole number of at least {minimum}{bound} "
                            f"(no units), got {text[:40]!r}")
    return value


def env_float(name: str, default: float) -> float:
    """A number-of-seconds (or days) variable, zero or more (unset or empty: `default`)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{name} must be a number, zero or more (no units), got {text[:40]!r}")
    return value


def ledger_sink_spec(text: str) -> str | None:
    """GATEWAY_LEDGER_SINK checked: `file`, file:///a/dir, an absolute or relative directory, or an
    http(s) URL (a URL's credentials belong in GATEWAY_LEDGER_SINK_TOKEN, so the message never quotes it)."""
    text = text.strip()
    if not text:
        return None
    scheme, sep, rest = text.partition("://")
    if sep and scheme not in ("file", "http", "https"):
        raise SettingsError("GATEWAY_LEDGER_SINK must be 'file', file:///a/directory, a directory or an http(s) URL")
    if scheme in ("http", "https") and "@" in rest.partition("/")[0]:
        raise SettingsError("GATEWAY_LEDGER_SINK must not carry credentials: use GATEWAY_LEDGER_SINK_TOKEN")
    if scheme == "file" and sep and not text.startswith("file:///"):
        raise SettingsError("GATEWAY_LEDGER_SINK file URLs name an absolute directory: file:///var/lib/gateway/ledger")
    return text


def parse_named_keys(text: str, separator: str = ",") -> tuple[tuple[str, Secret], ...]:
    """`name:key` pairs separated by `separator` (blank entries and `#` comments skipped); raises
    SettingsError naming the entry's position, never its key."""
    found: list[tuple[str, Secret]] = []
    for number, entry in enumerate(text.split(separator), 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise SettingsError(f"admin key entry {number} is not of the form name:key")
        found.append((name.strip(), Secret(key.strip())))
    return tuple(found)
