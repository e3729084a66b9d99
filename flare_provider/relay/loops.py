"""The event loop relays, tunnels and site connectors run on: uvloop where installed.

The loops carry the control connections (TLS: attachments, pings, path requests) and, for
a site with ``relay_data: tls``, that site's data connections; uvloop's TLS transport is
markedly faster than the standard library's, and asyncio's is the fallback.
"""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
