"""A lab's cells for ``hematovision adapt``: read, checked, counted and recorded.

Unlabelled cells are every image under a folder; labelled cells are a dataset in any layout
:func:`~hematovision.data.sources.scan_labelled` reads (class folders, or ``images/`` + a labels
CSV). A file is left out, and counted, when it cannot be decoded, or when it cannot be a stained
blood-cell image: blank (nearly uniform) or without colour (grayscale). The files used are recorded
by name and by one sha256 over their contents, so the card says exactly which cells a run was
adapted on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hematovision.data.folder import Sample
from hematovision.data.images import ImageLoadError, is_image_file, load_rgb
from hematovision.data.transforms import Preprocessing
from hematovision.errors import DatasetError

log = logging.getLogger(__name__)

BLANK_STD = 2.0  # grey levels: an image this uniform shows no cell
COLOURLESS = 4.0  # mean max-min channel spread: stained smears are coloured, grayscale photos are not


@dataclass
class LabCells:
    """The lab's usable cells, at the model's input size.

    Attributes:
        folder: the folder they came from.
        images: (N, S, S, 3) uint8, prepared as the model prepares its inputs.
        files: the N files, relative to ``folder``.
        labels: (N,) class indices into the model's classes (few-shot), or ``None`` (unlabelled).
        excluded: (file, reason) of every file left out: unreadable, or not a cell image.
        unknown_classes: class folders the model does not know (left out), few-shot only.
        missing_classes: the model's classes with no labelled cell, few-shot only.
        available: labelled files per class before the k-per-class subset, few-shot only.
    """

    folder: Path
    images: np.ndarray
    files: list[str]
    labels: np.ndarray | None = None
    excluded: list[tuple[str, str]] = field(default_factory=list)
    unknown_classes: list[str] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)
    available: dict[str, int] = field(default_factory=dict)

    def drop(self, keep: np.ndarray, reason: str) -> None:
        """Leave out the cells where ``keep`` is False, recording ``reason``."""
        for index in np.flatnonzero(~keep):
            self.excluded.append((self.files[index], reason))
        self.images = self.images[keep]
        self.files = [name for name, kept in zip(self.files, keep) if kept]
        if self.labels is not None:
            self.labels = self.labels[keep]

    def paths(self) -> list[Path]:
        """The files of the usable cells, in order."""
        return [Path(name) if Path(name).is_absolute() else self.folder / name for name in self.files]

    def record(self, class_names: Sequence[str]) -> dict:
        """What the card says about these cells: folder, counts, excluded files, files and their sha256."""
        reasons = Counter(reason.split(":")[0] for _, reason in self.excluded)
        record: dict = {
            "folder": str(self.folder),
            "n_cells": len(self.files),
            "excluded": {"count": len(self.excluded), "reasons": dict(reasons),
                         "files": [name for name, _ in self.excluded][:200]},
            "files_sha256": _contents_digest(self.folder, self.files),
            "files": self.files,
        }
        if self.labels is not None:
            counts = np.bincount(self.labels, minlength=len(class_names))
            record["per_class"] = {name: int(n) for name, n in zip(class_names, counts) if n}
            record["available_per_class"] = self.available
            record["unknown_classes"] = self.unknown_classes
            record["classes_without_cells"] = self.missing_classes
        return record


def read_unlabelled(folder: str | Path, prep: Preprocessing) -> LabCells:
    """Every image under ``folder`` (recursively), checked and prepared.

    Raises:
        DatasetError: the folder is missing or holds no image files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"folder of unlabelled cells not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise DatasetError(f"{folder} holds no image files (.jpg, .png, .tif, ...)")
    return _read(folder, paths, None, prep)


def read_labelled(folder: str | Path, class_names: Sequence[str], prep: Preprocessing,
                  k_per_class: int | None = None, seed: int = 0) -> LabCells:
    """Labelled cells of the model's classes, at most ``k_per_class`` per class (a seeded subset).

    Classes the model does not know are reported (``unknown_classes``) and left out; the model's
    classes without a labelled cell are listed in ``missing_classes``.

    Raises:
        DatasetError: not a labelled dataset, or none of its classes is one of the model's.
    """
    from hematovision.data.sources import scan_labelled

    folder = Path(folder)
    try:
        found = scan_labelled(folder)
    except DatasetError as error:
        hint = ("; remove the empty folder (a class without labelled cells keeps the source model's head) "
                "or add cells to it") if "has no image files" in str(error) else ""
        raise DatasetError(f"{error}{hint}") from None
    known = set(class_names)
    unknown = sorted({s.label for s in found.samples} - known)
    if unknown:
        log.warning("classes the model does not know, left out: %s", ", ".join(unknown))
    by_class: dict[str, list[Sample]] = {}
    for sample in found.samples:
        if sample.label in known:
            by_class.setdefault(sample.label, []).append(sample)
    if not by_class:
        raise DatasetError(f"none of the classes in {folder} ({', '.join(unknown)}) is one the model knows "
                           f"({', '.join(class_names)}); name the class folders like the model's classes")
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for name in class_names:
        samples = sorted(by_class.get(name, []), key=lambda s: str(s.path))
        if k_per_class is not None and len(samples) > k_per_class:
            samples = [samples[i] for i in sorted(rng.choice(len(samples), k_per_class, replace=False))]
        chosen += samples
    index = {name: i for i, name in enumerate(class_names)}
    cells = _read(folder, [s.path for s in chosen], np.array([index[s.label] for s in chosen]), prep)
    cells.unknown_classes = unknown
    cells.available = {name: len(by_class[name]) for name in class_names if name in by_class}
    present = set(np.unique(cells.labels)) if cells.labels is not None else set()
    cells.missing_classes = [name for i, name in enumerate(class_names) if i not in present]
    return cells


def not_a_cell(image: np.ndarray) -> str | None:
    """Why a decoded RGB image cannot be a stained cell (``None`` when it may be one)."""
    pixels = image.astype(np.float32)
    if pixels.mean(axis=2).std() < BLANK_STD:
        return "not a cell: blank image"
    if (pixels.max(axis=2) - pixels.min(axis=2)).mean() < COLOURLESS:
        return "not a cell: no colour (a stained smear is coloured)"
    return None


def _read(folder: Path, paths: Sequence[Path], labels: np.ndarray | None, prep: Preprocessing) -> LabCells:
    from tqdm.auto import tqdm

    images, files, kept, excluded = [], [], [], []
    for i, path in enumerate(tqdm(paths, desc="reading the lab's cells", unit="img")):
        name = _relative(path, folder)
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            excluded.append((name, f"unreadable: {error}"))
            continue
        reason = not_a_cell(image)
        if reason:
            excluded.append((name, reason))
            continue
        images.append(prep.prepare(image))
        files.append(name)
        kept.append(i)
    size = prep.image_size
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return LabCells(folder, array, files, None if labels is None else labels[kept], excluded)


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _contents_digest(folder: Path, files: Sequence[str]) -> str:
    """One sha256 over the used files' names and bytes, in order."""
    digest = hashlib.sha256()
    for name in files:
        path = Path(name) if Path(name).is_absolute() else folder / name
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
