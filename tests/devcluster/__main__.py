"""`python -m tests.devcluster up|down|status`: a cluster whose nodes are the process node (real nodes: devcluster)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from devcluster.binaries import REPO_ROOT
from tests.devcluster.cluster import attach, down, up

DEFAULT_STATE = REPO_ROOT / ".cluster-process"


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it."""
    parser = argparse.ArgumentParser(prog="python -m tests.devcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="default: <repo>/.cluster-process")
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            running = attach(args.state_dir)
        except (OSError, RuntimeError, ValueError):
            pass
        else:
            print(
                "dev cluster already running (stop it with: python -m tests.devcluster down)\n"
                f"export KUBECONFIG={running.kubeconfig}"
            )
            return 0
        t0 = time.monotonic()
        cluster = up(args.state_dir)
        print(f"dev cluster ready in {time.monotonic() - t0:.1f}s")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"pods reach host services at {cluster.gateway_ip}; stop with: python -m tests.devcluster down")
        return 0
    if args.command == "down":
        down(args.state_dir)
        return 0
    try:
        cluster = attach(args.state_dir)
    except (OSError, RuntimeError) as e:
        print(f"not running: {e}")
        return 1
    print(cluster.kubectl("get", "nodes", "-o", "wide").stdout)
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
