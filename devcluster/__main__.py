"""`python -m devcluster up|down|status`: the developer entry points behind make cluster-up/down."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from devcluster.binaries import REPO_ROOT
from devcluster.launcher import attach, down, up

DEFAULT_STATE = REPO_ROOT / ".cluster"


def _up(state_dir: Path, *, nodes: int, kwok: bool) -> int:
    try:
        running = attach(state_dir)
    except (OSError, RuntimeError, ValueError):
        pass
    else:
        print(f"dev cluster already running (stop it with: make cluster-down)\nexport KUBECONFIG={running.kubeconfig}")
        return 0
    t0 = time.monotonic()
    cluster = up(state_dir, nodes=nodes, kwok=kwok)
    ready = cluster.timings().get("up_to_node_ready")
    if ready is not None:
        print(f"nodes Ready {ready:.1f}s after start")
    print(f"dev cluster ready in {time.monotonic() - t0:.1f}s")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"kubectl: {cluster.binaries.kubectl}; stop with: make cluster-down")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it."""
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="default: <repo>/.cluster")
    parser.add_argument("--nodes", type=int, default=1, help="real nodes to start (default 1)")
    parser.add_argument("--kwok", action="store_true", help="start the kwok controller up front")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _up(args.state_dir, nodes=args.nodes, kwok=args.kwok)
    if args.command == "down":
        down(args.state_dir)
        return 0
    try:
        cluster = attach(args.state_dir)
    except FileNotFoundError:
        print(f"no dev cluster in {args.state_dir} (start one with: make cluster-up)")
        return 1
    except (OSError, RuntimeError, ValueError) as e:
        print(f"not running: {e}")
        return 1
    print(cluster.kubectl("get", "nodes", "-o", "wide").stdout)
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
