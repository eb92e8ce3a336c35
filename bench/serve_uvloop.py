"""`gateway serve` on uvloop, for measuring the uvloop lever before the CLI chooses the loop itself.

The policy is installed at import time on purpose: `gateway serve --workers N` starts its workers
with multiprocessing's spawn, which imports this main module again in every child (as __mp_main__).
Usage: python bench/serve_uvloop.py serve [gateway serve options]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

if __name__ == "__main__":
    from gateway.cli import main

    sys.exit(main())
