"""Loading checkpoints safely, gathered whole into one process (evaluation, export): every file checked against the
checksums in ``meta.json``, tensors only, loaded with ``weights_only=True``, and DCP's pickled ``.metadata`` read
by an unpickler that admits DCP's own metadata classes and nothing else."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from ssltrain.core.checkpoint_layout import (
    FILES,
    STEP_DIR,
    CheckpointError,
    checksum_problem,
    latest_checkpoint,
    read_meta,
)

log = logging.getLogger("ssltrain")

_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def describe_error(err: BaseException) -> str:
    """One line for a failed checkpoint read or write: DCP's CheckpointException prints every rank's traceback, so
    take the first rank's exception instead, and an OSError behind it (a full disk, a file-size limit) where there
    is one, since torch's writer reports those as an unrelated RuntimeError."""
    where = ""
    if isinstance(err, CheckpointException) and err.failures:
        failed_rank, (err, _) = next(iter(err.failures.items()))
        where = f"rank {failed_rank}: "
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    root = next((e for e in chain if isinstance(e, OSError)), err)
    text = " ".join(str(root).split())
    return f"{where}{type(root).__name__}: {text}"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and sizes; anything else in ``.metadata`` is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (
            module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
            or (module, name) in _ALLOWED_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never needs")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata unpickling admits only DCP's own classes, and which refuses pickled objects."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise CheckpointError(f"cannot read '{path}': {err}") from err
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CheckpointError(
                f"'{path.parent}' holds pickled objects ({pickled[0]}, ...); ssltrain checkpoints hold "
                "tensors only and pickles are not loaded"
            )

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_checkpoint(path: Path, parts: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """A checkpoint gathered whole into this process, for eval and export: ``{"model": full state dict,
    **meta.json}`` (add ``"optim"`` to ``parts`` for the optimizer state, keyed by parameter name).

    ``path`` is a step directory or a run directory (its latest complete checkpoint).
    """
    path = Path(path)
    if not STEP_DIR.match(path.name):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under '{path}'; train first, or give a step-<N> directory")
        path = found
    meta = read_meta(path)
    recorded = meta.get(FILES)
    if recorded is None:
        log.warning("checkpoint %s has no checksums (written by an older ssltrain): loading it unverified", path)
    elif problem := checksum_problem(path, recorded, sorted(recorded)):
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: {problem}. Give an earlier step-<N> directory of '{path.parent}' instead."
        )
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state,
            storage_reader=SafeReader(str(path)),
            planner=_EmptyStateDictLoadPlanner(keys=set(parts)),
            no_dist=True,
        )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
        raise CheckpointError(f"cannot load checkpoint '{path}': {describe_error(err)}") from err
    return {**state, "path": str(path), **meta}
