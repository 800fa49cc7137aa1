"""Whether NVIDIA apex can run here: one probe for its fused optimizers and its SyncBatchNorm.

apex is not on the package index (the NGC container builds it); a Python-only build, the unrelated PyPI 'apex',
or a build whose CUDA extensions fail to load must all read as "absent", so the callers fall back or say so.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load_apex(module: str, extension: str) -> ModuleType | None:
    """``apex.<module>`` when it and apex's compiled ``extension`` import, else None."""
    try:
        loaded = importlib.import_module(f"apex.{module}")
        importlib.import_module(extension)
    except Exception:  # ImportError, or a build whose extensions fail to load (OSError, RuntimeError, ...)
        return None
    return loaded
