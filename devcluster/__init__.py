"""Development cluster tooling: a real control plane and node built from upstream sources, and the images they run.

`devcluster.images` builds the container images (product and infrastructure) without Docker or a registry.
"""
