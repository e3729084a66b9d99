"""The event loop relays, tunnels and site connectors run on: uvloop where installed.

Every relayed byte is decrypted and encrypted again by the loop's TLS transport; uvloop's
is markedly faster than the standard library's, and asyncio's is the fallback.
"""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
