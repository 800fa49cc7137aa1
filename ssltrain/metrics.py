"""Where numbers go: ``metrics.jsonl`` (one JSON object a line) and TensorBoard, kept consistent on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends training and eval records; on resume at step ``s`` it drops training records past ``s``.

    Those records were written by the interrupted run after its last checkpoint; the resumed run writes them again,
    so keeping both would draw two curves over the same steps. TensorBoard gets the same treatment (``purge_step``).
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        """``resume_step``: 0 starts a fresh log, s > 0 continues a resumed run, None appends (eval records)."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step == 0 and self.path.is_file():
            self.path.unlink()
        elif resume_step and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if "eval" in r or r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None) if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            prefix = f"eval/{record['eval']}/" if "eval" in record else "train/"
            for key, value in record.items():
                if key not in ("step", "eval") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
