"""Real servers (S3, Prometheus) that tests and benchmarks start as local subprocesses.

Kept apart from the pytest fixtures so a benchmark script or a REPL can start the same servers with the same
settings: ``with S3Server.start(workdir=...) as s3: ...``. Nothing here imports pytest.
"""

from tests.servers.prometheus import PrometheusServer, Sample, Target
from tests.servers.s3 import S3Server

__all__ = ["PrometheusServer", "S3Server", "Sample", "Target"]
