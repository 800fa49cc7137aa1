"""Loading checkpoints safely, gathered whole into one process (evaluation, export): tensors only, loaded with
``weights_only=True``, and DCP's pickled ``.metadata`` read by an unpickler that admits DCP's own metadata classes
and nothing else."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from ssltrain.core.checkpoint_layout import STEP_DIR, CheckpointError, latest_checkpoint, read_meta

_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


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
        raise CheckpointError(f"cannot load checkpoint '{path}': {type(err).__name__}: {err}") from err
    return {**state, "path": str(path), **meta}
