"""The anthropic SDK 1.x (key in `x-api-key`) beside the current 2.x (key as `Authorization: Bearer`).

`make install` puts anthropic 1.x in .venv/sdk/anthropic-1 (pip --target): it runs here in its own
Python process, so both major versions are exercised against the same gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from conftest import ROOT, Harness, emulator_state
from test_proxy_anthropic import expected_micro, msgs

from gateway.emulator import prompt_tokens

SDK_1X = ROOT / ".venv" / "sdk" / "anthropic-1"

SCRIPT = """
import json, sys
import anthropic
client = anthropic.Anthropic(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
first = client.messages.create(model="demo-claude", max_tokens=50, messages=[{"role": "user", "content": sys.argv[3]}])
with client.messages.stream(model="demo-claude", max_tokens=50,
                            messages=[{"role": "user", "content": sys.argv[4]}]) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
try:
    client.messages.create(model="demo-claude", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                           extra_headers={"x-api-key": "gwk_wrong"})
    refused = None
except anthropic.AuthenticationError as error:
    refused = error.status_code
print(json.dumps({"version": anthropic.__version__, "auth": sorted(client.auth_headers),
                  "text": first.content[0].text, "out": first.usage.output_tokens,
                  "streamed": streamed, "stream_out": final.usage.output_tokens, "refused": refused}))
"""


@pytest.mark.skipif(not SDK_1X.is_dir(), reason="anthropic 1.x is installed by `make install` in .venv/sdk")
async def test_anthropic_sdk_1x_sends_x_api_key_and_is_billed_exactly(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    first, second = "hello [[emu out=4]]", "stream please [[emu out=6]]"
    env = {**os.environ, "PYTHONPATH": str(SDK_1X)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, str(harness.client.make_url("")).rstrip("/"), key, first, second,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["version"].startswith("1.")
    assert [h.lower() for h in result["auth"]] == ["x-api-key"]  # 1.x: the key in x-api-key, not a bearer
    assert result["text"].startswith("Hello") and result["out"] == 4
    assert len(result["streamed"].split()) == 6 and result["stream_out"] == 6
    assert result["refused"] == 401  # a wrong key is the SDK's AuthenticationError, as with the provider
    # the gateway read the key from x-api-key and never forwarded it
    sent = emulator_state(harness.emulator).received[-1]["headers"]
    assert key not in json.dumps(sent)
    cost = expected_micro(prompt_tokens(msgs(first)), 0, 0, 0, 4) + expected_micro(prompt_tokens(msgs(second)), 0, 0,
                                                                                    0, 6)
    assert (await harness.assert_conserved(account))["charged"] == cost
