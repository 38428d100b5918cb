"""I/O layer: reconcile steps that talk to the API server (kubernetes_asyncio) and to the trainer."""
