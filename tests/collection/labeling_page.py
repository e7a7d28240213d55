"""The labeling page in headless Chromium, logged in through Label Studio's login form: wait until the prompt and
both answers of a task are on the page, then take a screenshot.

The test calls `screenshot_task`; the README's picture is made from a real tasks file by running this module:

    .venv/bin/python -m tests.collection.labeling_page round1.json [--out docs/collection/labeling.png]

which starts a private Label Studio (tests/collection/lsserver.py), pushes the tasks with `raydpo collect push`,
photographs the first pair's labeling page and stops the server.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests

from tests.collection.lsserver import ADMIN_EMAIL, PASSWORD, start_label_studio, stop

ROOT = Path(__file__).resolve().parents[2]


def screenshot_task(url: str, project: int, task: dict, out: Path, *, email: str = ADMIN_EMAIL,
                    password: str = PASSWORD, settle_s: float = 30) -> str:
    """Logs in, opens the task's labeling page, waits for the prompt and both answers; the page's text. settle_s: how
    long to wait for a live submit button, for the README's picture (a test checks the text and takes less)."""
    from tests.serving.browser import Browser

    browser = Browser()
    try:
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"{url}/user/login/")
        browser.wait_for("document.querySelector('input[name=email]') !== null")
        browser.evaluate(f"document.querySelector('input[name=email]').value = {json.dumps(email)};"
                         f"document.querySelector('input[name=password]').value = {json.dumps(password)};"
                         "document.querySelector('input[name=password]').form.submit(); true")
        browser.wait_for("!location.pathname.startsWith('/user/login')", timeout=60)
        browser.call("Page.navigate", url=f"{url}/projects/{project}/data?task={task['id']}")
        data = task["data"]
        # innerText collapses runs of white space: look for the first words of each answer
        wanted = [data["prompt"][:60]] + [" ".join(data[k].split()[:4]) for k in ("answer_a", "answer_b")]
        browser.wait_for(" && ".join(f"document.body.innerText.replace(/\\s+/g, ' ').includes({json.dumps(w)})"
                                     for w in wanted), timeout=120)
        browser.wait_for("document.body.innerText.includes('Which answer is better')", timeout=30)
        # settled, for a clean picture: the task list has loaded beside the task, the submit button is live, and
        # the text stays put. Best effort: a task other annotators already labelled shows no live submit button,
        # and the prompt and both answers (what the page must show) were waited for above.
        try:
            browser.wait_for("!document.body.innerText.includes('Import data to get') && [...document."
                             "querySelectorAll('button')].some(b => /^(Submit|Update|Skip)$/.test(b.innerText.trim())"
                             " && !b.disabled)", timeout=settle_s)
        except TimeoutError:
            pass
        before = None
        for _ in range(30):
            now = browser.evaluate("document.body.innerText")
            if now == before:
                break
            before = now
            time.sleep(1)
        browser.screenshot(out)
        return browser.evaluate("document.body.innerText")
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", help="a tasks file from `raydpo collect generate`")
    parser.add_argument("--out", default=str(ROOT / "docs" / "collection" / "labeling.png"))
    parser.add_argument("--project", default="round1")
    args = parser.parse_args()
    from launcher.cli import main as raydpo

    with tempfile.TemporaryDirectory(prefix="raydpo-ls-") as folder:
        server = start_label_studio(Path(folder))
        try:
            os.environ["LABEL_STUDIO_API_KEY"] = server.admin_pat
            assert raydpo(["collect", "push", args.tasks, "--label-studio", server.url, "--project",
                           args.project]) == 0
            del os.environ["LABEL_STUDIO_API_KEY"]
            auth = {"Authorization": f"Token {server.admin_legacy_token}"}
            project = next(p for p in requests.get(f"{server.url}/api/projects", headers=auth, timeout=30)
                           .json()["results"] if p["title"] == args.project)
            tasks = requests.get(f"{server.url}/api/tasks", params={"project": project["id"], "page_size": 1},
                                 headers=auth, timeout=60).json()["tasks"]
            screenshot_task(server.url, project["id"], tasks[0], Path(args.out))
            print(f"wrote {args.out}")
        finally:
            stop(server.process)


if __name__ == "__main__":
    main()
