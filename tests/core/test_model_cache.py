"""s3:// models in the shared cache (core/models.download_model -> core/storage.download_dir_once): several processes
of one node asking at once download once, and neither they nor a reader watching the folder ever see a partial file.
Against moto's S3 on 127.0.0.1 (tests/s3server.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.s3server import s3_server  # noqa: F401 - the session fixture

ROOT = Path(__file__).resolve().parents[2]

# Each child: imports first, waits for the start signal, then asks for the model and checks every file's hash at
# once (what from_pretrained would read). download_dir is wrapped to count real downloads.
DOWNLOADER = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from core import models, storage
real = storage.download_dir
def counted(*args, **kwargs):
    print("DOWNLOAD", flush=True)
    return real(*args, **kwargs)
storage.download_dir = counted
uri, go, expected = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
folder = models.download_model(uri)
got = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in expected}
print("RESULT " + json.dumps({"folder": str(folder), "ok": got == expected}), flush=True)
"""

# The watcher: until told to stop, every file it finds in the cache folder must already have its full size.
WATCHER = r"""
import json, sys, time
from pathlib import Path
folder, stop, sizes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
partial, seen = [], 0
while not stop.exists():
    if folder.is_dir():
        for name, size in sizes.items():
            path = folder / name
            if path.exists():
                seen += 1
                if path.stat().st_size != size:
                    partial.append([name, path.stat().st_size])
    time.sleep(0.002)
print("WATCH " + json.dumps({"partial": partial[:5], "seen": seen}), flush=True)
"""


def test_concurrent_downloads_share_one_copy_and_no_reader_sees_a_partial_file(s3_server, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    uri = s3_server.make_bucket("raydpo-model-cache") + "/models/tiny"
    files = {"model.safetensors": os.urandom(24 * 2**20), "config.json": b'{"model_type": "llama"}'}
    client = s3_server.client()
    for name, data in files.items():
        client.put_object(Bucket="raydpo-model-cache", Key=f"models/tiny/{name}", Body=data)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setenv("RAYDPO_CACHE", str(tmp_path / "cache"))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    go, stop = tmp_path / "go", tmp_path / "stop"

    from core import models
    target = models.resolved_location(uri)  # where download_model puts it, found without downloading
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, target, str(stop),
                                json.dumps({k: len(v) for k, v in files.items()})],
                               stdout=subprocess.PIPE, text=True, env=env)
    downloaders = [subprocess.Popen([sys.executable, "-c", DOWNLOADER, uri, str(go), json.dumps(expected)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                   for _ in range(4)]
    time.sleep(4)  # the children import core.models and s3fs, then wait for the signal
    go.touch()
    outputs = [p.communicate(timeout=180) for p in downloaders]
    stop.touch()
    watch = json.loads(watcher.communicate(timeout=30)[0].split("WATCH ", 1)[1])

    results = []
    for (out, err), process in zip(outputs, downloaders):
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert all(r["ok"] for r in results), results  # every process read complete, correct files
    assert {r["folder"] for r in results} == {target}
    assert sum(out.count("DOWNLOAD") for out, _ in outputs) == 1  # one download; the others waited on the lock
    assert watch["partial"] == [] and watch["seen"] > 0
    leftovers = sorted(p.name for p in Path(target).parent.iterdir())
    assert leftovers == sorted([Path(target).name, Path(target).name + ".lock"])  # no temporary folder left
