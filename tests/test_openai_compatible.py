"""OpenAI-compatible upstreams (Mistral, Gemini's OpenAI endpoint, vLLM, Ollama) added in providers.yaml alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PROVIDER_KEY, TEST_PLANS, Harness, emulator_state, providers_yaml
from test_proxy_openai import expected_micro

from gateway.emulator import prompt_tokens

# Three OpenAI-compatible upstreams, written the way an operator would: no code, only configuration.
COMPAT_UPSTREAMS = {
    # Mistral: knows max_tokens only, always reports usage on the last stream chunk
    "mistral": {"dialect": "openai", "base_url": "${EMULATOR_URL}/v1", "api_key": "${UPSTREAM_DEMO_API_KEY}",
                "output_cap_field": "max_tokens", "stream_usage": "always"},
    # a local server that never reports usage in streams: the gateway bills its estimate, capped at the hold
    "local": {"dialect": "openai", "base_url": "${EMULATOR_URL}/v1", "api_key": "${UPSTREAM_DEMO_API_KEY}",
              "stream_usage": "none"},
    # vLLM / Gemini's OpenAI endpoint: honour stream_options.include_usage like OpenAI (the default)
    "vllm": {"dialect": "openai", "base_url": "${EMULATOR_URL}/v1", "api_key": "${UPSTREAM_DEMO_API_KEY}"},
}
PRICES = {"input": 0.15, "cached_input": 0.075, "output": 0.60, "max_output_tokens": 4096}  # demo-mini's


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    providers: dict[str, Any] = yaml.safe_load(providers_yaml())
    providers["upstreams"].update(COMPAT_UPSTREAMS)
    providers["models"].update({f"compat-{name}": {"upstream": name, **PRICES} for name in COMPAT_UPSTREAMS})
    (folder / "providers.yaml").write_text(yaml.safe_dump(providers))
    (folder / "plans.yaml").write_text(TEST_PLANS.replace('"demo-*"', '"demo-*", "compat-*"'))
    monkeypatch.setenv("UPSTREAM_DEMO_API_KEY", PROVIDER_KEY)
    return folder


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_max_tokens_only_upstream_gets_the_cap_in_max_tokens(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    completion = await client.chat.completions.create(model="compat-mistral", messages=_messages("hi [[emu out=9]]"),
                                                      max_completion_tokens=5)
    sent = emulator_state(harness.emulator).received[-1]["body"]
    # the cap the hold was sized for reaches a server that ignores max_completion_tokens
    assert sent["max_tokens"] == 5 and "max_completion_tokens" not in sent
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(prompt_tokens(_messages("hi [[emu out=9]]")), 0, 5)


async def test_upstream_that_always_reports_stream_usage_is_billed_from_it(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    text = "stream [[emu out=7 usage=always]]"
    chunks = [c async for c in await client.chat.completions.create(model="compat-mistral", messages=_messages(text),
                                                                    stream=True)]
    assert "stream_options" not in emulator_state(harness.emulator).received[-1]["body"]  # nothing injected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(prompt_tokens(_messages(text)), 0, 7)
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert event["estimated"] == "0" and event["route"] == "compat-mistral" and event["upstream"] == "mistral"


async def test_upstream_without_stream_usage_is_billed_an_estimate_within_the_hold(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    chunks = [c async for c in await client.chat.completions.create(
        model="compat-local", messages=_messages("stream [[emu out=7]]"), stream=True, max_completion_tokens=50)]
    assert "stream_options" not in emulator_state(harness.emulator).received[-1]["body"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 7
    state = await harness.assert_conserved(account)
    [event] = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert event["estimated"] == "1" and event["outcome"] == "ok_estimated"
    assert 0 < state["charged"] <= int(event["hold"])


async def test_default_compatible_upstream_gets_usage_injected_like_openai(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    client = harness.sdk(key)
    text = "stream [[emu out=4]]"
    chunks = [c async for c in await client.chat.completions.create(model="compat-vllm", messages=_messages(text),
                                                                    stream=True)]
    assert emulator_state(harness.emulator).received[-1]["body"]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    state = await harness.assert_conserved(account)
    assert state["charged"] == expected_micro(prompt_tokens(_messages(text)), 0, 4)
