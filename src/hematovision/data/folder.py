"""Class-folder datasets: ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*``.

Scanning only lists files; their content is checked when they are decoded
(:func:`load_images`), where unreadable files are counted and skipped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from hematovision.data.classes import normalize_class_name
from hematovision.data.images import ImageLoadError, is_image_file, load_rgb
from hematovision.data.transforms import Preprocessing, resize
from hematovision.errors import DatasetError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
    "test_simple": "test_simple",
}


@dataclass(frozen=True)
class Sample:
    """One labelled image file.

    Attributes:
        source: the dataset it came from when several are merged (``train --data A --data B``).
    """

    path: Path
    label: str
    split: str | None = None
    source: str | None = None


@dataclass
class ImageFolder:
    """The labelled image files found under a root folder.

    Attributes:
        root: the folder scanned.
        samples: every image file with its canonical class (and split, for split layouts).
        ignored: files without an image extension (README, CSV, ...), or images without a label, not used.
        labels_file: the CSV the labels came from (``images/`` + labels CSV layout); None for class folders.
    """

    root: Path
    samples: list[Sample]
    ignored: list[Path] = field(default_factory=list)
    labels_file: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return sorted({sample.label for sample in self.samples})

    @property
    def split_names(self) -> list[str]:
        return sorted({sample.split for sample in self.samples if sample.split})

    def counts(self) -> Counter[tuple[str | None, str]]:
        """Number of files per (split, class)."""
        return Counter((sample.split, sample.label) for sample in self.samples)

    def subset(self, split: str) -> list[Sample]:
        """The samples of one split of a split layout."""
        chosen = [sample for sample in self.samples if sample.split == split]
        if not chosen:
            raise DatasetError(f"{self.root}: no split {split!r}; found {self.split_names or 'no splits'}")
        return chosen


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageFolder:
    """Index a class-folder dataset.

    Args:
        root: ``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``; split folders are
            recognised by name (train, val/valid/validation, test, test_simple).
        classes: keep only these canonical classes (others are left out).

    Raises:
        DatasetError: the folder is missing, has images but no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    subdirs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    split_dirs = [path for path in subdirs if path.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) == len(subdirs):
        samples: list[Sample] = []
        ignored: list[Path] = []
        for split_dir in split_dirs:
            part = _scan_class_dirs(split_dir, SPLIT_ALIASES[split_dir.name.lower()])
            samples += part.samples
            ignored += part.ignored
        folder = ImageFolder(root, samples, ignored)
    else:
        folder = _scan_class_dirs(root, None)
    return keep_classes(folder, classes)


def keep_classes(folder: ImageFolder, classes: Sequence[str] | None) -> ImageFolder:
    """Keep only ``classes`` (any spelling) in ``folder``; a class the folder lacks is a clear error."""
    if classes is not None:
        wanted = {normalize_class_name(name) for name in classes}
        unknown = wanted - set(folder.class_names)
        if unknown:
            raise DatasetError(f"{folder.root}: classes {sorted(unknown)} not found; found {folder.class_names}")
        folder.samples = [sample for sample in folder.samples if sample.label in wanted]
    return folder


def _scan_class_dirs(root: Path, split: str | None) -> ImageFolder:
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    loose_images = [path for path in root.iterdir() if path.is_file() and is_image_file(path)]
    if not class_dirs:
        hint = f" ({len(loose_images)} images lie directly in it)" if loose_images else ""
        raise DatasetError(
            f"{root}: expected one sub-folder per class, e.g. {root}/neutrophil/*.jpg{hint}; "
            "or split folders train/val/test each holding class folders"
        )
    samples, ignored = [], []
    seen_labels: dict[str, str] = {}
    for class_dir in class_dirs:
        label = normalize_class_name(class_dir.name)
        if label in seen_labels:
            log.warning("folders %r and %r both map to class %r", seen_labels[label], class_dir.name, label)
        seen_labels[label] = class_dir.name
        # Not just is_file(): a FIFO or a dangling link named like an image is kept, so that loading
        # lists it as unreadable with its reason (it is never opened) instead of it vanishing.
        files = sorted(path for path in class_dir.rglob("*") if not path.is_dir())
        images = [path for path in files if is_image_file(path)]
        ignored += [path for path in files if not is_image_file(path)]
        if not images:
            raise DatasetError(f"class folder {class_dir} has no image files")
        samples += [Sample(path, label, split) for path in images]
    return ImageFolder(root, samples, ignored)


@dataclass
class LoadedImages:
    """Decoded images of a list of samples, resized to one square size.

    Attributes:
        images: (N, S, S, 3) uint8, only for the files that decoded.
        samples: the samples behind ``images``, in the same order.
        failures: (path, reason) for every file that could not be decoded.
    """

    images: np.ndarray
    samples: list[Sample]
    failures: list[tuple[Path, str]]


def load_images(samples: Sequence[Sample], size: int | Preprocessing, desc: str = "loading images",
                workers: int = 2) -> LoadedImages:
    """Decode ``samples`` to model input pixels; unreadable files are reported and skipped.

    Args:
        size: a side in pixels (plain resize), or a model's :class:`Preprocessing`, whose
            :meth:`~Preprocessing.prepare` (scale and stain normalisation, then the resize) is applied.

    A progress bar shows the rate; decoding runs in ``workers`` threads (Pillow releases the GIL).
    """
    prepare = size.prepare if isinstance(size, Preprocessing) else partial(resize, size=size)
    side = size.image_size if isinstance(size, Preprocessing) else size
    from tqdm.auto import tqdm

    def load_one(sample: Sample) -> np.ndarray | str:
        try:
            return prepare(load_rgb(sample.path))
        except ImageLoadError as error:
            return str(error)

    images, kept, failures = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(load_one, samples)
        for sample, result in tqdm(zip(samples, results), total=len(samples), desc=desc, unit="img"):
            if isinstance(result, str):
                failures.append((sample.path, result))
            else:
                images.append(result)
                kept.append(sample)
    if failures:
        log.warning("skipped %d unreadable file(s) of %d, e.g. %s", len(failures), len(samples), failures[0][1])
    array = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    return LoadedImages(array, kept, failures)


def label_indices(samples: Iterable[Sample], class_names: Sequence[str]) -> np.ndarray:
    """Integer labels of ``samples`` in the order of ``class_names``."""
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[sample.label] for sample in samples], dtype=np.int64)
