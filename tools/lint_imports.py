"""Check the import contracts of .importlinter on the package as installed: ssltrain with kernels/ and launch/
placed inside it (the source tree keeps them at the top level, mapped by pyproject's package-dir)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "ssltrain", Path(tmp) / "ssltrain", ignore=ignore)
        for sub in ("kernels", "launch"):
            shutil.copytree(ROOT / sub, Path(tmp) / "ssltrain" / sub, ignore=ignore)
        # the editable install's finder would resolve ssltrain to the source tree, without kernels/ and launch/
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, tmp)
        for name in [m for m in sys.modules if m == "ssltrain" or m.startswith("ssltrain.")]:
            del sys.modules[name]
        import importlib

        importlib.import_module("ssltrain")  # from the copy: lint-imports locates the package through it
        from importlinter.cli import lint_imports

        return lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)


if __name__ == "__main__":
    sys.exit(main())
