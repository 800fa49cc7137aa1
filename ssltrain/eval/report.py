"""``ssltrain report RUN_DIR``: ``runs/<name>/report.md`` with PNG plots in ``runs/<name>/plots/``.

Everything comes from what the run directory already holds: ``metrics.jsonl`` (loss terms, lr, gradient and
weight norms, wall-clock time, throughput, counters, monitors, online and offline probe records), ``config.yaml``,
``eval.json`` (the final probe table), ``spectrum.json`` (written by ``ssltrain eval``) and ``hardware.json``
(written by the trainer at start). The one thing the report may compute is the spectrum at the last checkpoint,
when ``spectrum.json`` is missing or belongs to an older checkpoint: it extracts features of up to
``spectrum_images`` samples of eval.val (else data.train; labels are not needed), cached like every other feature
set. The report can be regenerated at any time, also while the run trains. Warnings come first, and the worst of
them first: probes below the random-init backbone's.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltrain.eval.hardware import HARDWARE_FILE, hardware_info, write_hardware
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.eval.representation import collapse_warnings
from ssltrain.eval.verdict import below_random

if TYPE_CHECKING:  # plots imports matplotlib: only when a report is written
    from ssltrain.config import Config
    from ssltrain.eval.plots import Plot

log = logging.getLogger("ssltrain")

# The loop's cumulative counters of work it could not do, shown in the summary: (key, what it counts).
COUNTERS = (
    ("data_skipped", "samples skipped (unreadable)"),
    ("data_shards_skipped", "shards skipped (unreadable)"),
    ("nonfinite_steps", "steps skipped (non-finite loss or gradients)"),
)

__all__ = ["compute_spectrum", "write_hardware", "write_report"]  # write_hardware: the trainer's, at start


def compute_spectrum(run_dir: Path, images: int = 1024) -> dict[str, Any] | None:
    """Spectrum and monitors of the latest checkpoint's features (and embeddings) on up to ``images`` samples;
    written to ``spectrum.json``. None when there is no checkpoint or no data to use."""
    from ssltrain.core.device import resolve_device
    from ssltrain.data.stream import ShardCatalog
    from ssltrain.eval.evaluate import build_models, representation_stats, resolve_target
    from ssltrain.eval.features import eval_transform, extract_features

    target = resolve_target(run_dir)
    cfg = target.cfg
    spec = cfg.eval.val or cfg.data.train
    catalog = ShardCatalog.from_spec(spec, "eval.val" if cfg.eval.val else "data.train")
    device = resolve_device(cfg.device)
    model, _ = build_models(target, random_baseline=False)
    model.to(device)
    fs = extract_features(
        model,
        catalog,
        eval_transform(cfg),
        batch_size=cfg.eval.batch_size,
        workers=cfg.data.workers,
        device=device,
        cache_dir=run_dir / "features",
        tag=f"step-{target.step}",
        split="spectrum",
        require_labels=False,
        limit=images,
        precision=cfg.precision,
        label=f"SSL backbone, step {target.step}",
    )
    monitors, spectra = representation_stats(model, fs, images, device)
    out = {
        "step": target.step,
        "checkpoint": str(target.checkpoint),
        "data": spec,
        "ssl": spectra,
        "monitors": {"ssl": monitors},
    }
    (run_dir / "spectrum.json").write_text(json.dumps(out))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("cannot read %s (%s); the report leaves it out", path, err)
        return None


def _same_path(a: Any, b: Path | None) -> bool:
    return a is not None and b is not None and Path(str(a)).resolve() == Path(b).resolve()


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def probe_table(ev: dict[str, Any]) -> list[str]:
    """Markdown table of eval.json: rows per kNN k (top-1 / top-5) and the linear probe, SSL vs random init."""
    cols = [c for c in ("ssl", "random") if isinstance(ev.get(c), dict)]
    names = {"ssl": f"SSL (step {ev.get('step')})", "random": "random init"}
    lines = [
        "| probe | " + " | ".join(f"{names[c]} top-1 | {names[c]} top-5" for c in cols) + " |",
        "| --- |" + " ---: | ---: |" * len(cols),
    ]
    ssl = ev.get("ssl", {})
    for k in sorted(ssl.get("knn", {}), key=int):
        cells = [
            f"{_fmt(ev[c].get('knn', {}).get(k, {}).get('top1'))} | {_fmt(ev[c].get('knn', {}).get(k, {}).get('top5'))}"
            for c in cols
        ]
        lines.append(f"| kNN k={k}, T={ssl.get('knn_temperature', '-')} | " + " | ".join(cells) + " |")
    if "linear" in ssl:
        cells = [
            f"{_fmt(ev[c].get('linear', {}).get('top1'))} | {_fmt(ev[c].get('linear', {}).get('top5'))}" for c in cols
        ]
        lines.append("| linear | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ["_eval.json holds no probe results._"]
    notes = []
    if "linear" in ssl:
        lin = ssl["linear"]
        notes.append(
            f"Linear probe: lr {lin['lr']:g}, weight decay {lin['weight_decay']:g}, chosen among "
            f"{len(lin.get('grid', []))} settings on a held-out fifth of the train features "
            f"(held-out top-1 {_fmt(lin.get('holdout_top1'))}), then trained on all of train."
        )
    notes.append(
        f"Train `{ev.get('train_data')}` ({ssl.get('train_samples', '?')} samples), val `{ev.get('val_data')}` "
        f"({ssl.get('val_samples', '?')} samples), {ssl.get('num_classes', '?')} classes; checkpoint "
        f"`{ev.get('checkpoint')}`."
    )
    return lines + [""] + notes


def _training_warnings(records: list[dict[str, Any]], rankme_min: float, std_min: float, max_rank: int) -> list[str]:
    """Collapse warnings of the last training record with monitors, and the first step each monitor fell under.

    ``max_rank`` bounds RankMe (see collapse_warnings); the global batch is used, an upper bound of the batch the
    monitors saw.
    """
    train = [r for r in records if "eval" not in r and "step" in r]
    with_monitors = [r for r in train if "emb_rankme" in r or "emb_std_normalized" in r]
    if not with_monitors:
        return []
    last = with_monitors[-1]
    out = [f"step {last['step']}: {w}" for w in collapse_warnings(last, "emb", rankme_min, std_min, max_rank)]
    for key in ("emb_rankme", "emb_std_normalized"):
        first = next(
            (r for r in with_monitors if collapse_warnings({key: r.get(key)}, "emb", rankme_min, std_min, max_rank)),
            None,
        )
        if first is not None and first is not last:
            out.append(f"{key} first fell under its threshold at step {first['step']} ({float(first[key]):.4g})")
    return out


def _spectrum(run_dir: Path, latest: Path | None, compute: bool, images: int) -> tuple[dict[str, Any] | None, str]:
    """(spectrum.json's content, a note for the report): computed anew when it is missing or of an older checkpoint."""
    spec = _read_json(run_dir / "spectrum.json")
    note = ""
    if latest is not None and compute and not _same_path(spec and spec.get("checkpoint"), latest):
        try:
            spec = compute_spectrum(run_dir, images)
        except Exception as err:  # noqa: BLE001 - the rest of the report is still worth writing
            note = f"The spectrum could not be computed: {type(err).__name__}: {err}"
            log.warning("report: %s", note)
    if spec is not None and latest is not None and not _same_path(spec.get("checkpoint"), latest):
        note = f"The spectrum is of `{spec.get('checkpoint')}`, not of the latest checkpoint `{latest}`."
    return spec, note


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _machine(hardware: dict[str, Any] | None) -> str | None:
    """One line for the summary: the GPUs (or the CPU) and the torch / CUDA versions of ``hardware.json``."""
    if not hardware:
        return None
    gpus = hardware.get("gpus") or []
    if gpus:
        names = sorted(set(map(str, gpus)))
        where = ", ".join(f"{sum(g == n for g in map(str, gpus))} x {n}" for n in names)
    else:
        where = f"CPU only ({hardware.get('cpu', '?')}, {hardware.get('cpus_usable', '?')} cores usable)"
    versions = f"torch {hardware.get('torch', '?')}" + (f", CUDA {hardware['cuda']}" if hardware.get("cuda") else "")
    return f"{where}; {versions}"


THROUGHPUT = [  # metrics.jsonl's rates (ssltrain/engine/progress.py), as the summary names them
    (
        "img_per_s",
        "throughput, training (median; without the monitors' scheduled passes, e.g. online kNN, and logging)",
    ),
    ("img_per_s_wall", "throughput, wall clock (median; everything included)"),
]


def _summary(
    cfg: Config, train: list[dict[str, Any]], latest: Path | None, hardware: dict[str, Any] | None
) -> list[str]:
    md = [
        "## Summary",
        "",
        "| | |",
        "| --- | --- |",
        f"| method | `{cfg.method.name}` |",
        f"| backbone | `{cfg.model.backbone}` at {cfg.augment.global_crops.size} px |",
        f"| steps logged | {train[-1]['step'] if train else 0} of {cfg.steps} |",
        f"| global batch | {cfg.data.batch_size} |",
        f"| last checkpoint | `{latest}` |" if latest else "| last checkpoint | none |",
    ]
    machine = _machine(hardware)
    if machine:
        md.append(f"| trained on | {machine} |")
    if train:
        last = train[-1]
        md.append(f"| last loss | {_fmt(last.get('loss'))} |")
        elapsed = _number(last.get("time_s"))
        if elapsed is not None:
            md.append(f"| training time | {_duration(elapsed)} (wall clock to step {last['step']}, resumes included) |")
        for key, what in THROUGHPUT:
            rates = [float(r[key]) for r in train if isinstance(r.get(key), (int, float))]
            if rates:
                md.append(f"| {what} | {sorted(rates)[len(rates) // 2]:.0f} images/s (`{key}`) |")
        for key, what in COUNTERS:
            value = _number(last.get(key))
            if value is not None:
                md.append(f"| {what} | {value:.0f} (`{key}`) |")
    return [*md, ""]


def _warnings(records: list[dict[str, Any]], ev: dict[str, Any] | None, cfg: Config) -> list[str]:
    """The report's first section: probes below the random-init backbone's first, then collapse warnings."""
    rankme_min, std_min = cfg.eval.collapse_rankme, cfg.eval.collapse_std
    warnings = below_random(ev, ev.get("step")) if ev else []
    warnings += _training_warnings(records, rankme_min, std_min, cfg.data.batch_size)
    if ev:
        warnings += [f"eval at step {ev.get('step')}: {w}" for w in ev.get("warnings", [])]
    none = (
        f"None (thresholds: RankMe {rankme_min:g}, capped at half the batch's rank bound; normalised std "
        f"{std_min:g}; `eval.collapse_rankme`, `eval.collapse_std`"
        + (
            f"; the kNN (k={ev['ssl'].get('knn_k', '?')}) and linear top-1 are at or above the random-init backbone's)."
            if ev and "random" in ev and isinstance(ev.get("ssl"), dict)
            else ")."
        )
    )
    return ["## Warnings", "", *([f"- **{w}**" for w in warnings] if warnings else [none]), ""]


def _probes(ev: dict[str, Any] | None, latest: Path | None, run_dir: Path) -> list[str]:
    if not ev:
        return ["## Probes", "", f"_No eval.json yet: run `ssltrain eval {run_dir}`._", ""]
    md = ["## Probes", ""]
    if latest is not None and not _same_path(ev.get("checkpoint"), latest):
        md += [
            f"_These probes are of `{ev.get('checkpoint')}`; the latest checkpoint is `{latest}`: run "
            f"`ssltrain eval {run_dir}` to update them._",
            "",
        ]
    return [*md, *probe_table(ev), ""]


def plots_section(plots: Sequence[Plot], folder: str = "plots", notes: dict[str, str] | None = None) -> list[str]:
    """The report's "Plots" section: each plot under its title (linked from ``folder``), or why it was skipped;
    ``notes`` adds an italic line under the plot of that name."""
    md = ["## Plots", ""]
    for p in plots:
        md += [f"### {p.title}", ""]
        if p.path is None:
            md.append(f"_Skipped: {p.note}._")
        else:
            md.append(f"![{p.title}]({folder}/{p.path.name})")
            if p.note:
                md += ["", p.note]
        if notes and notes.get(p.name):
            md += ["", f"_{notes[p.name]}_"]
        md.append("")
    return md


def _hardware(hardware: dict[str, Any] | None) -> list[str]:
    if hardware:
        md = ["## Hardware", "", "The machine the run trained on (`hardware.json`):"]
    else:
        md = ["## Hardware", "", "No `hardware.json` in the run directory; this is the machine that wrote the report:"]
        hardware = hardware_info()
    return [*md, "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in hardware.items()], ""]


def write_report(run_dir: Path, compute_spectrum_if_missing: bool = True, spectrum_images: int = 1024) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the run; returns the report's path."""
    from ssltrain.core.checkpoint_layout import latest_checkpoint
    from ssltrain.eval.evaluate import load_run_config
    from ssltrain.eval.plots import plot_all

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # also the "is this a run directory" check
    records = read_metrics(run_dir / "metrics.jsonl")
    latest = latest_checkpoint(run_dir)
    spec, spectrum_note = _spectrum(run_dir, latest, compute_spectrum_if_missing, spectrum_images)
    thresholds = {"emb_rankme": cfg.eval.collapse_rankme, "emb_std_normalized": cfg.eval.collapse_std}
    plots = plot_all(records, spec, run_dir / "plots", thresholds)
    ev = _read_json(run_dir / "eval.json")
    train = [r for r in records if "eval" not in r and "step" in r]

    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    md = [f"# Run report: {cfg.name}", "", f"Generated {now} by `ssltrain report {run_dir}`.", ""]
    hardware = _read_json(run_dir / HARDWARE_FILE)
    md += _warnings(records, ev, cfg) + _summary(cfg, train, latest, hardware) + _probes(ev, latest, run_dir)
    md += plots_section(plots, notes={"spectrum": spectrum_note}) + _hardware(hardware)
    md += ["## Resolved config", "", "```yaml", (run_dir / "config.yaml").read_text().rstrip(), "```", ""]
    path = run_dir / "report.md"
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, path)
    return path
