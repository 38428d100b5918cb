"""The process node: a home-made kubelet + scheduler that runs pods as local processes (first-round stand-in).

It runs on devcluster's control plane for the e2e suite that has not moved to the real node yet
(devcluster.realnode); `python -m tests.devcluster up|down` starts/stops such a cluster. Retired once the
e2e tests run on the real node.
"""

from tests.devcluster.cluster import ProcessCluster, attach, default_nodes, down, up
from tests.devcluster.node import NodeSpec

__all__ = ["NodeSpec", "ProcessCluster", "attach", "default_nodes", "down", "up"]
