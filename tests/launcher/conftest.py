"""Fixtures the launcher's tests share."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def schemas(shared):
    """KubeRay's CRD schemas in ../shared (RayJob, RayCluster, RayService); the test skips with the path without them."""
    path = shared / "k8s-schemas" / "kuberay-v1.7.0"
    needed = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "ray.io_rayservices.yaml")
    if not all((path / name).is_file() for name in needed):
        pytest.skip(f"KubeRay CRD schemas not found at {path}")
    return path
