"""The Redis key schema: the one place that builds key names.

Every key a Lua script touches for an account carries the account's hash tag `{acct_…}`, so that
all of an account's keys live in one Redis Cluster slot and the same scripts run on a cluster.
Keys that map a key hash to its account are looked up directly, never inside a script.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """Names of the keys that belong to one account."""

    prefix: str
    account_id: str

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}{{{self.account_id}}}:{suffix}"

    @property
    def account(self) -> str:
        """Hash: plan, balances (allow, extra), held, charged, granted, cycle fields."""
        return self._k("acct")

    @property
    def holds(self) -> str:
        """Hash: request id -> held micro-credits."""
        return self._k("holds")

    @property
    def hold_expiry(self) -> str:
        """Sorted set: request id scored by lease expiry (ms, Redis clock)."""
        return self._k("hexp")

    @property
    def limits(self) -> str:
        """Hash: held sums, cycle counters and window buckets of every limit (see reserve-5.lua)."""
        return self._k("lim")

    @property
    def alerts(self) -> str:
        """Hash: `<cycle start>:<kind>[:<threshold>]` -> the alert (JSON); one per cycle each."""
        return self._k("alerts")

    @property
    def ledger(self) -> str:
        """Stream: one usage event per settled request, plus admin events."""
        return self._k("ledger")

    @property
    def key_ids(self) -> str:
        """Set: the ids of the account's API keys."""
        return self._k("keys")

    @property
    def usable_keys(self) -> str:
        """Sorted set: the ids of the keys that can still authenticate, scored by expiry (ms; +inf never).
        Counted against the plan's `max_keys`; an expired entry is dropped when next counted."""
        return self._k("usable")

    def idempotency(self, idempotency_key: str) -> str:
        """Hash: the first answer to an admin credit made with this `Idempotency-Key` (expires)."""
        return self._k("idem:" + hashlib.sha256(idempotency_key.encode()).hexdigest())

    def api_key(self, key_id: str) -> str:
        """Hash: one API key's record (status, expiry, label, prefix, hash)."""
        return self._k(f"key:{key_id}")


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Builds every key name from one configurable prefix."""

    prefix: str = "gw:"

    def for_account(self, account_id: str) -> AccountKeys:
        return AccountKeys(self.prefix, account_id)

    def key_hash(self, sha256_hex: str) -> str:
        """String: `account_id:key_id` for an API key's SHA-256."""
        return f"{self.prefix}keyhash:{sha256_hex}"

    def key_id(self, key_id: str) -> str:
        """String: the account id owning a key id (for revocation by key id alone)."""
        return f"{self.prefix}keyid:{key_id}"

    @property
    def accounts(self) -> str:
        """Set: every account id."""
        return f"{self.prefix}accounts"

    def hold_expiry_pattern(self) -> str:
        """SCAN pattern matching every account's hold-expiry set (used by the reaper)."""
        return f"{self.prefix}{{*}}:hexp"

    def account_id_from_hold_key(self, key: str) -> str | None:
        """Extract the account id from a hold-expiry key name."""
        head = self.prefix + "{"
        if not key.startswith(head) or not key.endswith("}:hexp"):
            return None
        return key[len(head) : -len("}:hexp")]
