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
# Any key holding only integers (a counter) is left out of the loss panel too, listed here or not: loss terms are
# floats.
NON_LOSS = {
    "step",
    "epoch",
    "time_s",
    "lr",
    "img_per_s",
    "img_per_s_wall",
    "data_wait_s",
    "data_skipped",
    "data_shards_skipped",
    "nonfinite_steps",
    "grad_norm",
    "weight_norm",
    "weight_decay",
    "momentum",
    "teacher_temperature",
    "mem_gb",
    "max_mem_gb",
}
NORMS = ("grad_norm", "weight_norm")
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


def loss_keys(train: Sequence[dict[str, Any]]) -> list[str]:
    """The loss and its terms: numeric keys that are neither the loop's bookkeeping, nor monitors, nor counters
    (keys holding only integers), the total first."""

    def counter(key: str) -> bool:
        values = [r[key] for r in train if _number(r.get(key)) is not None]
        return all(isinstance(v, int) for v in values)

    keys = [
        k
        for k in numeric_keys(train)
        if k not in NON_LOSS and not k.startswith((*MONITOR_PREFIXES, ONLINE_PREFIX)) and not counter(k)
    ]
    return sorted(keys, key=lambda k: (k != "loss", k))


def plot_loss(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    keys = loss_keys(train)
    if not keys:
        return Plot("loss", "Loss terms", None, "no training records with a loss in metrics.jsonl")
    return Plot("loss", "Loss terms", _line_panels(train, keys, out_dir / "loss.png", "Loss and its terms"))


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "hours"
    return (60.0, "minutes") if seconds >= 3 * 60 else (1.0, "seconds")


def plot_loss_time(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    """The loss against wall-clock time (``time_s``: seconds since the run started, resumes included): what a
    change of speed bought, which a loss-per-step curve hides."""
    title = "Loss over wall-clock time"
    points = [
        (t, v)
        for r in train
        if (t := _number(r.get("time_s"))) is not None and (v := _number(r.get("loss"))) is not None
    ]
    if not points:
        return Plot("loss_time", title, None, "no time_s with a loss in metrics.jsonl (written by newer trainers)")
    scale, unit = _time_unit(max(t for t, _ in points))
    fig, (ax,) = _figure(1, width=6.0, height=3.6)
    ax.plot([t / scale for t, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
    ax.set_xlabel(f"wall-clock time since the start ({unit}, resumes included)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    return Plot("loss_time", title, _save(fig, out_dir / "loss_time.png"))


def plot_norms(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    """Gradient norm (before clipping) and weight norm over steps: spikes, a vanishing gradient, weights that grow
    without bound."""
    title = "Gradient and weight norms"
    keys = [k for k in NORMS if series(train, k)[0]]
    if not keys:
        return Plot("norms", title, None, "no grad_norm or weight_norm in metrics.jsonl (written by newer trainers)")
    return Plot("norms", title, _line_panels(train, keys, out_dir / "norms.png", title, logy=["grad_norm"]))


def plot_lr(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    if not series(train, "lr")[0]:
        return Plot("lr", "Learning rate", None, "no lr in metrics.jsonl")
    return Plot("lr", "Learning rate", _line_panels(train, ["lr"], out_dir / "lr.png", "Learning rate (global batch)"))


def plot_throughput(train: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    keys = [k for k in ("img_per_s", "img_per_s_wall", "data_wait_s") if series(train, k)[0]]
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


PROBE_TITLE = "Probes over steps"


def eval_top1(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[float, float]]]:
    """{probe label: {backbone: {step: top-1}}} of the offline eval records (``ssltrain eval``), kNN by k then
    linear; an eval repeated at a step keeps its last figure."""
    out: dict[str, dict[str, dict[float, float]]] = {}
    for r in records:
        top1, step = _number(r.get("top1")), _number(r.get("step"))
        if r.get("eval") not in ("knn", "linear") or top1 is None or step is None:
            continue
        label = f"kNN k={r['k']}" if r["eval"] == "knn" else "linear"
        out.setdefault(label, {}).setdefault(str(r.get("backbone", "ssl")), {})[step] = top1

    def order(label: str) -> tuple[int, int]:
        return (0, int(label.split("=")[1])) if label.startswith("kNN") else (1, 0)

    return {label: out[label] for label in sorted(out, key=order) if out[label].get("ssl")}


def _last(values: dict[float, float]) -> float | None:
    return values[max(values)] if values else None


def _probe_bars(ax: Any, evals: dict[str, dict[str, dict[float, float]]], step: float) -> None:
    """One eval: a bar of SSL top-1 per probe with its figure, the random-init figure as a dashed line across it."""
    labels = list(evals)
    ssl = [evals[p]["ssl"][step] for p in labels]
    bars = ax.bar(range(len(labels)), ssl, width=0.6, color="tab:blue", label=f"SSL (step {step:g})")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in ssl], padding=2, fontsize=8)
    first = True
    for i, p in enumerate(labels):
        base = _last(evals[p].get("random", {}))
        if base is None:
            continue
        ax.hlines(
            base,
            i - 0.42,
            i + 0.42,
            colors="black",
            linestyles="--",
            linewidth=2,
            label="random init" if first else "_nolegend_",
        )
        ax.annotate(
            f"random {base:.3f}",
            (i, base),
            xytext=(0, -4),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.85},
        )
        first = False
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.3)
    ax.set_title(f"offline probes at step {step:g} (ssltrain eval), top-1", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def _probe_lines(ax: Any, evals: dict[str, dict[str, dict[float, float]]]) -> None:
    """Several evals: SSL top-1 over steps, one colour per probe; random init as a dashed line of that colour."""
    for i, (label, by_backbone) in enumerate(evals.items()):
        colour = f"C{i % 10}"
        points = sorted(by_backbone["ssl"].items())
        ax.plot(*zip(*points), marker="o", color=colour, label=f"{label} (SSL)")
        base = _last(by_backbone.get("random", {}))
        if base is not None:
            ax.axhline(base, color=colour, linestyle="--", linewidth=1, alpha=0.8)
    if any("random" in b for b in evals.values()):
        ax.plot([], [], color="gray", linestyle="--", label="random init (same colour)")
    ax.set_title("offline probes (ssltrain eval), top-1", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="lower right")


def plot_probes(records: Sequence[dict[str, Any]], out_dir: Path) -> Plot:
    """Online probes (``online_*`` in training records) over steps, and the offline evals: bars when there is one
    eval, lines over steps when there are several, the random-init backbone as a dashed reference line."""
    train = training_records(records)
    online = [k for k in numeric_keys(train) if k.startswith(ONLINE_PREFIX) and k.endswith(("top1", "top5"))]
    evals = eval_top1(records)
    if not online and not evals:
        return Plot(
            "probes",
            PROBE_TITLE,
            None,
            "no online probe (online_*) or eval records in metrics.jsonl: run `ssltrain eval` to add some",
        )
    fig, axes = _figure((1 if online else 0) + (1 if evals else 0), width=6.0, height=3.8, max_cols=2)
    ax_iter = iter(axes)
    if online:
        ax = next(ax_iter)
        for k in online:
            xs, ys = series(train, k)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
        ax.set_title("online probes (training loop)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    note = ""
    if evals:
        ax = next(ax_iter)
        steps = {s for b in evals.values() for s in b["ssl"]}
        if len(steps) == 1:
            _probe_bars(ax, evals, steps.pop())
            note = "Offline probes: SSL top-1 as bars, the random-init backbone as a dashed line across each bar."
        else:
            _probe_lines(ax, evals)
            note = "Offline probes: SSL top-1 over steps, the random-init backbone as a dashed line of the same colour."
        top = max(v for b in evals.values() for values in b.values() for v in values.values())
        ax.set_ylim(0, min(1.05, max(0.1, 1.15 * top)))
        ax.set_ylabel("top-1")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Probe accuracy")
    return Plot("probes", PROBE_TITLE, _save(fig, out_dir / "probes.png"), note)


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
        plot_loss_time(train, out_dir),
        plot_lr(train, out_dir),
        plot_norms(train, out_dir),
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
