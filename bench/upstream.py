"""The bench's cheap upstream: nginx answering canned OpenAI chat completions from its config.

`/json/v1/chat/completions` answers a chat.completion object, `/sse/v1/chat/completions` an SSE stream
of chunks ending with a usage chunk and `[DONE]` (as OpenAI sends with `stream_options.include_usage`).
nginx answers with `return 200 '...'` (no file I/O, no scripting), so per request it costs a few
microseconds: whatever the proxies in front of it spend is theirs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

WORDS = ["Hello", "from", "the", "metering", "gateway", "benchmark,", "answering", "with", "canned", "tokens",
         "for", "you."]
USAGE = {"prompt_tokens": 9, "completion_tokens": len(WORDS), "total_tokens": 9 + len(WORDS),
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                       "rejected_prediction_tokens": 0}}


def json_answer(model: str = "bench-json") -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1796124763, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(WORDS)}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": USAGE, "service_tier": "default", "system_fingerprint": "fp_bench"})


def sse_answer(model: str = "bench-stream") -> str:
    def chunk(delta: dict[str, str], finish: str | None = None, usage: dict[str, object] | None = None,
              choices: bool = True) -> str:
        body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1796124763, "model": model,
                "service_tier": "default",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
                "usage": usage}
        return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"

    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(WORDS)]
    frames += [chunk({}, "stop"), chunk({}, usage=USAGE, choices=False), "data: [DONE]\n\n"]
    return "".join(frames)


def _nginx_string(text: str) -> str:
    # single-quoted nginx string: escape the quote and backslash, keep newlines as \n escapes
    assert "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(folder: Path, port: int) -> Path:
    """Write an nginx.conf serving the canned answers on 127.0.0.1:`port` (one worker)."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  fastcgi_temp_path {folder}/fastcgi;
  uwsgi_temp_path {folder}/uwsgi;
  scgi_temp_path {folder}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /json/v1/chat/completions {{
      default_type application/json;
      return 200 {_nginx_string(json_answer())};
    }}
    location = /sse/v1/chat/completions {{
      default_type text/event-stream;
      add_header Cache-Control no-cache;
      return 200 {_nginx_string(sse_answer())};
    }}
  }}
}}
""")
    return conf


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).exists()), None)


def start_nginx(folder: Path, port: int) -> subprocess.Popen[bytes]:
    binary = nginx_binary()
    if binary is None:
        raise SystemExit("nginx is not installed (apt-get install -y nginx-light), or run with --upstream emulator")
    conf = nginx_conf(folder, port)
    return subprocess.Popen([binary, "-c", str(conf), "-p", str(folder), "-e", str(folder / "error.log")],
                            stderr=subprocess.DEVNULL)
