"""Headless Chromium driven over the Chrome DevTools protocol (a websocket, no browser download).

Debian's ``chromium`` package is the browser; the ``websockets`` package speaks the
protocol. Every wait is bounded, and the browser process is stopped on close.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
START_TIMEOUT_S = 30
CALL_TIMEOUT_S = 30


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page."""

    def __init__(self, profile_dir: Path, width: int = 1440, height: int = 900):
        self.profile_dir = Path(profile_dir)
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self.log_path = self.profile_dir.parent / f"{self.profile_dir.name}-chromium.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                    f"--user-data-dir={self.profile_dir}", "--remote-debugging-port=0",
                    f"--window-size={width},{height}", "about:blank",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self._closing = contextlib.ExitStack()
        self._closing.callback(self._stop)
        try:
            self.ws = self._closing.enter_context(connect(self._page_websocket(), max_size=None, open_timeout=START_TIMEOUT_S))
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self._closing.close()
            raise

    def _page_websocket(self) -> str:
        """The page's DevTools websocket; Chromium writes its port to the profile once it listens."""
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                port = int(port_file.read_text().split()[0])
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except (OSError, ValueError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium gave no DevTools page in {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def call(self, method: str, timeout: float = CALL_TIMEOUT_S, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile are dropped)."""
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer in {timeout} s")
            message = json.loads(self.ws.recv(timeout=remaining))
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # the page is between documents
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} not true after {timeout} s (at {self.evaluate('location.href')})")
            time.sleep(0.2)

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href.startsWith({json.dumps(url.split('?')[0])}) && document.readyState === 'complete'", timeout)

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page, not only the window."""
        metrics = self.call("Page.getLayoutMetrics")
        height = int(metrics["cssContentSize"]["height"])
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False)
        try:
            data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        finally:
            self.call("Emulation.clearDeviceMetricsOverride")
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._closing.close()  # the websocket, then the browser

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
