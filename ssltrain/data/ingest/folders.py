"""Turn a user's image folders into webdataset samples for :func:`ssltrain.data.shards.write_shards`.

Files are stored byte for byte (no re-encoding: no quality loss, and shards are as small as the originals). Each
file is checked with PIL's ``verify()`` first, so a corrupt download fails here, with its path named, rather than
as a decode error deep inside a training run. The extension a sample is stored under comes from the format PIL
detects in the bytes (jpg/png/webp/bmp/ppm), not from the file name, so a PNG saved as ``x.jpg`` still decodes.

Walk order is sorted and keys are derived from it, so the same tree always gives the same samples and keys:

* labelled: ``f"{class_index:05d}_{position:09d}"``; unlabelled: ``f"{position:09d}"``, where ``position`` is the
  file's place among all candidate image files of the tree (skipped files keep their number, so one bad file does
  not shift every later key). Keys hold no dot and no slash, as webdataset requires.

Hidden files and folders (name starting with '.', e.g. ``.ipynb_checkpoints``, macOS ``._x.jpg``) are ignored.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ssltrain.data.shards import IMAGE_EXTS, DataError

# PIL format name -> the extension the sample is stored under (MPO: the multi-picture JPEG many cameras write)
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm"}


class FolderSamples:
    """A single-pass iterator of sample dicts that counts what it skipped.

    ``skipped`` (and ``skipped_files``, with reasons) and ``yielded`` are final once the iterator is exhausted.
    """

    def __init__(self, root: Path, files: list[tuple[Path, int | None]]) -> None:
        self.root = root
        self.files = files  # (path, label or None), in key order
        self.yielded = 0
        self.skipped_files: list[tuple[Path, str]] = []
        self._it = self._generate()

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __iter__(self) -> FolderSamples:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def __len__(self) -> int:
        """Candidate files (an upper bound on what is yielded), e.g. for a progress bar."""
        return len(self.files)

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped_files.append((path, reason))
        warnings.warn(f"skipping '{path}': {reason}", stacklevel=3)

    def _generate(self) -> Iterator[dict]:
        for position, (path, label) in enumerate(self.files):
            sample = folder_sample(path, label, position)
            if isinstance(sample, str):
                self._skip(path, sample)
                continue
            self.yielded += 1
            yield sample
        if self.files and not self.yielded:
            raise DataError(
                f"none of the {len(self.files)} image files under '{self.root}' could be read "
                f"(first: '{self.skipped_files[0][0]}': {self.skipped_files[0][1]}); check that the files are intact"
            )


def folder_sample(path: Path, label: int | None, position: int) -> dict | str:
    """The webdataset sample of one image file, or the reason it is skipped (unreadable, not an image)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        return f"not a valid image ({type(err).__name__}: {err})"
    ext = _FORMAT_EXT.get(fmt or "")
    if ext is None:
        return f"its content is {fmt}, not one of {', '.join(sorted(set(_FORMAT_EXT.values())))}"
    if label is None:
        return {"__key__": f"{position:09d}", ext: data}
    return {"__key__": f"{label:05d}_{position:09d}", ext: data, "cls": label}


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path, root: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), by extension, hidden ones left out, in sorted order."""
    found = [p for p in folder.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTS and _visible(p, root) and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _check_root(root: Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist; pass the directory that holds the {what}")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file, not a folder; pass the directory that holds the {what}")
    return root


def imagefolder_samples(root: Path) -> tuple[list[str], FolderSamples]:
    """Samples of an ImageNet-style tree ``root/<class>/**/<image>``: classes are the sorted subfolder names.

    Returns ``(classes, samples)``; label ``i`` is ``classes[i]``. ``samples.skipped`` counts unreadable files
    once ``samples`` is exhausted. Image files directly under ``root`` belong to no class and are ignored (warned).
    """
    root = _check_root(root, "class subfolders (root/<class>/<images>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"'{root}' has no class subfolders; a labelled image folder is laid out as root/<class>/<images> "
            f"(for images without labels, ingest the folder as unlabelled data)"
        )
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS and _visible(p, root)]
    if loose:
        warnings.warn(
            f"{len(loose)} image file(s) directly under '{root}' are in no class folder and are ignored "
            f"(e.g. '{loose[0].name}'); move them into root/<class>/",
            stacklevel=2,
        )
    files: list[tuple[Path, int | None]] = []
    for label, class_dir in enumerate(class_dirs):
        found = _image_files(class_dir, root)
        if not found:
            warnings.warn(
                f"class folder '{class_dir}' holds no images; its label {label} will have no samples", stacklevel=2
            )
        files.extend((p, label) for p in found)
    if not files:
        raise DataError(
            f"the class folders under '{root}' hold no image files ({', '.join(IMAGE_EXTS)}); "
            f"put the images in root/<class>/"
        )
    return [p.name for p in class_dirs], FolderSamples(root, files)


def unlabeled_samples(root: Path) -> FolderSamples:
    """Samples (no ``cls``) of every image file under ``root``, recursively; ``.skipped`` as for image folders."""
    root = _check_root(root, "images")
    files = _image_files(root, root)
    if not files:
        raise DataError(
            f"'{root}' holds no image files ({', '.join(IMAGE_EXTS)}), searched recursively; check the path"
        )
    return FolderSamples(root, [(p, None) for p in files])
