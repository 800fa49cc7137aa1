"""The training loop, readable top to bottom: data -> method -> loss -> optimizer -> log -> checkpoint.

Everything that decides what the next step computes (model, optimizer, step, data position, RNG) is in the
checkpoint, and the data order and augmentations are functions of (seed, position), so a resumed run continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from torch.nn.parallel import DistributedDataParallel

from ssltrain.engine.checkpoint import CheckpointError, Checkpointer, load_training_state
from ssltrain.config import Config, ConfigError, config_diff, from_yaml_text, to_dict, to_yaml
from ssltrain.data.loaders.pipeline import build_train_loader
from ssltrain.data.record import SampleRecord
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.core.collectives import agree, all_reduce_sum, barrier
from ssltrain.core.device import autocast_for, resolve_device
from ssltrain.core.process_group import init_distributed
from ssltrain.monitors.online_knn import OnlineKNN
from ssltrain.engine.guard import FiniteGuard
from ssltrain.methods import build_method
from ssltrain.methods.base import Method
from ssltrain.eval.metrics_log import CollapseWatch, MetricsLog, WandbSettings, require_wandb
from ssltrain.engine.optim import build_optimizer, lr_at, scaled_lr, set_lr
from ssltrain.engine.parallelize import convert_sync_batchnorm, wrap_model
from ssltrain.engine.preemption import StopRequest
from ssltrain.engine.profile import phase, profile_step, time_model_calls
from ssltrain.engine.speed import apply_speed

log = logging.getLogger("ssltrain")


def optimizer_update(model: Method, optimizer: torch.optim.Optimizer, grad_clip: float, step: int, total_steps: int,
                     gate: torch.Tensor | None) -> None:
    """The update of one step after backward, as FiniteGuard.apply runs it: gradient surgery (e.g. prototypes
    frozen for the first steps), clipping, the optimizer (with a device-side skip flag in deferred mode), then the
    EMA teachers (gated by ``gate`` on the device in deferred mode)."""
    model.before_optimizer_step(step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    model.on_step_end(step, total_steps, gate)


def _finite_params(model: torch.nn.Module) -> bool:
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return agree(not all(bool(torch.isfinite(p).all()) for p in local)) is False


def _grad_sync(wrapped: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last_micro)
    elif isinstance(wrapped, DistributedDataParallel) and not last_micro:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _monitored_rank(model: torch.nn.Module) -> int | None:
    """min(N, D) of the embedding batch the collapse monitors saw (RankMe cannot exceed it), when known."""
    watched = getattr(model, "_watched", None)
    return min(watched.shape) if watched is not None and watched.dim() == 2 else None


def train(cfg: Config, stop_after_steps: int | None = None) -> Path:
    """Pretrain as ``cfg`` says; returns the run directory.

    Run as one process, or one per GPU under torchrun or Slurm (the process group comes from their variables).
    ``stop_after_steps`` ends this process after that many steps (checkpointing first), for time-sliced jobs; the
    next call resumes where it stopped. SIGUSR2/SIGTERM (a scheduler's time limit or preemption) do the same at the
    next step boundary, then hand the signal on (to submitit, which requeues the job).
    """
    # --- set-up: process group, device, determinism, run directory ------------------------------------------------
    device = resolve_device(cfg.device)
    env = init_distributed(device, cfg.dist.timeout_s)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    is_main = env.rank == 0
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    catalog = ShardCatalog.from_spec(cfg.data.train, "data.train")
    online_knn = OnlineKNN.from_config(cfg, device)  # None when off; bad eval.train / eval.val fail here, not at step N
    if cfg.log.wandb:
        require_wandb()
    if cfg.eval.online_linear and cfg.eval.online_linear_classes < 1:
        cfg = copy.deepcopy(cfg)  # resolved here and saved with the run, so eval rebuilds the same probe
        cfg.eval.online_linear_classes = int(catalog.labels().max()) + 1
    run_dir = cfg.run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    barrier()

    # --- data, model, optimizer ----------------------------------------------------------------------------------
    global_batch = cfg.data.batch_size  # per optimizer step, over all ranks and micro-batches
    accumulate = cfg.optim.accumulate
    micro_batch = global_batch // accumulate  # per micro-step, over all ranks
    if micro_batch % env.world_size:
        raise ConfigError(f"data.batch_size {global_batch} / optim.accumulate {accumulate} = {micro_batch} samples per "
                          f"micro-batch is not divisible by the {env.world_size} ranks; change data.batch_size")
    model = build_method(cfg, num_samples=len(catalog)).to(device)
    if cfg.dist.sync_bn and cfg.dist.strategy == "ddp":
        model = convert_sync_batchnorm(model, device, cfg.dist.sync_bn_impl)
    model = apply_speed(model, cfg, device)  # channels_last, torch.compile (train.*): before DDP/FSDP wrapping
    time_model_calls(model)  # for `ssltrain bench --profile`: forward vs loss
    wrapped = wrap_model(model, cfg.dist.strategy, device, bf16_params=cfg.dist.fsdp_bf16_params)
    optimizer = build_optimizer(model, cfg.optim, global_batch, probe_lr=cfg.eval.online_linear_lr)
    peak_lr = scaled_lr(cfg.optim, global_batch)
    guard = FiniteGuard(cfg.train.finite_check, optimizer, device)  # skips non-finite steps (ssltrain/engine/guard.py)

    # --- resume from the latest complete checkpoint ---------------------------------------------------------------
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                                keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
    start_step, data_skipped = 0, 0
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        meta = load_training_state(latest, wrapped, optimizer)
        start_step, data_skipped = int(meta["step"]), int(meta["data_skipped"]) if is_main else 0
        guard.load(int(meta.get("nonfinite_steps", 0)))
        if meta["data_position"] != start_step * global_batch:
            raise CheckpointError(
                f"checkpoint '{latest}' was made with global batch {meta['data_position'] // max(start_step, 1)}, "
                f"this config has {global_batch}: resuming would change the data order; keep data.batch_size"
            )
        if meta["data_samples"] != len(catalog):
            log.warning("the data changed since %s (%d -> %d samples): the sample order from here on differs from "
                        "the run that wrote it", latest, meta["data_samples"], len(catalog))
        changed = config_diff(from_yaml_text(meta["config"], str(latest)), cfg)
        if changed and is_main:
            log.warning("resuming %s with a changed config: %s", latest, "; ".join(changed))
        log.info("resumed from %s (step %d, written on %s ranks, now %d)", latest, start_step, meta["world_size"],
                 env.world_size)
    last_step = cfg.steps if stop_after_steps is None else min(cfg.steps, start_step + stop_after_steps)
    if start_step >= cfg.steps:
        log.info("run '%s' already finished (%d steps)", cfg.name, cfg.steps)
        return run_dir

    sampler = GlobalBatchSampler(
        len(catalog), micro_batch, cfg.seed, start=start_step * global_batch, end=last_step * global_batch,
        rank=env.rank, world_size=env.world_size, shuffle=cfg.data.shuffle,
    )
    loader = build_train_loader(cfg, catalog, sampler, device)
    sample_record = SampleRecord(run_dir, env.rank, catalog.keys) if cfg.data.record_samples else None
    wandb_run = WandbSettings(cfg.log.wandb_project, cfg.name, to_dict(cfg)) if cfg.log.wandb else None
    metrics = MetricsLog(run_dir, resume_step=start_step, tensorboard=cfg.log.tensorboard,
                         wandb=wandb_run) if is_main else None
    collapse = CollapseWatch(cfg.eval.collapse_rankme, cfg.eval.collapse_std)
    log.info("%d samples in %d shards; %d steps of %d (%d ranks x %d micro-batches); lr %.4g", len(catalog),
             len(catalog.paths), cfg.steps, global_batch, env.world_size, accumulate, peak_lr)

    def save(at_step: int) -> None:
        if not _finite_params(model):  # never let a checkpoint hold what a resume could not recover from
            log.error("step %d: parameters are not finite; checkpoint not written (the previous one stays)", at_step)
            return
        skipped_total = int(all_reduce_sum(torch.tensor(data_skipped)).item())
        checkpointer.save(at_step, wrapped, optimizer, {
            "step": at_step, "data_position": at_step * global_batch, "data_samples": len(catalog),
            "data_skipped": skipped_total, "nonfinite_steps": guard.total, "config": to_yaml(cfg)})

    # --- the loop ------------------------------------------------------------------------------------------------
    model.train()
    step = start_step
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    lr, out = 0.0, {}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and is_main), dynamic_ncols=True,
               unit="step")
    batches = iter(loader)
    stop = StopRequest()
    try:
        with stop:
            while step < last_step:
                profile_step()
                lr = lr_at(step, cfg.steps, peak_lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
                set_lr(optimizer, lr)
                model.on_step_start(step, cfg.steps)  # schedules: teacher temperature, ...
                optimizer.zero_grad(set_to_none=True)
                guard.begin_step(model)  # BN running statistics, put back if the step turns out non-finite
                usable = True
                for micro in range(accumulate):
                    t0 = time.perf_counter()
                    with phase("data"):
                        views = next(batches)
                    data_wait += time.perf_counter() - t0
                    if sample_record is not None:
                        sample_record.write(step, micro, views.index)
                    for problem in views.skipped:
                        if data_skipped < 10:
                            log.warning("skipped sample %s", problem)
                        data_skipped += 1
                    # Every rank must take part in every backward (DDP, FSDP and the gathers are collective), so
                    # a micro-batch too small on any rank skips the step on all of them.
                    if agree(views.batch_size < 2):
                        log.warning("step %d: a batch had fewer than 2 usable samples, step skipped", step)
                        usable = False
                        break
                    with _grad_sync(wrapped, micro == accumulate - 1), autocast_for(device, cfg.precision):
                        with phase("forward"):
                            out = wrapped(views.to(device))
                        loss = out["loss"]
                        if step in cfg.faults.inject_nonfinite_steps:
                            loss = loss * float("nan")
                        probe_loss = out.get("online_linear_loss", 0.0)  # trains the probe only (detached input)
                        with phase("backward"):
                            ((loss + probe_loss) / accumulate).backward()
                    window_samples += views.batch_size * env.world_size
                if usable:
                    with phase("optimizer"):
                        guard.apply(loss, model, functools.partial(optimizer_update, model, optimizer,
                                                                   cfg.optim.grad_clip, step, cfg.steps))
                step += 1
                position = step * global_batch
                knn_due = online_knn is not None and online_knn.due(step)
                log_due = step % cfg.log_every == 0 or step == last_step or knn_due

                if cfg.train.finite_check == "step" or log_due:  # deferred: the host reads the flags at log steps
                    report = guard.check()
                    if report.new:
                        log.warning("step %d: non-finite loss or gradient, update skipped (%d in all%s)", step - 1,
                                    report.total, "" if cfg.train.finite_check == "step" else
                                    f"; {report.new} of the steps since the last log step")
                    if report.longest_run >= cfg.faults.nonfinite_patience:
                        reload_from = checkpointer.latest()
                        if reload_from is None:
                            raise RuntimeError(f"{report.longest_run} non-finite steps in a row and no checkpoint to "
                                               "reload; lower optim.lr or raise optim.warmup_steps")
                        log.warning("step %d: %d non-finite steps in a row; reloading the weights of %s and "
                                    "continuing with the data from here", step - 1, report.longest_run, reload_from)
                        load_training_state(reload_from, wrapped, optimizer)
                        guard.reset_run()

                online: dict[str, float] = {}  # rank 0's online kNN figures
                if knn_due:  # collective: every rank extracts its share of the features
                    knn_start = time.perf_counter()
                    online = online_knn.measure(model, wrapped, is_main)
                    window_start += time.perf_counter() - knn_start  # img_per_s counts training time only

                if log_due:
                    monitors = model.monitors()  # embedding std, RankMe, LogDet entropy of this rank's batch
                    skipped_total = int(all_reduce_sum(torch.tensor(data_skipped)).item())
                    if metrics is not None:
                        elapsed = time.perf_counter() - window_start
                        record = {"step": step, "epoch": position / sampler.samples_per_epoch, "lr": lr,
                                  "img_per_s": window_samples / elapsed, "data_wait_s": data_wait,
                                  "data_skipped": skipped_total, "data_shards_skipped": len(catalog.skipped_shards),
                                  "nonfinite_steps": guard.total}
                        record.update({k: float(v.detach()) for k, v in out.items()})
                        record.update(monitors)
                        record.update(online)
                        metrics.log(record)
                        for warning in collapse.update(monitors, _monitored_rank(model)):
                            log.warning("step %d: %s", step, warning)
                        bar.set_postfix(loss=f"{record.get('loss', math.nan):.4g}", img_s=f"{record['img_per_s']:.0f}")
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                bar.update(1)

                preempted = agree(stop.received is not None)
                if step % cfg.checkpoint.every == 0 or step == last_step or preempted:
                    save(step)
                if preempted:
                    checkpointer.wait()
                    log.warning("stopped at step %d on %s; the next start resumes here", step,
                                stop.received.name if stop.received else "another rank's signal")
                    break
            checkpointer.wait()
            if stop.received is not None:
                stop.forward()  # submitit: requeue the job (rank 0), then exit
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if sample_record is not None:
            sample_record.close()
        del batches
    if data_skipped:
        log.warning("%d corrupt or unreadable samples were skipped on this rank (see metrics.jsonl: data_skipped)",
                    data_skipped)
    return run_dir
