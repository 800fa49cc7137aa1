"""``ssltrain sweep report runs/<sweep>``: every point in one table, sorted by a probe, and the plots that compare
them, as ``runs/<sweep>/report.md`` with PNGs in ``runs/<sweep>/report/``.

The table and plots read :mod:`ssltrain.launch.sweep.results` (the points' ``eval.json``, ``metrics.jsonl`` and
``point.json``), so the report can be rewritten at any time, also while points still run. Plots: a heatmap of the
probe for two swept axes (for more, one per pair with the best value over the other axes, and with exactly three
one panel per level of the third, e.g. per method); the probe against the levels for one axis, the random-init
backbone as a dashed line; the probe over steps of the best points. Axes Optuna samples from a range are drawn as
scatter plots instead of heatmaps, their values being all different.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltrain.core.files import write_atomic
from ssltrain.eval.report import plots_section
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.results import METRICS, PointRow, check_metric, collect, higher_is_better, metric, rank
from ssltrain.launch.sweep.space import Axis, SweepSpec, short_names

if TYPE_CHECKING:  # plots imports matplotlib: only when a report is written
    from ssltrain.eval.plots import Plot

__all__ = ["format_table", "write_report", "table_rows", "TABLE_PROBES"]

BEST_CURVES = 5  # points drawn in the probe-over-steps plot
PLOT_DIR = "report"
TABLE_PROBES = (("knn_top1", "kNN top-1 (SSL / random)"), ("linear_top1", "linear top-1 (SSL / random)"))


# ---------------------------------------------------------------- the table


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _wall(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _status(row: PointRow) -> str:
    return row.status if row.attempts <= 1 else f"{row.status} ({row.attempts} attempts)"


def _probe(sweep: SweepDir, probe: str | None) -> str:
    return check_metric(probe or sweep.spec().probe)


def table_rows(sweep: SweepDir, probe: str | None, rows: list[PointRow] | None = None) -> list[list[str]]:
    """The table as cells, header first, points best first by ``probe`` (the spec's when None): the swept values,
    kNN and linear top-1 as ``SSL / random``, the chosen figure when it is a gain, the last loss, the number of
    collapse warnings, wall time and status."""
    spec = sweep.spec()
    probe = _probe(sweep, probe)
    rows = collect(sweep) if rows is None else rows
    axes = _axis_names(spec, rows)
    short = short_names(axes)
    gain = probe.endswith("_gain")
    trials = any(r.trial is not None for r in rows)
    header = ["#", *(["trial"] if trials else []), *(short[a] for a in axes)]
    header += [title for _, title in TABLE_PROBES] + ([probe] if gain else []) + ["loss", "warnings", "wall", "status"]
    out = [header]
    for i, row in enumerate(rank(rows, probe), 1):
        cells = [str(i), *([str(row.trial) if row.trial is not None else "-"] if trials else [])]
        cells += [row.values.get(a, "-") for a in axes]
        cells += [f"{_fmt(row.ssl.get(p))} / {_fmt(row.random.get(p))}" for p, _ in TABLE_PROBES]
        cells += [_fmt(metric(row, probe), sign=True)] if gain else []
        warnings = str(len(row.warnings)) if row.eval_step is not None else "-"  # no eval.json: nothing to count
        cells += [_loss(row.loss), warnings, _wall(row.wall_s), _status(row)]
        out.append(cells)
    return out


def _counts(rows: Sequence[PointRow]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "running", "pending", "failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def format_table(sweep: SweepDir, probe: str | None = None) -> str:
    """The points as a plain-text table, best first by ``probe`` (default: the sweep's), unfinished ones last."""
    rows = collect(sweep)
    probe = _probe(sweep, probe)
    cells = table_rows(sweep, probe, rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    order = "best first" if higher_is_better(probe) else "lowest first"
    title = f"sweep {sweep.spec().name}: {len(rows)} points ({_counts(rows) or 'none recorded'}), by {probe}, {order}"
    return "\n".join([title, *lines])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(cells: list[list[str]]) -> list[str]:
    header, *body = cells
    lines = ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in line) + " |" for line in body]


# ---------------------------------------------------------------- axes and cells


def _is_number(label: str) -> bool:
    try:
        return math.isfinite(float(label))
    except ValueError:
        return False


def _axis_names(spec: SweepSpec, rows: Sequence[PointRow]) -> list[str]:
    """The spec's axes, then any axis only the points name (a spec that lost an axis keeps its points readable)."""
    names = [a.name for a in spec.axes]
    return names + sorted({k for r in rows for k in r.values} - set(names))


def _levels(axis: Axis | None, rows: Sequence[PointRow], name: str) -> list[str]:
    """An axis's level labels in the spec's order, then labels only the points have (numerically when they are
    numbers: Optuna's sampled values)."""
    spec_labels = axis.labels if axis is not None else []
    extra = {r.values[name] for r in rows if name in r.values} - set(spec_labels)
    ordered = sorted(extra, key=float) if all(_is_number(x) for x in extra) else sorted(extra)
    return spec_labels + ordered


def _best(rows: Sequence[PointRow], probe: str) -> PointRow | None:
    ranked = [r for r in rank(list(rows), probe) if r.done and metric(r, probe) is not None]
    return ranked[0] if ranked else None


def _cell_grid(
    rows: Sequence[PointRow], x: str, y: str, xs: list[str], ys: list[str], probe: str
) -> tuple[list[list[PointRow | None]], list[list[str]]]:
    """For each (y level, x level): the best point there over the other axes, and what to write where none has the
    figure (its points' statuses)."""
    best: list[list[PointRow | None]] = []
    empty: list[list[str]] = []
    for ly in ys:
        best.append([])
        empty.append([])
        for lx in xs:
            there = [r for r in rows if r.values.get(x) == lx and r.values.get(y) == ly]
            best[-1].append(_best(there, probe))
            statuses = sorted({r.status for r in there if not (r.done and metric(r, probe) is not None)})
            empty[-1].append("/".join(statuses) if statuses else "no point")
    return best, empty


# ---------------------------------------------------------------- plots


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "axis"


def _label(probe: str) -> str:
    return METRICS[probe][0]


def _norm(values: list[float]) -> Any:
    from matplotlib.colors import Normalize

    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    return Normalize(lo, hi)


def _cmap(probe: str) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis" if higher_is_better(probe) else "viridis_r"]  # bright is good either way


def _draw_heatmap(
    ax: Any,
    rows: Sequence[PointRow],
    x: str,
    y: str,
    xs: list[str],
    ys: list[str],
    probe: str,
    norm: Any,
    short: dict[str, str],
) -> Any:
    """One heatmap panel: the probe's value (and its gain over random init) in each cell, grey where none."""
    import numpy as np

    best, empty = _cell_grid(rows, x, y, xs, ys, probe)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, line in enumerate(best):
        for j, row in enumerate(line):
            if row is not None:
                grid[i, j] = metric(row, probe)
    cmap = _cmap(probe).with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
    gain_of = {"knn_top1": "knn_gain", "linear_top1": "linear_gain"}.get(probe)
    for i, line in enumerate(best):
        for j, row in enumerate(line):
            if row is None:
                ax.text(j, i, empty[i][j], ha="center", va="center", fontsize=7, color="dimgray")
                continue
            value = float(grid[i, j])
            r, g, b, _ = cmap(norm(value))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            text = f"{value:.4g}" if probe == "loss" else f"{value:+.3f}" if probe.endswith("_gain") else f"{value:.3f}"
            gain = metric(row, gain_of) if gain_of else None
            if gain is not None:
                text += f"\n({gain:+.3f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(xs)), xs, fontsize=8, rotation=30 if max(map(len, xs)) > 6 else 0)
    ax.set_yticks(range(len(ys)), ys, fontsize=8)
    ax.set_xlabel(short[x])
    ax.set_ylabel(short[y])
    return image


def _values(rows: Sequence[PointRow], probe: str) -> list[float]:
    return [v for r in rows if r.done and (v := metric(r, probe)) is not None]


def _pair_order(a: str, b: str, levels: dict[str, list[str]]) -> tuple[str, str]:
    """(x, y): the axis with more levels across, ties in spec order."""
    return (b, a) if len(levels[b]) > len(levels[a]) else (a, b)


def _heatmaps(spec: SweepSpec, rows: Sequence[PointRow], grid_axes: list[str], probe: str, out_dir: Path) -> list[Plot]:
    from ssltrain.eval.plots import Plot, _figure, _save

    by_name = {a.name: a for a in spec.axes}
    levels = {a: _levels(by_name.get(a), rows, a) for a in grid_axes}
    short = short_names(grid_axes)
    norm = _norm(_values(rows, probe))
    gain_note = " In brackets: the gain over the random-init backbone." if probe in ("knn_top1", "linear_top1") else ""
    plots = []
    others_all = len(grid_axes) > 2
    for a, b in itertools.combinations(grid_axes, 2):
        x, y = _pair_order(a, b, levels)
        others = [short[o] for o in grid_axes if o not in (x, y)]
        fig, (ax,) = _figure(1, width=1.1 * len(levels[x]) + 3.0, height=0.7 * len(levels[y]) + 2.0)
        image = _draw_heatmap(ax, rows, x, y, levels[x], levels[y], probe, norm, short)
        fig.colorbar(image, ax=ax, label=probe)
        title = f"{probe}: {short[y]} x {short[x]}"
        if others_all:
            title += f", best over {', '.join(others)}"
        ax.set_title(title, fontsize=10)
        name = f"heatmap_{_safe(short[y])}_{_safe(short[x])}"
        note = f"{_label(probe)} for each pair of levels"
        note += f", the best point over {', '.join(others)}." if others_all else "."
        plots.append(Plot(name, title, _save(fig, out_dir / f"{name}.png"), note + gain_note))
    if len(grid_axes) == 3:
        plots.append(_faceted(rows, grid_axes, levels, probe, norm, out_dir, gain_note))
    return plots


def _faceted(
    rows: Sequence[PointRow],
    grid_axes: list[str],
    levels: dict[str, list[str]],
    probe: str,
    norm: Any,
    out_dir: Path,
    gain_note: str,
) -> Plot:
    """Three axes: a heatmap of two for each level of the third, the categorical axis with fewest levels (a method,
    a backbone) rather than a numeric one, so nothing is hidden by taking a best."""
    from ssltrain.eval.plots import Plot, _figure, _save

    facet = min(grid_axes, key=lambda a: (all(_is_number(v) for v in levels[a]), len(levels[a]), grid_axes.index(a)))
    a, b = (g for g in grid_axes if g != facet)
    x, y = _pair_order(a, b, levels)
    short = short_names(grid_axes)
    panels = levels[facet]
    fig, axes = _figure(
        len(panels), width=1.1 * len(levels[x]) + 2.0, height=0.7 * len(levels[y]) + 2.0, max_cols=min(3, len(panels))
    )
    image = None
    for ax, level in zip(axes, panels):
        image = _draw_heatmap(
            ax, [r for r in rows if r.values.get(facet) == level], x, y, levels[x], levels[y], probe, norm, short
        )
        ax.set_title(f"{short[facet]} = {level}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, label=probe)
    title = f"{probe}: {short[y]} x {short[x]} for each {short[facet]}"
    fig.suptitle(title)
    name = f"heatmap_{_safe(short[y])}_{_safe(short[x])}_by_{_safe(short[facet])}"
    note = f"{_label(probe)}: one panel per {short[facet]}, one colour scale." + gain_note
    return Plot(name, title, _save(fig, out_dir / f"{name}.png"), note)


def _numeric_x(axis: Axis | None, labels: list[str]) -> tuple[bool, bool]:
    """(plot against the numbers, on a log scale): for Optuna's sampled axes; grid levels stay categorical."""
    if axis is None or axis.search is None or not all(_is_number(v) for v in labels):
        return False, False
    return True, axis.search[0] == "logrange"


def _random_level(row: PointRow, probe: str) -> float | None:
    if probe.endswith("_gain"):
        return 0.0
    return row.random.get(probe) if probe != "loss" else None


def _lines(spec: SweepSpec, rows: Sequence[PointRow], name: str, probe: str, out_dir: Path) -> Plot:
    """One axis: the probe at each level (best point there), the random-init backbone's as a dashed line."""
    from ssltrain.eval.plots import Plot, _figure, _save

    axis = next((a for a in spec.axes if a.name == name), None)
    labels = _levels(axis, rows, name)
    numeric, logx = _numeric_x(axis, labels)
    short = short_names([name])[name]
    title = f"{probe} against {short}"
    xs, ys, base, failed = [], [], [], []
    for i, label in enumerate(labels):
        best = _best([r for r in rows if r.values.get(name) == label], probe)
        pos = float(label) if numeric else float(i)
        if best is None:
            failed.append(pos)
            continue
        value = metric(best, probe)
        assert value is not None
        xs.append(pos)
        ys.append(value)
        base.append(_random_level(best, probe))
    fig, (ax,) = _figure(1, width=max(5.0, 0.9 * len(labels) + 2.5), height=3.6)
    ax.plot(xs, ys, marker="o", color="tab:blue", label=f"SSL ({probe})")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.3f}", (x, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7)
    known = [(x, b) for x, b in zip(xs, base) if b is not None]
    if known:
        label = "zero gain (random init)" if probe.endswith("_gain") else "random init"
        ax.plot(*zip(*known), linestyle="--", color="black", marker="_", label=label)
    if failed:
        low = min(ys + [b for _, b in known]) if ys else 0.0
        ax.plot(failed, [low] * len(failed), "x", color="tab:red", label="no result (failed or unfinished)")
    if logx:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30 if max(map(len, labels)) > 6 else 0)
    ax.set_xlabel(short)
    ax.set_ylabel(probe)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    out = f"lines_{_safe(short)}"
    note = f"{_label(probe)} at each level of {short}"
    note += "; the random-init backbone's as a dashed line." if known else "."
    return Plot(out, title, _save(fig, out_dir / f"{out}.png"), note)


