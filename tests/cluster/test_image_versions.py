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


def test_the_gpu_image_prebuilds_fused_adam():
    """DeepSpeed's FusedAdam is compiled into the image (for the named GPU architectures) and checked to import,
    not JIT-compiled by every worker at start-up (DS_BUILD_OPS=0 alone left it to the JIT)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG DS_BUILD_FUSED_ADAM=1$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_CUDA_ARCH_LIST=\"[0-9.;]+\"$", dockerfile, re.M)
    install = next(line for line in dockerfile.splitlines() if "deepspeed==" in line)
    before = dockerfile[:dockerfile.index(install) + len(install)]
    assert "DS_BUILD_FUSED_ADAM=${DS_BUILD_FUSED_ADAM}" in before.splitlines()[-2]
    assert "import deepspeed.ops.adam.fused_adam_op" in dockerfile
