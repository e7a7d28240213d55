"""A real Label Studio for tests: the `label-studio` server from its own venv (.venv-labelstudio, `make setup` builds
it), SQLite in a temp dir, on 127.0.0.1 at a free port, started once per test session and stopped after.

Users and tokens are made the way Label Studio's docs say:
- the admin by `label-studio start --username ... --password ... --user-token ...` (the command-line account set-up);
  that token is a legacy token, accepted because the organisation is created with legacy tokens enabled
  (LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true, `--enable-legacy-api-token`);
- annotators sign up on the /user/signup/ page (a browser's form post, CSRF included) and, logged in, create a
  personal access token (POST /api/token/, what "Account & Settings -> Personal Access Token -> Create" does).
Nothing leaves the machine: Sentry, analytics and the version check are switched off.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
LS_BIN = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
LOOPBACK = "127.0.0.1"
ADMIN_EMAIL = "admin@raydpo.test"
PASSWORD = "raydpo-test-Passw0rd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def quiet_env(data_dir: Path) -> dict:
    """Label Studio's settings for a private, offline server (its get_env reads LABEL_STUDIO_<NAME> or <NAME>)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_DATABASE_NAME": str(data_dir / "label_studio.sqlite3"),
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK, "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class Annotator:
    email: str
    token: str  # a personal access token (a JWT refresh token)
    user_id: int


@dataclass
class LabelStudio:
    url: str
    admin_legacy_token: str
    admin_pat: str
    start_seconds: float
    process: subprocess.Popen
    log_path: Path
    annotators: list[Annotator] = field(default_factory=list)

    def login(self, email: str = ADMIN_EMAIL, password: str = PASSWORD) -> requests.Session:
        """A browser-like session logged in through the login form."""
        session = requests.Session()
        page = session.get(f"{self.url}/user/login/", timeout=30)
        session.post(f"{self.url}/user/login/", timeout=30, headers={"Referer": f"{self.url}/user/login/"},
                     data={"email": email, "password": password, "csrfmiddlewaretoken": _csrf(session, page.text)})
        assert session.get(f"{self.url}/api/current-user/whoami", timeout=30).ok, f"login as {email} failed"
        return session

    def signup(self, email: str) -> Annotator:
        session = requests.Session()
        page = session.get(f"{self.url}/user/signup/", timeout=30)
        session.post(f"{self.url}/user/signup/", timeout=30, headers={"Referer": f"{self.url}/user/signup/"},
                     data={"email": email, "password": PASSWORD, "csrfmiddlewaretoken": _csrf(session, page.text)})
        me = session.get(f"{self.url}/api/current-user/whoami", timeout=30)
        assert me.ok, f"sign-up of {email} failed: {me.status_code} {me.text[:200]}"
        annotator = Annotator(email, personal_access_token(self.url, session), int(me.json()["id"]))
        self.annotators.append(annotator)
        return annotator


def _csrf(session: requests.Session, html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    return match.group(1) if match else session.cookies.get("csrftoken", "")


def personal_access_token(url: str, session: requests.Session) -> str:
    csrf = session.cookies.get("csrftoken", "")
    made = session.post(f"{url}/api/token/", timeout=30, headers={"X-CSRFToken": csrf, "Referer": url})
    assert made.ok, f"creating a personal access token failed: {made.status_code} {made.text[:200]}"
    return made.json()["token"]


def start_label_studio(data_dir: Path, *, timeout: float = 600) -> LabelStudio:
    if not LS_BIN.exists():
        raise RuntimeError(f"{LS_BIN} is missing: run `make setup` (it builds .venv-labelstudio)")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    legacy = "raydpo-legacy-" + os.urandom(8).hex()
    log_path = data_dir / "label-studio.log"
    began = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(LS_BIN), "start", "--no-browser", "--internal-host", LOOPBACK, "--port", str(port),
             "--username", ADMIN_EMAIL, "--password", PASSWORD, "--user-token", legacy,
             "--enable-legacy-api-token", "--log-level", "WARNING"],
            cwd=data_dir, env=quiet_env(data_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() - began > timeout:
            stop(process)
            raise RuntimeError(f"Label Studio did not answer in {timeout}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)
    server = LabelStudio(url, legacy, "", time.monotonic() - began, process, log_path)
    server.admin_pat = personal_access_token(url, server.login())
    return server


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and the workers it forked
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server
    finally:
        stop(server.process)
