"""pyproject lists packages explicitly (kernels/ installs as ssltrain.kernels): a new subpackage must be added there."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_installed() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(meta["packages"])
    mapping = meta.get("package-dir", {})
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ssltrain").rglob("__init__.py")}
    for package, directory in mapping.items():
        found |= {
            package + "".join("." + part for part in p.parent.relative_to(ROOT / directory).parts)
            for p in (ROOT / directory).rglob("__init__.py")
        }
    assert found == listed, (
        f"add to [tool.setuptools] packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    )
