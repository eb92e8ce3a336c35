"""The Redis key schema: the one place that builds key names.

Every key a Lua script touches for an account carries the account's hash tag `{acct_…}`, so that
all of an account's keys live in one Redis Cluster slot and the same scripts run on a cluster.
Keys that map a key hash to its account are looked up directly, never inside a script.

Global indexes (every account, the accounts with holds, the webhook queue) are sharded into
`INDEX_BUCKETS` buckets, each under a hash tag of its own (`{idx:07}`), so that no single slot
holds them all and jobs can walk them one bucket, and one bounded batch, at a time. The
periodic jobs' leases, cursors and markers live beside the bucket they guard.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

#: How many buckets every global index is sharded into. Changing it moves members between buckets:
#: it is part of the stored format (a new value needs a re-index, see `gateway.migrate`).
INDEX_BUCKETS = 64


def bucket_of(member: str) -> int:
    """The bucket of an account id or delivery id: a stable hash (CRC-32), the same in every process."""
    return zlib.crc32(member.encode()) % INDEX_BUCKETS


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
    def exports(self) -> str:
        """Hash: export name -> the last ledger stream id that export has written (`usage export --resume`)."""
        return self._k("exports")

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

    def _bucket(self, bucket: int, suffix: str) -> str:
        if not 0 <= bucket < INDEX_BUCKETS:
            raise ValueError(f"bucket {bucket} out of range")
        return f"{self.prefix}{{idx:{bucket:02d}}}:{suffix}"

    def accounts(self, bucket: int) -> str:
        """Sorted set (every score 0, so members sort by id): the account ids of one bucket."""
        return self._bucket(bucket, "accounts")

    def holders(self, bucket: int) -> str:
        """Sorted set: account ids of one bucket that may hold credits, scored by when the reaper
        should look at them next (ms, gateway clock); see `gateway.reaper`."""
        return self._bucket(bucket, "holders")

    def webhooks(self, bucket: int) -> str:
        """Sorted set: delivery ids of one bucket, scored by when they are due (ms)."""
        return self._bucket(bucket, "webhooks")

    def delivery(self, delivery_id: str) -> str:
        """String: one queued webhook delivery (account id, body, attempts; never the URL or secret)."""
        return f"{self.prefix}delivery:{delivery_id}"

    def lease(self, bucket: int, job: str) -> str:
        """String: the lease of one periodic job on one bucket (a random token, with an expiry)."""
        return self._bucket(bucket, f"lease:{job}")

    def job_cursor(self, bucket: int, job: str) -> str:
        """String: where a job's incremental walk of one bucket stopped (a ZSCAN cursor)."""
        return self._bucket(bucket, f"cursor:{job}")

    def job_done(self, bucket: int, job: str) -> str:
        """String, expiring: a job finished its pass over one bucket; the next is due when it expires."""
        return self._bucket(bucket, f"done:{job}")

    # ---- before the sharded indexes (read once by `gateway.migrate`, never written)

    @property
    def legacy_accounts(self) -> str:
        """Set: every account id, as versions before the sharded index kept them."""
        return f"{self.prefix}accounts"

    @property
    def legacy_webhooks(self) -> str:
        """Sorted set: the single webhook queue of older versions (drained into the buckets)."""
        return f"{self.prefix}webhooks"

    def legacy_export_pattern(self) -> str:
        """Pattern of the old per-export cursor hashes (`gw:export:<name>`, account id -> stream id)."""
        return f"{self.prefix}export:*"

    @property
    def migrated(self) -> str:
        """String: set once the legacy indexes have been copied into the buckets."""
        return f"{self.prefix}migrated:sharded-index"

    def account_id_of(self, key: str) -> str | None:
        """The account id in the hash tag of one of an account's key names (None for another key)."""
        head = self.prefix + "{"
        if not key.startswith(head) or "}" not in key:
            return None
        account_id = key[len(head):key.index("}")]
        return None if account_id.startswith("idx:") else account_id