def _scatter(spec: SweepSpec, rows: Sequence[PointRow], a: str, b: str, probe: str, out_dir: Path) -> Plot:
    """Two axes at least one of which Optuna samples from a range: each point where it was, coloured by the probe."""
    from ssltrain.eval.plots import Plot, _figure, _save

    short = short_names([a, b])
    by_name = {ax.name: ax for ax in spec.axes}
    done = [r for r in rows if r.done and metric(r, probe) is not None and a in r.values and b in r.values]
    fig, (ax,) = _figure(1, width=5.5, height=4.2)
    positions: dict[str, list[float]] = {}
    for name in (a, b):
        labels = _levels(by_name.get(name), rows, name)
        numeric, logscale = _numeric_x(by_name.get(name), labels)
        index = {label: float(label) if numeric else float(i) for i, label in enumerate(labels)}
        positions[name] = [index[r.values[name]] for r in done]
        if logscale:
            (ax.set_xscale if name == a else ax.set_yscale)("log")
        if not numeric:
            (ax.set_xticks if name == a else ax.set_yticks)(range(len(labels)), labels, fontsize=8)
    values = [metric(r, probe) for r in done]
    image = ax.scatter(positions[a], positions[b], c=values, cmap=_cmap(probe), norm=_norm(_values(done, probe)))
    fig.colorbar(image, ax=ax, label=probe)
    ax.set_xlabel(short[a])
    ax.set_ylabel(short[b])
    ax.grid(alpha=0.3)
    title = f"{probe}: {short[b]} x {short[a]} (sampled points)"
    ax.set_title(title, fontsize=10)
    name = f"scatter_{_safe(short[b])}_{_safe(short[a])}"
    return Plot(name, title, _save(fig, out_dir / f"{name}.png"), f"{_label(probe)} of each finished point.")


