"""Type-check the package and check its import contracts as it is installed: ssltrain with kernels/ and launch/
inside it. The source tree keeps those two at the top level (pyproject maps them to ssltrain.kernels and
ssltrain.launch), which neither mypy nor import-linter can follow, so both run on a copy laid out as installed
(``.lint-tree/``, rebuilt each time; mypy's cache stays valid because the path does not change).

    python tools/lint_package.py            # mypy, then import-linter (.importlinter); exit 1 if either fails
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".lint-tree"
MOVED = {"kernels": "ssltrain/kernels", "launch": "ssltrain/launch"}  # source folder -> installed location


def build_tree() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "ssltrain", TREE / "ssltrain", ignore=ignore)
    for source, installed in MOVED.items():
        shutil.copytree(ROOT / source, TREE / installed, ignore=ignore)


def source_path(line: str) -> str:
    """A mypy line's path in the copy -> the file in the source tree."""
    for source, installed in MOVED.items():
        line = line.replace(f"{installed}/", f"{source}/")
    return line


def mypy() -> int:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "ssltrain",
        ],
        cwd=TREE,
        capture_output=True,
        text=True,
    )
    for line in (done.stdout + done.stderr).splitlines():
        print(source_path(line))
    return done.returncode


def import_contracts() -> int:
    # The editable install's finder resolves ssltrain to the source tree, where kernels/ and launch/ are missing.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, str(TREE))
    for name in [m for m in sys.modules if re.match(r"ssltrain(\.|$)", m)]:
        del sys.modules[name]
    importlib.import_module("ssltrain")  # lint-imports locates the package through the imported one
    from importlinter.cli import lint_imports

    return lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)


def main() -> int:
    build_tree()
    failed = mypy() != 0
    failed |= import_contracts() != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
