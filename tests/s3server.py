"""A local S3 for tests: moto's S3 server on 127.0.0.1 at a free port, as a session-scoped pytest fixture.

Use it with `from tests.s3server import s3_server  # noqa: F401` in a test module (or list "tests.s3server" in
conftest's pytest_plugins). While the session lasts, os.environ points every standard AWS client at it:
AWS_ENDPOINT_URL, fake credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY = "testing"), AWS_DEFAULT_REGION,
NO_PROXY for loopback, no ~/.aws files and no instance-metadata lookups; real AWS settings that could redirect
traffic (AWS_PROFILE, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL_S3, ...) are removed. All is restored when the session ends.

Ray: worker processes inherit the driver's environment as it is when `ray.init()` starts the local cluster, so a
test that starts Ray after taking this fixture gets workers that talk to this server too. (A Ray cluster started
before the fixture would not: take the fixture first.)

The server runs in a thread of the pytest process and keeps its buckets in moto's in-process state, so `stop()`
followed by `start()` brings back the same endpoint with the same objects: fault tests use that to cut storage off
mid-operation. `stop()` closes the listening socket, so clients get "connection refused" at once instead of hanging.
"""
from __future__ import annotations

import os
import threading

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Nothing from ~/.aws, and no instance-metadata probe (169.254.169.254 is not loopback).
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Settings that could send requests to a real account or another endpoint: never active during tests.
REMOVED_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                   "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                   "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
LOOPBACK = "127.0.0.1"


class S3Server:
    """moto's S3 behind werkzeug, restartable on the same port (moto's ThreadedMotoServer keeps its socket open
    after stop(), so a stopped server would leave clients hanging rather than refused)."""

    def __init__(self) -> None:
        self.port = 0  # the first start() picks a free port; later starts reuse it so the endpoint stays valid
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        if self.running:
            return
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(LOOPBACK, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self.running:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str) -> str:
        """Creates the bucket (an existing one is emptied) and returns its s3:// URI."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            self._empty(client, name)
        return f"s3://{name}"

    def remove_bucket(self, name: str) -> None:
        """Deletes the bucket and everything in it (S3 refuses to delete a bucket that still holds objects)."""
        client = self.client()
        self._empty(client, name)
        client.delete_bucket(Bucket=name)

    @staticmethod
    def _empty(client, name: str) -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})


def aws_env_for(endpoint_url: str) -> dict[str, str]:
    no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY", ""), LOOPBACK, "localhost") if p)
    return {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint_url, "NO_PROXY": no_proxy, "no_proxy": no_proxy}


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto", reason="moto[server] is not installed: pip install 'moto[server]'")
    server = S3Server()
    server.start()
    saved = {key: os.environ.get(key) for key in (*aws_env_for(server.endpoint_url), *REMOVED_AWS_ENV)}
    for key in REMOVED_AWS_ENV:
        os.environ.pop(key, None)
    os.environ.update(aws_env_for(server.endpoint_url))
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
