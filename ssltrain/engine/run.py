"""A training run: everything built from the config, and its state as one object that checkpoints save and load.

Everything that decides what the next step computes (model, teachers, optimizer, step, data position, RNG, the
monitors' own state) is in the checkpoint, and the data order and augmentations are functions of (seed, position),
so a resumed run continues exactly as if it had never stopped, on any number of ranks.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssltrain.config import (
    Config,
    ConfigError,
    check_same_model,
    check_world_size,
    config_diff,
    from_yaml_text,
    to_yaml,
)
from ssltrain.core.checkpoint_layout import CheckpointError, CheckpointWriteError, read_meta
from ssltrain.core.collectives import agree, all_reduce_sum, barrier
from ssltrain.core.device import resolve_device
from ssltrain.core.process_group import DistEnv, init_distributed
from ssltrain.data.loaders import Views, build_train_loader
from ssltrain.data.masks import MaskDraw
from ssltrain.data.order import StreamOrder
from ssltrain.data.record import SampleRecord
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.engine.checkpoint import Checkpointer, load_training_state
from ssltrain.engine.guard import FiniteGuard, any_nonfinite, local_tensors
from ssltrain.engine.optim import build_optimizer, lr_at, scaled_lr
from ssltrain.engine.parallelize import parallelize
from ssltrain.engine.profile import time_model_calls
from ssltrain.eval.hardware import write_hardware
from ssltrain.eval.metrics_log import require_wandb
from ssltrain.methods import Method, build_method
from ssltrain.monitors import Monitor, MonitorContext, build_monitors

log = logging.getLogger("ssltrain")

MONITORS_FILE = "monitors.pt"  # the monitors' state in a checkpoint directory (rank 0's; they are replicated)


@dataclass
class Run:
    """The objects of one training run and the counters that move with it (``step``, skipped samples)."""

    cfg: Config
    env: DistEnv
    device: torch.device
    catalog: ShardCatalog
    model: Method  # the Method: hooks (schedules, EMA teachers) are called on it
    wrapped: nn.Module  # what forward and backward go through (DDP / FSDP2 / the model itself)
    optimizer: torch.optim.Optimizer
    guard: FiniteGuard
    checkpointer: Checkpointer
    monitors: list[Monitor]
    step: int = 0  # optimizer steps done
    data_skipped: int = 0  # corrupt or unreadable samples this rank skipped
    time_s: float = 0.0  # wall-clock seconds the run trained before this process started (from the checkpoint)
    started: float = field(default_factory=time.perf_counter)  # when this process built the run
    sample_record: SampleRecord | None = field(default=None, repr=False)
    _stream_order: StreamOrder | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over all ranks and micro-batches."""
        return self.cfg.data.batch_size

    @property
    def stream_order(self) -> StreamOrder:
        """The run's sample order (data.streams, data.shuffle_window, fixed for its life)."""
        if self._stream_order is None:
            d = self.cfg.data
            self._stream_order = self.catalog.stream_order(d.streams, d.shuffle_window, self.cfg.seed, d.shuffle)
        return self._stream_order

    @property
    def samples_per_epoch(self) -> int:
        """Samples of one pass over the data: whole micro-batches of it (the sampler drops the remainder)."""
        micro_batch = self.global_batch // self.cfg.optim.accumulate
        return (self.stream_order.samples // micro_batch) * micro_batch

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.cfg.optim, self.global_batch)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, self.cfg.steps, self.peak_lr, o.warmup_steps, o.min_lr_ratio)

    def batches(self, last_step: int) -> Iterator[Views]:
        """This rank's micro-batches from the current step's data position up to ``last_step``'s."""
        sampler = GlobalBatchSampler(
            self.stream_order,
            self.global_batch // self.cfg.optim.accumulate,
            start=self.step * self.global_batch,
            end=last_step * self.global_batch,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        generator = self.model.masks
        masks = None if generator is None else MaskDraw(generator, self.cfg.seed, sampler.global_batch)
        batches: Iterable[Views] = build_train_loader(self.cfg, self.catalog, sampler, self.device, masks)
        return iter(batches)

    # --- the run's state -------------------------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        """Wall-clock seconds of training so far, over every process that worked on the run."""
        return self.time_s + time.perf_counter() - self.started

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records beside the tensors (collective: the skipped-sample count is summed over ranks)."""
        return {
            "step": self.step,
            "data_position": self.step * self.global_batch,
            "data_samples": len(self.catalog),
            "data_skipped": int(all_reduce_sum(torch.tensor(self.data_skipped)).item()),
            "nonfinite_steps": self.guard.total,
            "time_s": self.elapsed_s(),
            "config": to_yaml(self.cfg),
        }

    def save(self) -> None:
        """Checkpoint this step (collective). Parameters or an optimizer state that are not finite are never written:
        the previous checkpoint stays. At the run's last step that is an error (CheckpointWriteError), as is a write
        that fails at any step: a run without its final checkpoint must not end as if it had succeeded."""
        if not _finite_params(self.model, self.optimizer):
            if self.step >= self.cfg.steps:
                latest = self.checkpointer.latest()
                again = f"resume from '{latest}', the last complete checkpoint," if latest else "start again"
                raise CheckpointWriteError(
                    f"step {self.step}: the final checkpoint was not written: the parameters or the optimizer state "
                    f"are not finite; {again} with a lower optim.lr or a longer optim.warmup_steps"
                )
            log.error(
                "step %d: parameters or optimizer state not finite; checkpoint not written (the previous one stays)",
                self.step,
            )
            return
        monitors = {m.name: m.state_dict() for m in self.monitors}
        extra = {MONITORS_FILE: monitors} if self.is_main and any(monitors.values()) else {}
        self.checkpointer.save(self.step, self.wrapped, self.optimizer, self.meta(), extra)

    def load(self, path: Path) -> None:
        """Continue from checkpoint ``path``: tensors, RNG, counters and the monitors' state (collective).

        A checkpoint that fails its checksums or cannot be loaded is an error, unless ``checkpoint.fallback`` is on:
        then the newest earlier complete checkpoint that loads is taken, and each one that did not is moved aside to
        ``step-<N>.corrupt`` (kept for inspection; otherwise the run would write that step again next to it)."""

        def load_all(candidate: Path) -> dict[str, Any]:
            meta = load_training_state(candidate, self.wrapped, self.optimizer)
            if (candidate / MONITORS_FILE).is_file():
                try:
                    states = torch.load(candidate / MONITORS_FILE, weights_only=True)
                except Exception as err:  # noqa: BLE001 - any failure must name the file
                    raise CheckpointError(f"cannot load '{candidate / MONITORS_FILE}': {err}") from err
                for monitor in self.monitors:
                    if monitor.name in states:
                        monitor.load_state_dict(states[monitor.name])
            return meta

        step = int(path.name.split("-")[-1])
        earlier = [p for s, p in reversed(self.checkpointer.complete()) if s < step]
        candidates = [path, *earlier] if self.cfg.checkpoint.fallback else [path]
        first: CheckpointError | None = None
        for i, candidate in enumerate(candidates):
            error: CheckpointError | None = None
            try:
                meta = load_all(candidate)
            except CheckpointError as err:
                error = err
            if not agree(error is not None):
                break
            error = error or CheckpointError(f"another rank could not load checkpoint '{candidate}'")
            first = first or error
            if not self.cfg.checkpoint.fallback:
                raise error
            if i + 1 == len(candidates):
                raise CheckpointError(
                    f"no complete checkpoint in '{path.parent}' can be loaded (checkpoint.fallback=true tried "
                    f"{len(candidates)}); the latest failed with: {first}"
                ) from error
            barrier()
            if self.is_main:
                aside = candidate.with_name(f"{candidate.name}.corrupt")
                while aside.exists():
                    aside = aside.with_name(aside.name + "_")
                candidate.rename(aside)
                log.error("%s", error)
                log.error("checkpoint.fallback=true: moved it to %s; resuming from %s", aside, candidates[i + 1])
            barrier()
        self.step = int(meta["step"])
        self.data_skipped = int(meta["data_skipped"]) if self.is_main else 0
        self.guard.load(int(meta.get("nonfinite_steps", 0)))
        self.time_s, self.started = float(meta.get("time_s", 0.0)), time.perf_counter()
        _check_resumable(self, candidate, meta)

    def reload_weights(self, path: Path) -> None:
        """Put back the model and optimizer of ``path``, keeping the step and data position (after a run of
        non-finite steps, or an update that left non-finite parameters: the data goes on from here)."""
        load_training_state(path, self.wrapped, self.optimizer)
        self.guard.reset_run(path)

    def close(self) -> None:
        if self.sample_record is not None:
            self.sample_record.close()


def build_run(cfg: Config) -> Run:
    """Build every object of the run from ``cfg`` (collective under torchrun/Slurm) and resume it from its latest
    complete checkpoint unless ``checkpoint.resume`` is off."""
    device = resolve_device(cfg.device)
    env = init_distributed(device, cfg.dist.timeout_s)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    catalog = ShardCatalog.from_spec(cfg.data.train, "data.train", cfg.data.store)
    cfg = _resolved(cfg, catalog)
    check_world_size(cfg, env.world_size)
    if cfg.data.streams % env.world_size and env.rank == 0:
        log.warning(
            "data.streams=%d is not a multiple of the %d ranks: the order is unchanged, but each shard is read by "
            "several ranks; set data.streams to a multiple of every world size the run will use",
            cfg.data.streams,
            env.world_size,
        )
    if cfg.log.wandb:
        require_wandb()
    model = build_method(cfg, num_samples=len(catalog)).to(device)
    wrapped = parallelize(model, cfg, device)
    time_model_calls(model)  # `ssltrain bench --profile`: forward vs loss
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    num_classes = cfg.eval.online_linear_classes
    monitors = build_monitors(MonitorContext(cfg, device, model, wrapped, env.rank == 0, num_classes))
    # Everything that can fail on the config or the data has been built: only now does the run directory appear.
    if env.rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
        write_hardware(cfg.run_dir)
    barrier()
    checkpointer = Checkpointer(
        cfg.run_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
    )
    run = Run(
        cfg,
        env,
        device,
        catalog,
        model,
        wrapped,
        optimizer,
        FiniteGuard(cfg.train.finite_check, optimizer, device),
        checkpointer,
        monitors,
    )
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        _check_same_model(cfg, latest)
        run.load(latest)
    if cfg.data.record_samples:
        run.sample_record = SampleRecord(cfg.run_dir, env.rank, catalog.keys)
    return run


def _resolved(cfg: Config, catalog: ShardCatalog) -> Config:
    """The config with what is read from the data filled in (saved with the run, so eval rebuilds the same)."""
    if cfg.eval.online_linear and cfg.eval.online_linear_classes < 1:
        cfg = copy.deepcopy(cfg)
        cfg.eval.online_linear_classes = int(catalog.labels().max()) + 1
    return cfg


def _check_same_model(cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint of another model: the run would go on under the old run's name with weights
    that were never trained for this method, or fail deep inside the loader on mismatched shapes."""
    try:
        saved = from_yaml_text(read_meta(path)["config"], str(path))
    except CheckpointError:
        if cfg.checkpoint.fallback:
            return  # an unreadable latest checkpoint: Run.load falls back to an earlier one
        raise
    problem = check_same_model(saved, cfg)
    if problem:
        raise ConfigError(f"run directory '{cfg.run_dir}' {problem}")


def _check_resumable(run: Run, path: Path, meta: dict[str, Any]) -> None:
    """A checkpoint from another global batch would change the data order: refuse. Other changes are reported."""
    if meta["data_position"] != run.step * run.global_batch:
        raise CheckpointError(
            f"checkpoint '{path}' was made with global batch {meta['data_position'] // max(run.step, 1)}, "
            f"this config has {run.global_batch}: resuming would change the data order; keep data.batch_size"
        )
    before = from_yaml_text(meta["config"], str(path)).data
    for key in ("streams", "shuffle_window"):
        if getattr(before, key) != getattr(run.cfg.data, key):
            raise CheckpointError(
                f"checkpoint '{path}' was made with data.{key}={getattr(before, key)}, this config has "
                f"{getattr(run.cfg.data, key)}: resuming would change the data order; keep data.{key} (it is fixed "
                "for the life of a run)"
            )
    if meta["data_samples"] != len(run.catalog):
        log.warning(
            "the data changed since %s (%d -> %d samples): the sample order from here on differs from "
            "the run that wrote it",
            path,
            meta["data_samples"],
            len(run.catalog),
        )
    changed = config_diff(from_yaml_text(meta["config"], str(path)), run.cfg)
    if changed and run.is_main:
        log.warning("resuming %s with a changed config: %s", path, "; ".join(changed))
    log.info(
        "resumed from %s (step %d, written on %s ranks, now %d)", path, run.step, meta["world_size"], run.env.world_size
    )


def _finite_params(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every parameter, and every tensor of ``optimizer``'s state, is finite on every rank (collective; one
    host read)."""
    tensors = [p.detach() for p in model.parameters()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    local = local_tensors(tensors)
    bad = bool(any_nonfinite(local, local[0].device).item()) if local else False
    return not agree(bad)
