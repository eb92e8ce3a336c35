"""Loads the Lua scripts in `lua/` once and runs them with EVALSHA.

Each file is one atomic operation named `<operation>-<key count>.lua`. The loader registers every
file at start; a NOSCRIPT reply (Redis restarted or flushed) re-registers the script and retries
once. Any Redis connection failure becomes `StoreUnavailable` (the gateway fails closed).

On Redis Cluster, EVALSHA goes to the node owning the slot of the script's first key (every key of
one call carries the same account tag, so they share it), SCRIPT LOAD goes to every primary, and a
slot that is moving or a primary that is failing over also counts as "Redis away right now".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from gateway.errors import StoreUnavailable
from gateway.redis_client import AutoPipeline

_NAME = re.compile(r"^(?P<op>[a-z_]+)-(?P<keys>\d+)\.lua$")

#: Errors that mean "Redis is not there right now" rather than a bug in a script: a connection that
#: fails or times out, and on a cluster a slot in migration (TRYAGAIN, redirections that did not
#: settle: "TTL exhausted") or a shard without a primary (CLUSTERDOWN).
REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, redis_errors.ClusterError,
              redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.SlotNotCoveredError,
              redis_errors.AskError, redis_errors.MovedError)

#: Work that must be done before a script runs (see `ScriptRunner.guard`): given the script's keys.
Guard = Callable[[Sequence[str]], Awaitable[None]]


def lua_dir() -> Path:
    """The folder holding the scripts: inside the package when installed, else the checkout's."""
    packaged = Path(__file__).parent / "lua"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua file: its operation name, declared key count, source and SHA-1."""

    name: str
    num_keys: int
    source: str
    sha: str


def load_scripts(folder: Path | None = None) -> dict[str, Script]:
    """Read every `*.lua` file of the folder into a name -> Script table. The helpers in `lib/`
    (local functions only) are prepended to every script, so each operation stays one atomic call."""
    folder = folder or lua_dir()
    library = "".join(path.read_text(encoding="utf-8") for path in sorted((folder / "lib").glob("*.lua")))
    scripts: dict[str, Script] = {}
    for path in sorted(folder.glob("*.lua")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"{path}: script names must look like 'operation-<keys>.lua'")
        source = library + path.read_text(encoding="utf-8")
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        scripts[match["op"]] = Script(match["op"], int(match["keys"]), source, sha)
    return scripts


class ScriptRunner:
    """Runs registered scripts against one Redis client."""

    def __init__(self, redis: Any, scripts: dict[str, Script]) -> None:
        self._redis = redis
        self.scripts = scripts
        self._guards: dict[str, list[Guard]] = {}
        # a standalone Redis: EVALSHA goes through the auto-pipelined connection (gateway.redis_client)
        self._auto: AutoPipeline | None = getattr(redis, "auto", None)

    def guard(self, name: str, before: Guard) -> None:
        """Run `before(keys)` ahead of every call of the script `name`, whoever calls it; when it
        raises, the script does not run. (The reaper uses it to index an account before any hold
        is taken for it: a hold nobody indexed could never be reaped.)"""
        if name not in self.scripts:
            raise KeyError(name)
        self._guards.setdefault(name, []).append(before)

    async def register_all(self) -> None:
        """SCRIPT LOAD every script (idempotent)."""
        try:
            for script in self.scripts.values():
                await self._redis.script_load(script.source)
        except REDIS_DOWN as exc:
            raise StoreUnavailable("The credit store is unavailable.") from exc

    async def run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> list[Any]:
        """EVALSHA the named script; re-register and retry once after NOSCRIPT."""
        script = self.scripts[name]
        if len(keys) != script.num_keys:
            raise ValueError(f"{name} takes {script.num_keys} keys, got {len(keys)}")
        try:
            for before in self._guards.get(name, ()):
                await before(keys)
            try:
                result = await self._evalsha(script, keys, args)
            except redis_errors.NoScriptError:
                await self._redis.script_load(script.source)
                result = await self._evalsha(script, keys, args)
        except REDIS_DOWN as exc:
            raise StoreUnavailable("The credit store is unavailable.") from exc
        return list(result)

    def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Awaitable[Any]:
        if self._auto is not None:
            return self._auto.execute("EVALSHA", script.sha, script.num_keys, *keys, *args)
        return self._redis.evalsha(script.sha, script.num_keys, *keys, *args)  # type: ignore[no-any-return]
