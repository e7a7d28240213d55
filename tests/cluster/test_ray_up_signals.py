"""`raydpo launch` keeps its promises when stopped from outside: the Ray token file is private from its first byte,
and SIGTERM (what `timeout` sends) brings the cluster down as Ctrl-C does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.ray_up import ensure_local_token

ROOT = Path(__file__).resolve().parents[2]


def test_the_token_file_is_created_private(tmp_path, monkeypatch):
    """With every chmod disabled, only a file created 0600 ends up 0600 (write-then-chmod left it 0644 for a moment,
    and a reader that opened it then keeps reading what is written after)."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    monkeypatch.setattr(os, "chmod", lambda path, mode, **kwargs: None)
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: None)
    old = os.umask(0o022)
    try:
        token = tmp_path / "ray" / "auth_token"
        ensure_local_token({"file_mounts": {"~/.ray/auth_token": str(token)}}, {"RAY_AUTH_TOKEN": "tok-123"})
    finally:
        os.umask(old)
    assert token.read_text() == "tok-123"
    assert oct(token.stat().st_mode & 0o777) == "0o600"


SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import cluster.ray_up as ray_up

marker = Path(sys.argv[2])

def fake_cli(args, env, log=None, capture=False, timeout=None):
    if log is not None:
        with open(log, "a") as f:
            f.write(" ".join(args) + "\n")
    if args[0] == "up":
        marker.with_suffix(".up").write_text("up")
        time.sleep(60)  # `ray up` still running when SIGTERM comes
    if args[0] == "down":
        marker.write_text(" ".join(args))
    class Done: returncode = 0; stdout = ""; stderr = ""
    return Done()

ray_up.ray_cli = fake_cli
config = {"cluster_name": "c", "provider": {"type": "aws"}, "file_mounts": {}}
try:
    ray_up.run_on_new_cluster(config, entrypoint="raydpo train r.yaml", working_dir=Path("."), replicas=1,
                              keep_cluster=False, log_dir=Path(sys.argv[3]), say=print)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
"""


def test_sigterm_brings_the_cluster_down(tmp_path):
    marker = tmp_path / "down"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT), str(marker), str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not marker.with_suffix(".up").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert marker.read_text().startswith("down -y"), out  # bring_down ran `ray down -y CLUSTER.yaml`
    assert "interrupted" in out
