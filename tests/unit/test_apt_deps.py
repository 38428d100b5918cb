"""hack/apt-deps.sh installs every Debian tool the dev cluster's image code runs: on a fresh machine `make images`
failed in `podman save` (podman was used but never installed)."""

from __future__ import annotations

import re

from devcluster.binaries import REPO_ROOT

# Debian package of each command devcluster runs by name.
PACKAGE_OF = {"buildah": "buildah", "podman": "podman", "debootstrap": "debootstrap", "runc": "runc"}


def _packages() -> set[str]:
    script = (REPO_ROOT / "hack" / "apt-deps.sh").read_text()
    match = re.search(r"^PACKAGES=\((.*?)\)", script, re.S | re.M)
    assert match, "no PACKAGES=(...) in hack/apt-deps.sh"
    return set(match.group(1).split())


def _commands_run(source: str) -> set[str]:
    return set(re.findall(r'\[\s*"(' + "|".join(PACKAGE_OF) + r')"', source))


def test_every_tool_the_image_code_runs_is_installed_by_apt_deps() -> None:
    used = _commands_run((REPO_ROOT / "devcluster" / "images.py").read_text())
    assert {"buildah", "podman"} <= used  # the scan sees what it is meant to see
    assert {PACKAGE_OF[c] for c in used} <= _packages()
