"""Development cluster tooling: a real control plane and node built from upstream sources, and their images.

`devcluster.images` builds the container images (product and infrastructure) without Docker or a registry.
`devcluster.kueue` starts Kueue next to the control plane.
"""
