"""Headless Chromium driven over the DevTools protocol (a websocket), to load the chat page and read it back."""
from __future__ import annotations

import base64
import itertools
import json
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1100,700"]


class Browser:
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="raydpo-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        for _ in range(100):
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            pages = [p for p in pages if p.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        id_ = next(self.ids)
        self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == id_:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def chat_once(url: str, message: str, *, model: str | None = None, screenshot: Path | None = None) -> dict:
    """Opens the chat page, types `message`, sends it, waits for the streamed answer; what the page shows."""
    browser = Browser()
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.querySelectorAll('#model option').length > 0")
        if model:
            browser.evaluate(f"document.getElementById('model').value = {json.dumps(model)}")
        browser.evaluate(f"document.getElementById('input').value = {json.dumps(message)}; "
                         "document.getElementById('form').requestSubmit(); true")
        state = browser.wait_for("(() => { const a = document.querySelector('.msg.assistant');"
                                 " return a && a.dataset.state !== 'streaming' ? a.dataset.state : null })()")
        if screenshot:
            browser.screenshot(screenshot)
        return {"state": state,
                "answer": browser.evaluate("document.querySelector('.msg.assistant .text').textContent"),
                "chunks": int(browser.evaluate("document.querySelector('.msg.assistant').dataset.chunks")),
                "user": browser.evaluate("document.querySelector('.msg.user .text').textContent"),
                "models": browser.evaluate("[...document.querySelectorAll('#model option')].map(o => o.value)")}
    finally:
        browser.close()
