import pytest

from cluster.placement import placement_for
from core.errors import ConfigError


@pytest.mark.parametrize("replicas, gpus_per_node, nodes, expected", [
    # CPU: one worker per replica; spread over nodes when there are several, packed on a single machine
    (2, 0, 3, ("SPREAD", 2, {"CPU": 1})),
    (2, 0, 1, ("PACK", 2, {"CPU": 1})),
    (1, 0, 4, ("PACK", 1, {"CPU": 1})),      # a single worker has nothing to spread from
    # one GPU per node: a replica is a node and its one worker
    (4, 1, 4, ("SPREAD", 4, {"GPU": 1})),
    # 8 GPUs per node: 2 replicas = 16 workers, packed so that each node holds 8
    (2, 8, 2, ("PACK", 16, {"GPU": 1})),
    (3, 4, 1, ("PACK", 12, {"GPU": 1})),
])
def test_placement_for(replicas, gpus_per_node, nodes, expected):
    assert placement_for(replicas, gpus_per_node, nodes) == expected


def test_zero_replicas_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 1"):
        placement_for(0, 0, 1)
