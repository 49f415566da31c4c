"""A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
file descriptors 3 and 4, NUL-separated JSON), so that browser tests need no driver package and
no network port. Every network request is refused (offline emulation, an unreachable proxy, no
DNS), and each one the page attempts is recorded."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH (MMKIT_TEST_CHROMIUM overrides)."""
    explicit = os.environ.get("MMKIT_TEST_CHROMIUM")
    if explicit:
        return shutil.which(explicit)  # None when it is not an executable: the tests skip and say so
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class Chromium:
    """`with Chromium(path) as browser: browser.open(url)` — then `console_errors`, `requests`,
    `evaluate(js)`, `screenshot()`."""

    def __init__(self, executable: str, width: int = 1200, height: int = 900, timeout: float = 60.0) -> None:
        self.executable, self.width, self.height, self.timeout = executable, width, height, timeout
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.buffer = b""

    def __enter__(self) -> Self:
        self.profile = tempfile.mkdtemp(prefix="mmkit-chromium-")
        to_browser, self.commands = os.pipe()  # we write commands, the browser reads fd 3
        self.responses, from_browser = os.pipe()  # the browser writes fd 4, we read

        def pipes_at_3_and_4() -> None:
            high = [os.dup(to_browser), os.dup(from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # the pipes must be fds 3 and 4 in the child (preexec_fn: the tests start no threads here);
            # close_fds=False passes only those two: Python's own fds are not inheritable (PEP 446)
            preexec_fn=pipes_at_3_and_4, close_fds=False,  # noqa: PLW1509
        )
        os.close(to_browser)
        os.close(from_browser)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                       "uploadThroughput": -1}, session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False}, session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.responses)
        shutil.rmtree(self.profile, ignore_errors=True)

    # ---- the protocol

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.responses], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.responses, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    # ---- what a test asks

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")
        self.evaluate("1")  # drains the events the load produced

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    @property
    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a resource that failed)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                errors.append(str(params.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(str(params["entry"].get("text")))
        return errors

    @property
    def requests(self) -> list[str]:
        """Every URL the page asked for."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, full_height: int | None = None) -> None:
        """A PNG of the page, `full_height` pixels tall (default: the window's)."""
        import base64

        self.call("Emulation.setScrollbarsHidden", {"hidden": True}, session=True)
        if full_height is not None:
            self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": full_height,
                                                              "deviceScaleFactor": 1, "mobile": False}, session=True)
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
