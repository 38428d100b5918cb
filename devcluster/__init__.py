"""A development Kubernetes cluster without Docker: a real control plane and real nodes built from source.

`python -m devcluster up|down|status` (what `make cluster-up`/`cluster-down` run), `devcluster.up()` /
`attach()` / `down()` from Python, and the pytest fixtures in tests/fixtures/cluster.py. See
docs/dev-cluster.md for what is real, what is not, and why. `devcluster.images` builds the container images
(product and infrastructure) without Docker or a registry; `devcluster.kueue` starts Kueue next to the control plane.
"""

from devcluster.cluster import DevCluster
from devcluster.launcher import attach, down, up

__all__ = ["DevCluster", "attach", "down", "up"]
