"""The worker image, the rendered RayClusters and this environment run one Ray version: Ray refuses nodes of
another version, and a driver of another version cannot talk to the cluster."""
import re
from pathlib import Path

import ray

from cluster import kuberay

ROOT = Path(__file__).resolve().parents[2]


def test_one_ray_version_everywhere():
    dockerfile = (ROOT / "Dockerfile").read_text()
    (image_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    (base,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)
    (pinned,) = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert image_version == kuberay.RAY_VERSION == pinned == ray.__version__
    # Ray's image of that version, for this Python, the GPU variant by default
    assert base == "rayproject/ray:${RAY_VERSION}-py311-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
