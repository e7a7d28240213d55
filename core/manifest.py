"""manifest.json: every artifact of a run with its size and sha256, written last so its presence means done."""
from __future__ import annotations

import hashlib
import json

from core import storage

MANIFEST = "manifest.json"
SKIP_PREFIXES = ("ray_train/",)  # checkpoints: Ray Train's own run state tracks them


def sha256_of(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(uri: str) -> dict:
    fs, root = storage.filesystem_for(uri)
    root = root.rstrip("/")
    artifacts = []
    for path in sorted(fs.find(root)):
        relative = path[len(root) + 1:]
        if relative == MANIFEST or relative.startswith(SKIP_PREFIXES):
            continue
        artifacts.append({"path": relative, "size": fs.size(path), "sha256": sha256_of(fs, path)})
    return {"run_uri": uri, "artifacts": artifacts}


def write_manifest(uri: str) -> dict:
    manifest = build_manifest(uri)
    storage.write_bytes(uri.rstrip("/") + "/" + MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
