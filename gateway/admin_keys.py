"""The admin keys, by name: `GATEWAY_ADMIN_KEY` (named "admin"), `GATEWAY_ADMIN_KEYS` ("ops:KEY,billing:KEY")
and a keys file (`GATEWAY_ADMIN_KEYS_FILE`, one `name:key` a line) that is re-read whenever it changes,
so a key is added or revoked without a restart. Only SHA-256 digests are kept in memory; the name of
the key that was used is what logs and audit lines carry, never the key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from aiohttp import web

from gateway.settings import Settings, parse_named_keys

log = logging.getLogger("gateway.admin")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class AdminKeys:
    """Who may call the admin API; `name_of(key)` is the key's name, or None."""

    def __init__(self, settings: Settings) -> None:
        fixed = [("admin", settings.admin_key)] if settings.admin_key else []
        fixed += list(settings.admin_keys)
        self._fixed = [(name, _digest(key.reveal())) for name, key in fixed if key]
        self._file = settings.admin_keys_file
        self._file_keys: list[tuple[str, bytes]] = []
        self._stamp: tuple[int, ...] | None = None

    @property
    def configured(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def name_of(self, given: str) -> str | None:
        """The name of the admin key `given`, compared in constant time against every key."""
        if not given:
            return None
        digest = _digest(given)
        found = None
        for name, expected in self._fixed + self._current_file_keys():
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found

    def _current_file_keys(self) -> list[tuple[str, bytes]]:
        """The file's keys as of now: a stat per admin request, a read only when the file changed. A file
        that is missing or malformed grants nothing (fail closed) until it is fixed."""
        if self._file is None:
            return []
        try:
            info = os.stat(self._file)
        except OSError:
            if self._stamp != ():
                log.warning("admin keys file %s is missing: none of its keys is accepted", self._file)
            self._stamp, self._file_keys = (), []
            return []
        stamp = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            self._file_keys = self._read(self._file, info.st_mode)
        return self._file_keys

    @staticmethod
    def _read(path: Path, mode: int) -> list[tuple[str, bytes]]:
        if mode & 0o077:
            log.warning("admin keys file %s is readable by other users: chmod 600 it", path)
        try:
            keys = parse_named_keys(path.read_text(encoding="utf-8"), "\n")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("admin keys file %s not used: %s", path, exc if isinstance(exc, ValueError)
                        else type(exc).__name__)
            return []
        log.info("admin keys file %s loaded: %s", path, ", ".join(name for name, _ in keys) or "no keys")
        return [(name, _digest(key.reveal())) for name, key in keys]


ADMIN_KEYS = web.AppKey("admin_keys", AdminKeys)