def _curve_kind(probe: str) -> str:
    return "loss" if probe == "loss" else probe.split("_")[0]


def _curves(rows: Sequence[PointRow], probe: str, out_dir: Path) -> Plot:
    """The best points' figure over steps: online (training records) as lines, offline evals as large markers."""
    from ssltrain.eval.plots import Plot, _figure, _save

    kind = _curve_kind(probe)
    what = {"knn": "kNN top-1", "linear": "linear top-1", "loss": "training loss"}[kind]
    title = f"{what} over steps, best {BEST_CURVES} points by {probe}"
    best = [r for r in rank(list(rows), probe) if r.done and metric(r, probe) is not None][:BEST_CURVES]
    best = [r for r in best if r.curves.get(kind)]
    if not best:
        return Plot("curves", title, None, f"no finished point with {what} records in its metrics.jsonl")
    fig, (ax,) = _figure(1, width=7.0, height=4.2)
    randoms: dict[float, list[str]] = {}
    for i, row in enumerate(best):
        curve, colour = row.curves[kind], f"C{i % 10}"
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row.values.items()) or row.name
        if curve.online:
            ax.plot(*zip(*curve.online), color=colour, marker="." if len(curve.online) < 30 else None, label=label)
        if curve.offline:
            ax.plot(
                *zip(*curve.offline),
                linestyle="none",
                marker="*",
                markersize=11,
                color=colour,
                label="_nolegend_" if curve.online else label,
            )
        if curve.random is not None:
            randoms.setdefault(round(curve.random, 6), []).append(row.architecture)
    for level, archs in randoms.items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1)
        ax.annotate(
            f"random init ({', '.join(sorted(set(archs)))})",
            (0.01, level),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=7,
            color="dimgray",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    online = any(r.curves[kind].online for r in best)
    note = (
        "Lines: the online figure logged during training; stars: the final offline eval; dashed: random init."
        if kind != "loss"
        else "The training loss of each point's metrics.jsonl."
    )
    if not online and kind != "loss":
        note = (
            f"These runs logged no online {what} (eval.online_knn_every / eval.online_linear are off): only the "
            "offline evals (stars) are drawn; dashed: random init."
        )
    return Plot("curves", title, _save(fig, out_dir / "curves.png"), note)


def make_plots(spec: SweepSpec, rows: Sequence[PointRow], probe: str, out_dir: Path) -> list[Plot]:
    """Every plot of the sweep report, in report order; PNGs of an earlier report that this one did not draw are
    removed (an axis renamed, a plot skipped)."""
    from ssltrain.eval.plots import Plot

    spec_axes = {a.name for a in spec.axes}
    axes = [a for a in _axis_names(spec, rows) if a in spec_axes or len(_levels(None, rows, a)) > 1]
    searched = {a.name for a in spec.axes if a.search is not None}
    plots: list[Plot] = []
    if not _values(rows, probe):
        plots.append(Plot("comparison", "Comparison of the points", None, f"no finished point has {probe} yet"))
    elif len(axes) == 1:
        plots.append(_lines(spec, rows, axes[0], probe, out_dir))
    elif len(axes) >= 2:
        grid_axes = [a for a in axes if a not in searched]
        if len(grid_axes) >= 2:
            plots += _heatmaps(spec, rows, grid_axes, probe, out_dir)
        for a, b in itertools.combinations(axes, 2):
            if a in searched or b in searched:
                plots.append(_scatter(spec, rows, a, b, probe, out_dir))
    plots.append(_curves(rows, probe, out_dir))
    drawn = {p.path.name for p in plots if p.path is not None}
    for stale in out_dir.glob("*.png"):
        if stale.name not in drawn:
            stale.unlink()
    return plots


# ---------------------------------------------------------------- report.md


def _spec_section(spec: SweepSpec, points: int) -> list[str]:
    md = [
        "## Spec",
        "",
        f"- base config: `{spec.config}`",
        "- fixed overrides: " + (", ".join(f"`{o}`" for o in spec.overrides) if spec.overrides else "none"),
        f"- points: {points} recorded of a grid of {spec.grid_size() if all(a.levels for a in spec.axes) else '?'}"
        + (f" ({spec.random} drawn with seed {spec.seed})" if spec.random else ""),
        f"- ranked by: `{spec.probe}` unless `--probe` says otherwise",
        "",
        "| axis | level | overrides |",
        "| --- | --- | --- |",
    ]
    for axis in spec.axes:
        if axis.search is not None:
            kind, lo, hi = axis.search
            md.append(f"| `{axis.name}` | {kind}({lo:g}, {hi:g}), sampled by Optuna | |")
        for level in axis.levels:
            overrides = ", ".join(f"`{_md_cell(o)}`" for o in level.overrides)
            md.append(f"| `{axis.name}` | {_md_cell(level.label)} | {overrides} |")
    return [*md, ""]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _baseline_section(sweep: SweepDir, rows: Sequence[PointRow]) -> list[str]:
    """The random-init figures each architecture's points were compared with (one probe per architecture and probe
    setting, shared through ``baselines/``)."""
    groups: dict[tuple[str, float | None, float | None], list[str]] = {}
    for row in rows:
        if row.random:
            knn, linear = row.random.get("knn_top1"), row.random.get("linear_top1")
            key = (
                row.architecture,
                None if knn is None else round(knn, 6),
                None if linear is None else round(linear, 6),
            )
            groups.setdefault(key, []).append(row.name)
    files = sorted(sweep.baselines.glob("random-*.json")) if sweep.baselines.is_dir() else []
    md = [
        "## Random-init baseline",
        "",
        f"The random-init backbone is probed once per architecture and probe setting ({len(files)} in "
        f"`{sweep.baselines.name}/`); every point of that architecture is compared with it.",
        "",
    ]
    if not groups:
        return [*md, "_No point has been evaluated yet._", ""]
    md += ["| architecture | kNN top-1 | linear top-1 | points |", "| --- | ---: | ---: | ---: |"]
    for (arch, knn, linear), names in sorted(groups.items(), key=lambda kv: kv[0][0]):
        md.append(f"| {arch} | {_fmt(knn)} | {_fmt(linear)} | {len(names)} |")
    return [*md, ""]


def _failed_section(sweep: SweepDir, rows: Sequence[PointRow]) -> list[str]:
    failed = [r for r in rows if r.status == "failed"]
    if not failed:
        return []
    md = ["## Failed points", "", "| point | attempts | error | log |", "| --- | ---: | --- | --- |"]
    for row in failed:
        error = _md_cell(" ".join(row.error.split())[:300]) or "-"
        md.append(f"| `{row.name}` | {row.attempts} | {error} | `{sweep.log_path(row.name)}` |")
    return [*md, ""]


def write_report(sweep: SweepDir, probe: str | None = None) -> Path:
    """Write ``runs/<sweep>/report.md`` and its PNGs in ``runs/<sweep>/report/``; returns the report's path."""
    spec = sweep.spec()
    probe = _probe(sweep, probe)
    rows = collect(sweep)
    plots = make_plots(spec, rows, probe, sweep.root / PLOT_DIR)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    order = "best first" if higher_is_better(probe) else "lowest first"
    md = [
        f"# Sweep report: {spec.name}",
        "",
        f"Generated {now} by `ssltrain sweep report {sweep.root} --probe {probe}`.",
        "",
        f"## Points, by {probe} ({order})",
        "",
        f"{len(rows)} points: {_counts(rows) or 'none recorded'}. Probes are top-1 of the SSL backbone / the "
        "random-init backbone of the same eval; `warnings`: collapse warnings of the eval; unfinished and failed "
        "points last.",
        "",
        *_markdown_table(table_rows(sweep, probe, rows)),
        "",
    ]
    md += _failed_section(sweep, rows) + plots_section(plots, PLOT_DIR) + _spec_section(spec, len(rows))
    md += _baseline_section(sweep, rows)
    path = sweep.root / "report.md"
    write_atomic(path, "\n".join(md).encode())
    return path
