"""The run report's PNG plots, drawn from ``metrics.jsonl`` records and ``spectrum.json``.

matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``): no pyplot, so no global backend
switch, no display needed, and nothing leaks between plots. Each function returns a :class:`Plot` whose ``path``
is None, with a ``note`` saying why, when the run has nothing to draw for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Plot", "plot_all", "training_records", "series"]

# Keys of training records that are not loss terms (the training loop's own bookkeeping); add new loop keys here.
NON_LOSS = {
    "step",
    "epoch",
    "lr",
    "img_per_s",
    "data_wait_s",
    "data_skipped",
    "nonfinite_steps",
    "grad_norm",
    "weight_decay",
    "momentum",
    "teacher_temperature",
    "mem_gb",
    "max_mem_gb",
}
MONITOR_PREFIXES = ("emb_", "feat_")
ONLINE_PREFIX = "online_"
DPI = 100


@dataclass
class Plot:
    name: str  # file stem, e.g. "loss"
    title: str
    path: Path | None  # None: skipped
    note: str = ""  # why it was skipped, or a caption


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def training_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the training loop (no "eval" key), in step order."""
    return sorted((r for r in records if "eval" not in r and "step" in r), key=lambda r: r["step"])


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that hold a finite number for it."""
    xs, ys = [], []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            xs.append(float(r["step"]))
            ys.append(v)
    return xs, ys


def numeric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Keys holding a number in at least one record, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in seen and _number(v) is not None:
                seen[k] = None
    return list(seen)


def _figure(panels: int, width: float = 4.2, height: float = 3.0, max_cols: int = 3) -> tuple[Figure, list[Any]]:
    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path


def _line_panels(
    records: Sequence[dict[str, Any]],
    keys: Sequence[str],
    out: Path,
    title: str,
    thresholds: dict[str, float] | None = None,
    logy: Sequence[str] = (),
) -> Path:
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        xs, ys = series(records, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        if thresholds and key in thresholds:
            ax.axhline(
                thresholds[key], color="tab:red", linestyle="--", linewidth=1, label=f"warn < {thresholds[key]:g}"
            )
            ax.legend(fontsize=8)
        if key in logy and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


def plot_loss(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    keys = [
        k
        for k in numeric_keys(train)
        if k not in NON_LOSS and not k.startswith(MONITOR_PREFIXES) and not k.startswith(ONLINE_PREFIX)
    ]
    keys = sorted(keys, key=lambda k: (k != "loss", k))  # the total first
    if not keys:
        return Plot("loss", "Loss terms", None, "no training records with a loss in metrics.jsonl")
    return Plot("loss", "Loss terms", _line_panels(train, keys, out_dir / "loss.png", "Loss and its terms"))


def plot_lr(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    if not series(train, "lr")[0]:
        return Plot("lr", "Learning rate", None, "no lr in metrics.jsonl")
    return Plot("lr", "Learning rate", _line_panels(train, ["lr"], out_dir / "lr.png", "Learning rate (global batch)"))


def plot_throughput(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    keys = [k for k in ("img_per_s", "data_wait_s") if series(train, k)[0]]
    if not keys:
        return Plot("throughput", "Throughput", None, "no img_per_s in metrics.jsonl")
    return Plot(
        "throughput",
        "Throughput",
        _line_panels(train, keys, out_dir / "throughput.png", "Throughput (images/s) and data wait (s per window)"),
    )


def plot_monitors(train: Sequence[dict[str, Any]], out_dir: Path, thresholds: dict[str, float]) -> Plot:
    keys = [k for k in numeric_keys(train) if k.startswith(MONITOR_PREFIXES)]
    if not keys:
        return Plot("monitors", "Collapse monitors", None, "no embedding monitors (emb_*) in metrics.jsonl")
    return Plot(
        "monitors",
        "Collapse monitors",
        _line_panels(
            train,
            keys,
            out_dir / "monitors.png",
            "Collapse monitors of the training embeddings",
            thresholds=thresholds,
            logy=[k for k in keys if k.endswith("rankme")],
        ),
    )


def plot_probes(records: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    """Online probe keys (``online_*`` in training records) and offline eval records over steps, one line per
    (probe, backbone, k)."""
    train = training_records(records)
    online = [k for k in numeric_keys(train) if k.startswith(ONLINE_PREFIX)]
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted((r for r in records if r.get("eval") in ("knn", "linear")), key=lambda r: r.get("step", 0)):
        top1, step = _number(r.get("top1")), _number(r.get("step"))
        if top1 is None or step is None:
            continue
        label = f"{r['eval']}" + (f" k={r['k']}" if "k" in r else "") + f" ({r.get('backbone', 'ssl')})"
        xs, ys = lines.setdefault(label, ([], []))
        xs.append(step)
        ys.append(top1)
    if not online and not lines:
        return Plot(
            "probes",
            "Probes over steps",
            None,
            "no online probe (online_*) or eval records in metrics.jsonl: run `ssltrain eval` to add some",
        )
    panels = (1 if online else 0) + (1 if lines else 0)
    fig, axes = _figure(panels, width=6.0, height=3.6, max_cols=2)
    ax_iter = iter(axes)
    if online:
        ax = next(ax_iter)
        for k in online:
            xs, ys = series(train, k)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
        ax.set_title("online probes (training loop)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if lines:
        ax = next(ax_iter)
        for label, (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, marker="o", linestyle="--" if "(random)" in label else "-", label=label)
        ax.set_title("offline probes (ssltrain eval), top-1", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Probe accuracy over steps")
    return Plot("probes", "Probes over steps", _save(fig, out_dir / "probes.png"))


def plot_spectrum(spec: dict[str, Any] | None, out_dir: Path) -> Plot:
    """Singular values (stds along principal axes), normalised by the largest, on a log scale: a curve that drops
    to ~0 after r values is a representation living in r dimensions."""
    kinds = [k for k in ("features", "embeddings") if spec and any(k in spec.get(b, {}) for b in ("ssl", "random"))]
    if spec is None or not kinds:
        return Plot(
            "spectrum",
            "Singular-value spectrum",
            None,
            "no spectrum.json: run `ssltrain eval`, or give the run eval.val / data.train shards",
        )
    fig, axes = _figure(len(kinds), width=5.5, height=3.8, max_cols=2)
    for ax, kind in zip(axes, kinds):
        for backbone, style in (("ssl", "-"), ("random", "--")):
            values = spec.get(backbone, {}).get(kind)
            if not values:
                continue
            top = max(values[0], 1e-30)
            ys = [max(v / top, 1e-12) for v in values]
            label = f"step {spec.get('step')}" if backbone == "ssl" else "random init"
            ax.plot(range(1, len(ys) + 1), ys, style, label=label)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("index (descending)")
        ax.set_ylabel("singular value / largest")
        ax.set_title(f"{kind} ({len(spec.get('ssl', {}).get(kind, []))} values)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Spectrum of the centred val representation at the last checkpoint (step {spec.get('step')})")
    return Plot("spectrum", "Singular-value spectrum", _save(fig, out_dir / "spectrum.png"))


def plot_all(
    records: Sequence[dict[str, Any]], spec: dict[str, Any] | None, out_dir: Path, thresholds: dict[str, float]
) -> list[Plot]:
    """Every plot of the report, in report order; stale PNGs of skipped plots are removed."""
    train = training_records(records)
    plots = [
        plot_loss(train, out_dir),
        plot_lr(train, out_dir),
        plot_throughput(train, out_dir),
        plot_monitors(train, out_dir, thresholds),
        plot_probes(records, out_dir),
        plot_spectrum(spec, out_dir),
    ]
    for p in plots:
        stale = out_dir / f"{p.name}.png"
        if p.path is None and stale.exists():
            stale.unlink()
    return plots
