"""A real Kubernetes control plane plus a process node, for tests and local development without Docker.

Start with `python -m tests.devcluster up` (or `make cluster-up`), or the pytest fixtures in
`tests/fixtures/cluster.py`; see docs/dev-cluster.md for what is real and what is simulated.
"""

from tests.devcluster.cluster import DevCluster, attach, default_nodes, down, up
from tests.devcluster.node import NodeSpec

__all__ = ["DevCluster", "NodeSpec", "attach", "default_nodes", "down", "up"]
