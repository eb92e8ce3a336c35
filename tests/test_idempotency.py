"""Admin credits are idempotent (issue 10, item 13; invariant 8): a grant or pack POSTed again with the
same `Idempotency-Key` gets the first answer and credits once, even when the duplicates run at once;
the same key with another request is refused."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN, ROOT, Harness

from gateway.idempotency import IDEMPOTENCY_TTL_MS
from gateway.keys import KeySchema

PLANS = """
default_plan: free
packs:
  small: {credits: 5, price_usd: 4.99}
  large: {credits: 50, price_usd: 39}
plans:
  free: {monthly_credits: 1, models: ["demo-*"]}
"""


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _post(harness: Harness, path: str, body: dict[str, Any], key: str | None
                ) -> tuple[int, dict[str, Any], str | None]:
    headers = {**ADMIN, **({"Idempotency-Key": key} if key is not None else {})}
    async with harness.client.post(path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed")


def _grants(harness: Harness, account: str) -> list[dict[str, str]]:
    return [e for e in harness.ledger(account) if e["type"] == "grant"]


async def test_a_retried_grant_with_the_same_idempotency_key_credits_once(harness: Harness) -> None:
    account, _ = await harness.account()
    path = f"/admin/accounts/{account}/credits"
    first = await _post(harness, path, {"credits": "2.5", "note": "refund"}, "order-42")
    assert first[0] == 200 and first[1]["credits_remaining"] == "3.5" and first[2] is None
    await _post(harness, path, {"credits": 1}, None)  # another grant in between, without a key
    again = await _post(harness, path, {"credits": "2.5", "note": "refund"}, "order-42")
    assert again[:2] == first[:2] and again[2] == "true"  # the first answer, as it was then
    state = await harness.assert_conserved(account)
    assert state["extra"] == 3_500_000
    grants = _grants(harness, account)
    assert [(g["amount"], g.get("idempotency_key")) for g in grants] == [("2500000", "order-42"), ("1000000", None)]
    ttl = harness.redis.pttl(KeySchema().for_account(account).idempotency("order-42"))
    assert 0 < ttl <= IDEMPOTENCY_TTL_MS  # remembered for a day, then forgotten


async def test_an_idempotency_key_reused_for_another_request_is_refused(harness: Harness) -> None:
    account, _ = await harness.account()
    assert (await _post(harness, f"/admin/accounts/{account}/credits", {"credits": 2}, "k-1"))[0] == 200
    before = harness.state(account)
    for path, body in ((f"/admin/accounts/{account}/credits", {"credits": 3}),
                       (f"/admin/accounts/{account}/credits", {"credits": 2, "note": "other"}),
                       (f"/admin/accounts/{account}/packs", {"pack": "small"})):
        status, error, _ = await _post(harness, path, body, "k-1")
        assert status == 422 and error["error"]["param"] == "idempotency_key"
        assert "already used with a different request" in error["error"]["message"]
    assert harness.state(account) == before and len(_grants(harness, account)) == 1
    other, _ = await harness.account()  # keys are per account
    assert (await _post(harness, f"/admin/accounts/{other}/credits", {"credits": 3}, "k-1"))[0] == 200
    for bad in ("", "x" * 256, "tab\there"):
        status, error, _ = await _post(harness, f"/admin/accounts/{account}/credits", {"credits": 1}, bad)
        assert status == 400 and error["error"]["param"] == "idempotency_key"
    assert harness.state(account) == before


async def test_concurrent_duplicates_credit_exactly_once(harness: Harness) -> None:
    account, _ = await harness.account()
    grants = await asyncio.gather(*(_post(harness, f"/admin/accounts/{account}/credits", {"credits": 7}, "burst")
                                    for _ in range(20)))
    packs = await asyncio.gather(*(_post(harness, f"/admin/accounts/{account}/packs", {"pack": "large"}, "pack-1")
                                   for _ in range(20)))
    for answers in (grants, packs):
        assert {(status, json.dumps(body)) for status, body, _ in answers} == {(200, json.dumps(answers[0][1]))}
        assert [replayed for _, _, replayed in answers].count(None) == 1
    state = await harness.assert_conserved(account)
    assert state["extra"] == 57_000_000 and len(_grants(harness, account)) == 2
    assert packs[0][1] == {"account_id": account, "pack": "large", "credits_remaining": "58",
                            "credits_remaining_micro": 58_000_000}


async def test_the_cli_takes_an_idempotency_key(harness: Harness, config_dir: Path, redis_url: str) -> None:
    account, _ = await harness.account()

    async def cli(*args: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, "--account", account, "--config-dir", str(config_dir),
            "--redis-url", redis_url, "--json", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return dict(json.loads(out))

    grant = ("credits", "grant", "--credits", "4", "--idempotency-key", "cli-1")
    first, again = await cli(*grant), await cli(*grant)
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert first["credits_remaining"] == again["credits_remaining"] == "5"
    pack = ("packs", "buy", "--pack", "small", "--idempotency-key", "cli-2")
    first, again = await cli(*pack), await cli(*pack)
    assert (first["replayed"], again["replayed"]) == (False, True) and again["credits_remaining"] == "10"
    assert harness.state(account)["extra"] == 9_000_000
    assert [g.get("idempotency_key") for g in _grants(harness, account)] == ["cli-1", "cli-2"]
