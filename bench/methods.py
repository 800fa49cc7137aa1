"""Every method on an embedded data set at one budget: kNN and linear probes vs the random-init backbone.

    python bench/methods.py --data digits         # all methods, configs/digits.yaml (~2.5 min each on 2 CPU cores)
    python bench/methods.py --data shapes         # configs/demo.yaml: 250 steps at batch 128 (~3 min each)
    python bench/methods.py --methods dino swav   # a subset
    python bench/methods.py --steps 50            # another budget
    python bench/methods.py --methods byol --set method.byol.momentum=0.996   # one setting changed

Each run is the data set's config (ResNet-18, 32 px, AdamW) with ``method.name`` switched and the few
method-specific settings below, so the budget is the same for all. Prints a Markdown table and writes it, with the
per-method JSON, to runs/methods-<data>/. The random-init row is the network the runs start from (same seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ssltrain import cli
from ssltrain.config import load_config
from ssltrain.eval.evaluate import evaluate_run
from ssltrain.engine.loop import train

ROOT = Path(__file__).resolve().parent.parent

# Method-specific settings at 32 px / 1024-wide heads; everything else is the data set's config.
OVERRIDES: dict[str, list[str]] = {
    "vicreg": [],
    "vicreg_logdet": [],
    "vicreg_pairwise": [],
    # The half-batch estimate of E[zz^T] (128 rows) is far too noisy for a 1024-d output: it shrank to a low-rank
    # state (kNN 0.755). With D = 128 it beats random init.
    "vcreg": ["method.projector=[1024,128]"],
    "simclr": ["method.projector=[1024,128]", "method.simclr.temperature=0.2"],
    # lambda 0.005 at the common lr 0.002 stayed under random init (kNN 0.928); twice the off-diagonal weight at half
    # the rate beats it.
    "barlow_twins": ["method.barlow_twins.lambd=0.01", "optim.lr=0.001"],
    "diet": ["augment.global_crops.count=1"],
    "cissl": ["method.projector=[1024,128]", "method.cissl.temperature=0.1"],
    # C above the sample count (1,200 digits) made it slower to leave uniform. At the paper's teacher temperature 0.5
    # the teacher was still near uniform after 100 steps (kNN 0.898); 0.2 sharpens it early (H[M|Z] 1.5 nats at step
    # 60) and beats random init.
    "dissl": ["method.dissl.classes=128", "method.dissl.teacher_temperature=0.2"],
    # With the common rate the projections' RankMe fell from ~28 to ~5 by step 30 (kNN 0.898); a 10x predictor rate
    # (Tian et al. 2021) kept it at 10-17 (0.926).
    "byol": ["method.projector=[1024,256]", "method.byol.predictor=[1024,256]", "method.byol.predictor_lr_scale=10"],
    # At the default momentum 0.996 the teacher hardly moves in a few hundred steps and, centred, drifts to uniform
    # (loss log K). A BatchNorm head (the official ResNet recipe) starts it less uniform, momentum 0.99 lets it follow
    # the student and weight decay 0.04 is the paper's; the teacher then sharpens from step ~150 and beats random
    # init in 500 steps (--steps 500), though not in 100 or 300.
    "dino": ["method.dino.out_dim=2048", "method.dino.hidden_dim=1024", "method.dino.bottleneck_dim=256",
             "method.dino.use_bn=true", "method.dino.momentum=0.99", "optim.weight_decay=0.04",
             "method.dino.teacher_temperature=0.04", "augment.local_crops.count=2", "augment.local_crops.size=16",
             "augment.local_crops.scale=[0.1,0.3]"],
    # At the paper's epsilon 0.05 the codes stayed soft and the embeddings fell onto a few directions (RankMe 5-8,
    # kNN 0.856) whatever the prototype count, rate or queue. Sharper codes (epsilon 0.02) over the paper's 3,000
    # prototypes kept RankMe ~15 and beat random init.
    "swav": ["method.projector=[1024,128]", "method.swav.epsilon=0.02", "method.swav.freeze_prototypes_steps=25",
             "augment.local_crops.count=2", "augment.local_crops.size=16", "augment.local_crops.scale=[0.1,0.3]"],
}


CONFIGS = {"shapes": "demo.yaml", "digits": "digits.yaml"}
SHARD_ARGS = {"shapes": ["--train", "6000", "--val", "1000", "--shard-size", "1000"], "digits": []}


def ensure_shards(name: str) -> None:
    """The data set's shards, written as `make demo` / the config's header say, unless they exist."""
    data = ROOT / "data" / name
    if not any(data.glob("train-*.tar")):
        cli.main(["shards", name, "--out", str(data), *SHARD_ARGS[name]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(OVERRIDES), choices=list(OVERRIDES))
    parser.add_argument("--data", choices=list(CONFIGS), default="digits")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", default=None, help="default: runs/methods-<data>")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ensure_shards(args.data)
    out = Path(args.out or ROOT / "runs" / f"methods-{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    rows, random = [], None
    for name in args.methods:
        overrides = [f"name={name}", f"out_dir={out}", "progress=false", f"method.name={name}", *OVERRIDES[name]]
        overrides += ([f"steps={args.steps}"] if args.steps else []) + args.set
        cfg = load_config(ROOT / "configs" / CONFIGS[args.data], overrides)
        cfg.data.train = str(ROOT / cfg.data.train)
        cfg.eval.train, cfg.eval.val = str(ROOT / cfg.eval.train), str(ROOT / cfg.eval.val)
        start = time.perf_counter()
        run_dir = train(cfg)
        seconds = time.perf_counter() - start
        results = evaluate_run(run_dir)
        random = random or results["random"]
        rows.append((name, results["ssl"]["knn_top1"], results["ssl"]["linear_top1"], seconds))
        (out / f"{name}.json").write_text(json.dumps({"overrides": overrides, "train_s": seconds, **results}, indent=2))
        print(f"{name}: kNN {rows[-1][1]:.3f} linear {rows[-1][2]:.3f} ({seconds:.0f} s)", flush=True)
    lines = [f"| method | kNN top-1 | linear top-1 | train time (s) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {k:.3f} | {l:.3f} | {s:.0f} |" for n, k, l, s in rows]
    if random:
        lines.append(f"| random init | {random['knn_top1']:.3f} | {random['linear_top1']:.3f} | - |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
