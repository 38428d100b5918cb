"""The host kernel settings kubelet changes, recorded before the first node starts and put back after the last.

kubelet (protectKernelDefaults: false, the default) sets vm.overcommit_memory=1, kernel.panic=10 and
kernel.panic_on_oops=1 at start-up. These are not namespaced: they change the whole machine, as they do under
kind (privileged node containers). The alternative, protectKernelDefaults: true, makes kubelet refuse to
start unless the host already has those values. So the first real node of any dev cluster on the machine
records the values in /run/ftdevcluster, and the `down` of the last running real-node cluster writes them
back; in between, every dev cluster's kubelet sees what it expects.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from devcluster.network import CLAIMS, claimed_indexes

KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
RECORD = CLAIMS / "host-sysctls.json"
PROC_SYS = Path("/proc/sys")


def read() -> dict[str, str]:
    """Current values of the settings kubelet touches."""
    return {k: (PROC_SYS / k).read_text().strip() for k in KUBELET_SYSCTLS}


def record() -> None:
    """Remember the host's values unless a running cluster already did (call before a kubelet starts)."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(RECORD, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(read(), f)


def restore_if_last(me: Path, *, has_real_nodes: Callable[[Path], bool]) -> dict[str, str]:
    """Write the recorded values back if no other cluster with real nodes holds a claim; return what changed."""
    others = [owner for owner in claimed_indexes().values() if owner != me and has_real_nodes(owner)]
    if others or not RECORD.exists():
        return {}
    saved: dict[str, str] = json.loads(RECORD.read_text())
    changed = {k: v for k, v in saved.items() if (PROC_SYS / k).read_text().strip() != v}
    for key, value in changed.items():
        (PROC_SYS / key).write_text(value)
    RECORD.unlink(missing_ok=True)
    return changed
