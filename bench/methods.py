"""Every method on an embedded data set at one budget: kNN and linear probes vs the random-init backbone.

    python bench/methods.py --data digits         # every recipe in configs/digits/ (~2.5 min each on 2 CPU cores)
    python bench/methods.py --data digits_vit     # configs/digits_vit/: ViT-tiny, 4 px patches (~5 min each)
    python bench/methods.py --data shapes         # every recipe in configs/shapes/ (350 steps at batch 128, ~4 min)
    python bench/methods.py --methods dino swav   # a subset
    python bench/methods.py --steps 50            # another budget
    python bench/methods.py --methods byol --set method.byol.momentum=0.996   # one setting changed

Each run is a recipe, configs/<data>/<method>.yaml: the data set's base config (configs/digits.yaml, or
configs/demo.yaml for shapes) with the method's own settings, which its header explains. Before anything trains,
every recipe is checked to share the base's budget (seed, steps, data, model, evaluation, optimizer and schedule),
so the rows compare methods, not budgets. Prints a Markdown table and writes it, with each method's JSON (the
recipe's differences from the base included), to runs/methods-<data>/. The random-init row is the network the
runs start from (same seed). Measured tables: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ssltrain.config import Config, config_diff, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BASES = {"digits": "digits.yaml", "digits_vit": "digits_vit.yaml", "shapes": "demo.yaml"}
DATA = {"digits": "digits", "digits_vit": "digits", "shapes": "shapes"}  # the embedded data set each base trains on
SHARD_ARGS = {"digits": [], "shapes": ["--train", "6000", "--val", "1000", "--shard-size", "1000"]}  # as `make demo`
# Keys every recipe of a data set must share with its base config: what makes the rows one budget.
BUDGET = (
    "seed",
    "steps",
    "threads",
    "data.",
    "model.",
    "eval.",
    "optim.name",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.accumulate",
    "augment.global_crops.size",
    "precision",
    "device",
)


def recipes(data: str) -> dict[str, Path]:
    """The method recipes of a data set, by method name (the file's stem)."""
    return {path.stem: path for path in sorted((CONFIGS / data).glob("*.yaml"))}


def differences(base: Config, recipe: Config) -> list[str]:
    """The recipe's settings that differ from the base, as ``key: base -> recipe``; fails on a budget key."""
    diff = [line for line in config_diff(base, recipe) if not line.startswith("name:")]
    off_budget = [line for line in diff if line.split(":", 1)[0].startswith(BUDGET)]
    if off_budget:
        raise SystemExit(f"{recipe.method.name}: the recipe changes the shared budget: {'; '.join(off_budget)}")
    return diff


def ensure_shards(name: str) -> None:
    """The data set's shards, written as `make demo` / the config's header say, unless they exist."""
    from ssltrain import cli

    data = ROOT / "data" / name
    if not any(data.glob("train-*.tar")):
        cli.main(["shards", name, "--out", str(data), *SHARD_ARGS[name]])


def train_and_probe(cfg: Config) -> tuple[float, dict]:
    """Train one recipe (shard paths made absolute, so the bench runs from any directory), then probe it."""
    from ssltrain.engine.loop import train  # the engine and eval load only when something trains (--help is instant)
    from ssltrain.eval.evaluate import evaluate_run

    cfg.data.train = str(ROOT / cfg.data.train)
    cfg.eval.train, cfg.eval.val = str(ROOT / cfg.eval.train), str(ROOT / cfg.eval.val)
    start = time.perf_counter()
    run_dir = train(cfg)
    seconds = time.perf_counter() - start
    return seconds, evaluate_run(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=list(BASES), default="digits")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every recipe in configs/<data>/")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", default=None, help="default: runs/methods-<data>")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    args = parser.parse_args()
    available = recipes(args.data)
    methods = args.methods or list(available)
    unknown = sorted(set(methods) - set(available))
    if unknown:
        parser.error(
            f"no recipe configs/{args.data}/<method>.yaml for {', '.join(unknown)}; have {', '.join(available)}"
        )
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or ROOT / "runs" / f"methods-{args.data}")
    run_control = [f"out_dir={out}", "progress=false", *([f"steps={args.steps}"] if args.steps else []), *args.set]
    base = load_config(CONFIGS / BASES[args.data], run_control)
    plan = {}
    for name in methods:  # check every recipe before the first run trains
        cfg = load_config(available[name], [f"name={name}", *run_control])
        plan[name] = (cfg, differences(base, cfg))
    ensure_shards(DATA[args.data])
    out.mkdir(parents=True, exist_ok=True)
    rows, random = [], None
    for name, (cfg, diff) in plan.items():
        seconds, results = train_and_probe(cfg)
        random = random or results["random"]
        rows.append((name, results["ssl"]["knn_top1"], results["ssl"]["linear_top1"], seconds))
        record = {
            "recipe": str(available[name].relative_to(ROOT)),
            "overrides": run_control,
            "differences_from_base": diff,
            "train_s": seconds,
            **results,
        }
        (out / f"{name}.json").write_text(json.dumps(record, indent=2))
        print(f"{name}: kNN {rows[-1][1]:.3f} linear {rows[-1][2]:.3f} ({seconds:.0f} s)", flush=True)
    lines = ["| method | kNN top-1 | linear top-1 | train time (s) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {knn:.3f} | {lin:.3f} | {s:.0f} |" for n, knn, lin, s in rows]
    if random:
        lines.append(f"| random init | {random['knn_top1']:.3f} | {random['linear_top1']:.3f} | - |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
