"""Checkpoints: sharded (torch.distributed.checkpoint), committed atomically, retained, resumed on any world size.

A checkpoint is a directory ``checkpoints/step-<N>/``:

- the DCP files (``.metadata``, ``__<rank>_0.distcp``): model and optimizer tensors, each rank writing its part;
- ``rng-rank<r>.pt``: every rank's RNG states (written by that rank; loaded with ``weights_only=True``);
- ``meta.json``: step, data position, sample counts, world size, the resolved config, and the size and sha256 of
  every other file (each rank hashes the files it wrote, after writing them: in the background thread for an async
  save; rank 0 gathers them at the commit);
- ``COMPLETE``: the commit marker, written by rank 0 last, after every rank's writes.

Only directories with the marker count, so a crash or ``kill -9`` at any moment (mid-write included) leaves the
previous checkpoint as the latest loadable one; incomplete directories are removed at the next start.

Loading verifies every file against ``meta.json`` first (each rank hashes its share), so a damaged file is an
error naming it, never weights that silently turn into NaN. Loading is safe for checkpoints from elsewhere: only
tensors are stored (no pickled objects), tensor data loads with ``weights_only=True``, and DCP's pickled
``.metadata`` is read by an unpickler that admits DCP's own metadata classes and nothing else.

Resharding: DCP stores global tensor shapes and each rank's chunk, so a checkpoint written by 4 ranks loads on 2
(or 1, for ``ssltrain eval``/``export``). Parameters sharded by ssltrain itself (DIET's N-way head, tagged
``ssltrain_sharded``) are presented to DCP as DTensors sharded by rows, so they reshard too.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ssltrain.core.checkpoint_layout import (
    FILES,
    FORMAT,
    MARKER,
    META_FILE,
    SINGLE_PROCESS_DCP_WARNING,
    STEP_DIR,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_files,
    checksum_problem,
    complete_checkpoints,
    file_checksums,
    latest_checkpoint,
    read_meta,
)
from ssltrain.core.checkpoints import SafeReader, describe_error
from ssltrain.core.collectives import (
    agree,
    barrier,
    broadcast_buffers,
    gather_objects,
    is_distributed,
    rank,
    world_size,
)
from ssltrain.core.files import write_atomic

log = logging.getLogger("ssltrain")
# DCP says so on every single-process save and load; a single process is a supported, intended use here.
warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP_WARNING)


# --- RNG states ---------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True gives the MT19937 tuple; the check narrows numpy's union type
        raise TypeError(f"numpy's legacy RNG state is a {type(np_state).__name__}, not the MT19937 tuple")
    _, key, pos, has_gauss, cached_gaussian = np_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model/optimizer state with ssltrain's own row-sharded parameters -----------------------------------------------

_MESH: Any = None


def _row_mesh() -> Any:
    global _MESH
    if _MESH is None or _MESH.size() != world_size():
        from torch.distributed.device_mesh import init_device_mesh

        _MESH = init_device_mesh("cpu" if dist.get_backend() == "gloo" else "cuda", (world_size(),))
    return _MESH


def _global_rows(local: Tensor, total_rows: int) -> Tensor:
    """This rank's padded rows of a [total_rows, ...] tensor as DCP should see them: a DTensor sharded by rows
    (torch.chunk's layout, which ShardedIndexHead follows), or the unpadded tensor in a single process."""
    rows = local.shape[0]
    real = max(0, min(rows, total_rows - rank() * rows))
    part = local[:real]
    if not is_distributed():
        return part
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size((total_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(part, _row_mesh(), [Shard(0)], run_check=False, shape=shape, stride=stride)


def _sharded_rows(model: nn.Module) -> dict[str, int]:
    """FQN -> global row count of every parameter ssltrain shards by rows itself."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        name: int(vars(p)["ssltrain_total_rows"])  # set beside ssltrain_sharded (methods/diet.py)
        for name, p in inner.named_parameters()
        if getattr(p, "ssltrain_sharded", False)
    }


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``({"model": ..., "optim": ...}`` of tensors for DCP, the optimizer's param_groups) from the wrapped model."""
    # DCP saves a replicated tensor from whichever rank its planner picks: without this a resumed run could continue
    # from rank 1's BatchNorm statistics where the uninterrupted one keeps rank 0's (DDP's). Under FSDP it makes
    # the saved statistics rank 0's, as under DDP.
    broadcast_buffers(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    osd = cast(dict[str, Any], optim_sd)  # {"state": {fqn: {name: value}}, "param_groups": [...]}
    # The per-parameter dicts are the optimizer's live state: copy them before swapping in DTensor views.
    optim: dict[str, dict[str, Any]] = {fqn: dict(states) for fqn, states in osd["state"].items()}
    msd: dict[str, Any] = dict(model_sd)
    for fqn, total in _sharded_rows(model).items():
        msd[fqn] = _global_rows(msd[fqn], total)
        for key, value in optim.get(fqn, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0:
                optim[fqn][key] = _global_rows(value, total)
    for states in optim.values():
        for key, value in states.items():
            if not isinstance(value, Tensor):
                states[key] = torch.tensor(value)  # e.g. a step count kept as a number: stored as a tensor
    return {"model": msd, "optim": optim}, osd["param_groups"]


def _local(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


# --- the checkpointer ------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    step: int
    path: Path
    checksums: Future  # this rank's files' sizes and sha256, once they are written (see _own_files)
    meta: dict[str, Any]


def _own_files(path: Path, names: list[str]) -> list[str]:
    """The files of ``path`` this rank wrote: ``names`` (RNG state, extras), its DCP data files (``__<rank>_<n>.distcp``
    in DCP's naming) and, on rank 0 (DCP's coordinator), ``.metadata``. Rank 0 hashes whatever this misses at the
    commit, so another naming costs time, never a file without a checksum."""
    data = re.compile(rf"^__{rank()}_\d+\.distcp$")
    return [n for n in checkpoint_files(path) if n in names or data.match(n) or (rank() == 0 and n == ".metadata")]


def _hash_when_written(path: Path, names: list[str], written: Any = None) -> dict[str, dict[str, Any]]:
    """Wait for a background write (``written``: DCP's future), then hash this rank's files of ``path``."""
    if written is not None:
        getattr(written, "upload_completion", written).result()  # a Future, or DCP's AsyncSaveResponse
    return file_checksums(path, _own_files(path, names))


def _run_into(future: Future, fn: Any, *args: Any) -> Future:
    """Run ``fn(*args)`` and put its result, or its exception, into ``future``."""
    try:
        future.set_result(fn(*args))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - handed to wait(), which every rank agrees on
        future.set_exception(err)
    return future


def _write_error(path: Path, err: BaseException | None) -> CheckpointWriteError:
    cause = describe_error(err) if err is not None else "another rank could not write its part"
    return CheckpointWriteError(
        f"cannot write checkpoint '{path}': {cause}. The previous complete checkpoint stays the latest; check the "
        f"free space and permissions of '{path.parent}'"
    )


class Checkpointer:
    """Saves, commits, retains and finds checkpoints in one directory (shared by all ranks).

    Retention keeps the ``keep`` most recent complete checkpoints and every one whose step is a multiple of
    ``keep_every`` (0: none). With ``async_save`` the tensors are copied to host memory, written and hashed by
    background threads while training goes on; the commit marker follows when both have finished (checked at the
    next save, and at the end of the run), so until then the previous checkpoint is the latest.
    """

    def __init__(self, directory: Path, keep: int = 3, keep_every: int = 0, async_save: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep, self.keep_every, self.async_save = keep, keep_every, async_save
        self._pending: _Pending | None = None
        self._async_group: Any = None
        if rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_incomplete()
        barrier()

    def _remove_incomplete(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith(".tmp") or (STEP_DIR.match(path.name) and not (path / MARKER).is_file()):
                log.info("removing incomplete checkpoint %s (a run stopped while writing it)", path)
                shutil.rmtree(path, ignore_errors=True)

    def complete(self) -> list[tuple[int, Path]]:
        return complete_checkpoints(self.directory)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write step ``step`` (every rank calls this); returns its directory, committed unless async.

        ``extra`` maps file names to further state this rank writes with ``torch.save`` (tensors, numbers, lists and
        dicts only: it is loaded with ``weights_only=True``), such as the monitors' state on rank 0.
        """
        self.wait()
        path = self.directory / f"step-{step}"
        if (path / MARKER).is_file():
            log.info("checkpoint %s already exists; not written again", path)
            return path
        if rank() == 0 and path.exists():
            shutil.rmtree(path)
        barrier()
        state, _ = training_state(model, optimizer)
        names = [f"rng-rank{rank()}.pt", *(extra or {})]
        error: BaseException | None = None
        try:
            os.makedirs(path, exist_ok=True)
            torch.save(rng_state(), path / names[0])
            for name, value in (extra or {}).items():
                torch.save(value, path / name)
        except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
            error = err
        if agree(error is not None):  # every rank stops, or none: the others would wait in DCP's collectives
            raise _write_error(path, error) from error
        meta = dict(meta, format=FORMAT, world_size=world_size())
        try:
            checksums: Future = Future()
            if self.async_save:  # the write, then the hashing, off the training thread
                written = dcp.async_save(state, checkpoint_id=str(path), process_group=self._background_group())
                args = (checksums, _hash_when_written, path, names, written)
                threading.Thread(target=_run_into, args=args, name="ssltrain-checksums", daemon=True).start()
            else:
                dcp.save(state, checkpoint_id=str(path))
                _run_into(checksums, _hash_when_written, path, names)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP raises on every rank when any failed
            raise _write_error(path, err) from err
        self._pending = _Pending(step, path, checksums, meta)
        if not self.async_save:
            self.wait()
        return path

    def _background_group(self) -> Any:
        """A separate gloo group for the background writer, so its collectives never interleave with training's."""
        if is_distributed() and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def wait(self) -> None:
        """Finish a pending write and commit it: once every rank's files are written and hashed, rank 0 writes
        meta.json (with every file's checksum) and the marker, then prunes. A failed write is a
        :class:`CheckpointWriteError` on every rank, and the previous checkpoint stays the latest."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        path, error = pending.path, None
        try:
            mine = pending.checksums.result()
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a write or read error of this rank
            mine, error = {}, err
        if agree(error is not None):
            raise _write_error(path, error) from error
        files: dict[str, Any] = {}
        for part in gather_objects(mine):  # also the barrier after every rank's writes
            files.update(part)
        if rank() == 0:
            try:
                files.update(file_checksums(path, [n for n in checkpoint_files(path) if n not in files]))
                meta = dict(pending.meta, **{FILES: dict(sorted(files.items()))})
                write_atomic(path / META_FILE, json.dumps(meta, indent=1).encode())
                write_atomic(path / MARKER, b"")
                self._prune()
            except OSError as err:
                error = err
        if agree(error is not None):
            raise _write_error(path, error) from error

    def _prune(self) -> None:
        done = self.complete()
        recent = {step for step, _ in done[-self.keep :]}
        for step, path in done:
            if step not in recent and not (self.keep_every and step % self.keep_every == 0):
                (path / MARKER).unlink()  # first un-commit, so a half-deleted directory never counts
                shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path, meta: dict[str, Any]) -> None:
    """Check the files of checkpoint ``path`` against the sizes and sha256 in its ``meta.json`` (collective: each rank
    hashes its share of the files); a CheckpointError names the first damaged one and the way out."""
    recorded = meta.get(FILES)
    if recorded is None:
        if rank() == 0:
            log.warning("checkpoint %s has no checksums (written by an older ssltrain): loading it unverified", path)
        return
    names = sorted(recorded)
    problems = [p for p in gather_objects(checksum_problem(path, recorded, names[rank() :: world_size()])) if p]
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: {problems[0]}. Delete that directory to resume from the previous "
            "checkpoint, or set checkpoint.fallback=true to fall back to it automatically."
        )


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Verify checkpoint ``path``'s files, then load model and optimizer in place (resharded to this world size) and
    this rank's RNG; returns meta.json. Collective."""
    meta = read_meta(path)
    verify_checkpoint(path, meta)
    state, param_groups = training_state(model, optimizer)
    reader = SafeReader(str(path))
    try:
        saved = set(reader.read_metadata().state_dict_metadata)
        # A parameter that never had a gradient (frozen at first: DINO's last layer, SwAV's prototypes) has no
        # optimizer state yet; it must stay without one, as in the run that wrote the checkpoint.
        state["optim"] = {
            fqn: kept
            for fqn, states in state["optim"].items()
            if (kept := {k: v for k, v in states.items() if f"optim.{fqn}.{k}" in saved})
        }
        dcp.load(state, checkpoint_id=str(path), storage_reader=reader)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failure must name the checkpoint and the way out
        raise CheckpointError(
            f"cannot load checkpoint '{path}': {describe_error(err)}. Delete that directory to resume from "
            "the previous one (checkpoint.fallback=true does so automatically), or start a fresh run "
            "(checkpoint.resume=false)."
        ) from err
    rows = _sharded_rows(model)
    msd = {k: _local(v) for k, v in state["model"].items()}
    optim_state: dict[str, Any] = {fqn: {k: _local(v) for k, v in s.items()} for fqn, s in state["optim"].items()}
    for fqn in rows:  # loaded into the unpadded rows; put them back into the padded local tensors
        msd[fqn] = _padded_like(model, fqn, msd[fqn])
        for key, value in optim_state.get(fqn, {}).items():
            if value.dim() > 0:
                optim_state[fqn][key] = _padded_like(model, fqn, value)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=msd,
        optim_state_dict={"state": optim_state, "param_groups": param_groups},
        options=StateDictOptions(strict=False),
    )  # model keys were checked by dcp.load already
    rng_file = path / f"rng-rank{rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # more ranks than the run that wrote it: a fresh stream, deterministic in (step, rank)
        torch.manual_seed(int(meta["step"]) * 1_000_003 + rank())
        log.info(
            "rank %d: no RNG state in %s (saved on %s ranks); seeded from the step",
            rank(),
            path,
            meta.get("world_size"),
        )
    return meta


def _padded_like(model: nn.Module, fqn: str, rows: Tensor) -> Tensor:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    param = inner.get_parameter(fqn)
    out = param.detach().clone()
    out[: rows.shape[0]] = rows
    return out
