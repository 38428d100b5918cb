"""The wheel a real install builds (`pip install .`, as both images do) contains every package of the source tree.

Why: the development virtualenv installs the project editable, which maps whole directories, so a subpackage left
out of pyproject.toml's explicit package list goes unnoticed until a real install. The operator image built from
the Dockerfile then failed at start: `ModuleNotFoundError: No module named 'finetune_operator.services'`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_in_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, directory in setuptools["package-dir"].items():
        root = ROOT / directory
        found |= {".".join([name, *init.parent.relative_to(root).parts]) for init in root.rglob("__init__.py")}
    assert found - set(setuptools["packages"]) == set(), "add these to [tool.setuptools] packages in pyproject.toml"
