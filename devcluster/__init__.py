"""Development cluster tooling: a real control plane and node built from upstream sources, the images they run, add-ons (Kueue).

`devcluster.images` builds the container images (product and infrastructure) without Docker or a registry.
"""
