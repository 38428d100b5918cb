"""The tests still on the first-round process node (tests/devcluster): pods as local processes in network namespaces.

They need what only running pods give -- real Ray across pods, the chart's operator driving them, NetworkPolicy on
real sockets -- and run here until their real-node versions (tests/e2e, `real_cluster`) land; then this folder and
tests/devcluster go together. In this folder `cluster`, `namespace_factory` and `namespace` are the process node's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.devcluster.cluster import ProcessCluster
from tests.fixtures.cluster import namespaces_in


@pytest.fixture
def cluster(process_cluster: ProcessCluster) -> ProcessCluster:
    """The session's process-node cluster."""
    return process_cluster


@pytest.fixture
def namespace_factory(process_cluster: ProcessCluster, request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Fresh namespaces in the process-node cluster, deleted after the test."""
    yield from namespaces_in(process_cluster, request)
