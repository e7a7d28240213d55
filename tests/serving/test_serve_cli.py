"""`raydpo serve` as a user runs it: a local Ray cluster started for it, stopped by Ctrl-C with no Ray process left;
and `raydpo generate` over a JSONL of prompts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.serving.test_endpoint import free_port

pytestmark = pytest.mark.slow
RAYDPO = str(Path(sys.executable).with_name("raydpo"))
RAY_DAEMONS = ("raylet", "gcs_server")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}


@pytest.mark.faults
def test_ctrl_c_stops_the_server_and_its_ray_cluster(tiny_model_dir, tmp_path):
    port = free_port()
    server = subprocess.Popen([RAYDPO, "serve", str(tiny_model_dir), "--port", str(port)], env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("Ctrl-C stops" in line for line in lines):  # printed once the app is deployed and ready
            assert server.poll() is None, "".join(lines)
            assert time.time() < deadline, "the server never said it was ready"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ok"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=tiny_model_dir.name, max_tokens=4,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.usage.prompt_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        started = psutil.Process(server.pid).children(recursive=True)
        daemons = [p for p in started if p.name() in RAY_DAEMONS]
        assert {p.name() for p in daemons} == set(RAY_DAEMONS), [p.name() for p in started]
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    output = "".join(lines)
    assert server.returncode in (0, 130), output
    assert f"http://127.0.0.1:{port}" in output
    time.sleep(2)
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after Ctrl-C: {[(p.pid, p.name()) for p in left]}"


def test_on_an_existing_cluster_it_deploys_and_returns(tiny_model_dir, ray_cluster):
    port = free_port()
    env = ray_cluster.driver_env()
    result = subprocess.run([RAYDPO, "serve", str(tiny_model_dir), "--port", str(port)], env=env,
                            capture_output=True, text=True, timeout=600)
    try:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"deployed to the cluster at {ray_cluster.gcs_address}" in result.stdout
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [tiny_model_dir.name]  # served after the command returned
    finally:  # Serve off the shared head again, the head itself left running
        shutdown = "import ray; from ray import serve; ray.init(); serve.shutdown()"
        subprocess.run([sys.executable, "-c", shutdown], env=env, capture_output=True, timeout=300)
    assert ray_cluster.process.poll() is None


def test_generate_writes_an_answer_per_prompt_in_order(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hello", "id": 1},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "id": 2},
        {"prompt": "The quick brown fox", "id": 3}]) + "\n")
    out = tmp_path / "answers.jsonl"
    result = subprocess.run([RAYDPO, "generate", str(tiny_model_dir), str(prompts), "--out", str(out),
                             "--max-new-tokens", "5", "--batch-size", "2"], env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert all(r["new_tokens"] <= 5 and isinstance(r["prediction"], str) for r in rows)
    assert "wrote 3 answers" in result.stdout
