"""Invariant 5: keys never go upstream (see test_proxy_openai), never appear in logs, errors or
metrics, and are stored only as hashes (see test_admin)."""

from __future__ import annotations

import logging

import pytest
from conftest import ADMIN_KEY, PROVIDER_KEY, Harness

from gateway.secret import Secret


def test_secret_repr_redacts() -> None:
    secret = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(secret) and "sk-very-secret" not in str(secret)
    assert "sk-very-secret" not in f"{secret}" and secret.reveal() == "sk-very-secret"
    assert "sk-very-secret" not in repr({"key": secret})


async def test_no_key_or_prompt_in_logs_errors_or_metrics(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    account, key = await harness.account(credits=1)
    prompt = "my secret prompt text 7f3a"
    sdk = harness.sdk(key)
    await sdk.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": prompt}])
    bodies = []
    for bad in ("Bearer " + key + "x", "Bearer " + key[:-1]):  # near-misses of a real key
        resp = await harness.client.post("/v1/chat/completions", json={"model": "demo-mini", "messages": []},
                                         headers={"Authorization": bad})
        bodies.append(await resp.text())
    resp = await harness.client.post("/v1/chat/completions", data=b"{broken " + prompt.encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    bodies.append(await resp.text())
    metrics = await (await harness.client.get("/metrics")).text()
    await harness.gw.quiesce()
    ledger = repr(harness.ledger(account))
    everything = caplog.text + "".join(bodies) + metrics + ledger
    for secret in (key, key[4:20], PROVIDER_KEY, ADMIN_KEY, prompt):
        assert secret not in everything, secret
    assert "gateway_requests_total" in metrics
