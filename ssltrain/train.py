"""The training loop, readable top to bottom: data -> method -> loss -> optimizer -> log -> checkpoint.

Everything that decides what the next step computes (model, optimizer, step, data position, RNG) is in the
checkpoint, and the data order and augmentations are functions of (seed, position), so a resumed run continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ssltrain.checkpoint import Checkpointer, load_checkpoint, rng_state, set_rng_state
from ssltrain.config import Config, config_diff, from_yaml_text, to_yaml
from ssltrain.data.augment import CPURenderer
from ssltrain.data.loader import AugmentedShards, make_loader
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.methods import Method, build_method
from ssltrain.metrics import MetricsLog
from ssltrain.optim import build_optimizer, lr_at, scaled_lr, set_lr

log = logging.getLogger("ssltrain")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU by default; fp32 on CPU (bf16 matmuls are slow there and change the numbers)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _state(model: Method, optimizer: torch.optim.Optimizer, step: int, position: int, cfg: Config, skipped: int,
           num_samples: int) -> dict:
    return {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_position": position,
        "data_samples": num_samples,
        "data_skipped": skipped,
        "rng": rng_state(),
        "config": to_yaml(cfg),
    }


def train(cfg: Config, stop_after_steps: int | None = None) -> Path:
    """Pretrain as ``cfg`` says; returns the run directory.

    ``stop_after_steps`` ends this process after that many steps (checkpointing first), for time-sliced jobs; the
    next call resumes where it stopped.
    """
    # --- set-up: device, determinism, run directory --------------------------------------------------------------
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    # --- data, model, optimizer ----------------------------------------------------------------------------------
    catalog = ShardCatalog.from_spec(cfg.data.train, "data.train")
    global_batch = cfg.data.batch_size
    model = build_method(cfg, num_samples=len(catalog)).to(device)
    optimizer = build_optimizer(model, cfg.optim, global_batch)
    peak_lr = scaled_lr(cfg.optim, global_batch)

    # --- resume from the latest complete checkpoint ---------------------------------------------------------------
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    start_step, data_skipped = 0, 0
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, data_skipped = int(state["step"]), int(state["data_skipped"])
        if state["data_position"] != start_step * global_batch:
            raise RuntimeError(
                f"checkpoint '{latest}' was made with global batch {state['data_position'] // max(start_step, 1)}, "
                f"this config has {global_batch}: resuming would change the data order; keep data.batch_size"
            )
        if state["data_samples"] != len(catalog):
            log.warning("the data changed since %s (%d -> %d samples): the sample order from here on differs from "
                        "the run that wrote it", latest, state["data_samples"], len(catalog))
        changed = config_diff(from_yaml_text(state["config"], str(latest)), cfg)
        if changed:
            log.warning("resuming %s with a changed config: %s", latest, "; ".join(changed))
        log.info("resumed from %s (step %d)", latest, start_step)
    last_step = cfg.steps if stop_after_steps is None else min(cfg.steps, start_step + stop_after_steps)
    if start_step >= cfg.steps:
        log.info("run '%s' already finished (%d steps)", cfg.name, cfg.steps)
        return run_dir

    sampler = GlobalBatchSampler(
        len(catalog), global_batch, cfg.seed, start=start_step * global_batch, end=last_step * global_batch,
        shuffle=cfg.data.shuffle,
    )
    dataset = AugmentedShards(catalog, CPURenderer(cfg.augment), cfg.seed)
    loader = make_loader(dataset, cfg.data.workers, pin_memory=device.type == "cuda", batch_sampler=sampler)
    metrics = MetricsLog(run_dir, resume_step=start_step)
    log.info("%d samples in %d shards; %d steps of %d; lr %.4g", len(catalog), len(catalog.paths), cfg.steps, global_batch, peak_lr)

    # --- the loop ------------------------------------------------------------------------------------------------
    model.train()
    step = start_step
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    lr, out = 0.0, {}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, dynamic_ncols=True, unit="step")
    batches = iter(loader)
    try:
        while step < last_step:
            t0 = time.perf_counter()
            views = next(batches)
            data_wait += time.perf_counter() - t0
            position = (step + 1) * global_batch
            for problem in views.skipped:
                if data_skipped < 10:
                    log.warning("skipped sample %s", problem)
                data_skipped += 1
            if views.batch_size < 2:  # nothing to learn from; the position still advances
                log.warning("step %d: batch had %d usable samples, step skipped", step, views.batch_size)
            else:
                lr = lr_at(step, cfg.steps, peak_lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
                set_lr(optimizer, lr)
                model.on_step_start(step, cfg.steps)  # schedules: teacher temperature, ...
                with autocast_for(device, cfg.precision):
                    out = model(views.to(device))
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                model.before_optimizer_step(step)  # e.g. prototypes frozen for the first steps
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                model.on_step_end(step, cfg.steps)  # EMA teachers
                window_samples += views.batch_size
            step += 1

            if step % cfg.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": position / sampler.samples_per_epoch, "lr": lr,
                          "img_per_s": window_samples / elapsed, "data_wait_s": data_wait, "data_skipped": data_skipped}
                record.update({k: float(v.detach()) for k, v in out.items()})
                record.update(model.monitors())  # embedding std, RankMe, LogDet entropy of this step's batch
                metrics.log(record)
                loss_value = record.get("loss", math.nan)
                bar.set_postfix(loss=f"{loss_value:.4g}", img_s=f"{record['img_per_s']:.0f}")
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                if not math.isfinite(loss_value):
                    log.warning("step %d: non-finite loss %s", step, loss_value)
            bar.update(1)

            if step % cfg.checkpoint.every == 0 or step == last_step:
                checkpointer.save(step, _state(model, optimizer, step, step * global_batch, cfg, data_skipped, len(catalog)))
    finally:
        bar.close()
        metrics.close()
        del batches
    if data_skipped:
        log.warning("%d corrupt or unreadable samples were skipped (see metrics.jsonl: data_skipped)", data_skipped)
    return run_dir
