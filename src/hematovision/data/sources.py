"""Labelled datasets in any layout HematoVision reads, and several of them side by side.

Two layouts are recognised:

- **class folders**: ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*`` (:func:`~hematovision.data.folder.scan_image_folder`);
- **images + a labels CSV**: ``ROOT/images/*`` (or images directly in ``ROOT``) and one CSV in ``ROOT``
  mapping an image ID to its class, e.g. Zheng et al.'s Dataset 1 (``images/001.png`` and
  ``class_labels.csv``: ``image ID,class label`` / ``1,2``). IDs match file names, or their stems
  with or without zero padding (``1`` = ``001.png``). Classes are names (normalised like folder
  names) or numeric codes, read from ``ROOT/class_codes.csv`` (``code,class``) or, for Zheng's
  table, from :data:`~hematovision.data.classes.ZHENG_CODES`. An optional ``split`` column gives
  the split.

:func:`scan_sources` reads several datasets for ``hematovision train --data A --data B``: each
sample records its source, and class filtering is across sources.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from hematovision.data.classes import ZHENG_CODES, normalize_class_name
from hematovision.data.folder import SPLIT_ALIASES, ImageFolder, Sample, keep_classes, scan_image_folder
from hematovision.data.images import is_image_file
from hematovision.errors import DatasetError

log = logging.getLogger(__name__)

# Column names recognised in a labels CSV (normalised: lower case, spaces/dashes as underscores), best first.
ID_COLUMNS = ("image_id", "image", "file", "filename", "file_name", "image_name", "image_path", "path", "id", "name")
LABEL_COLUMNS = ("class_label", "class", "label", "class_name", "category", "cell_type", "type")
SPLIT_COLUMNS = ("split", "subset")
CODES_FILE = "class_codes.csv"
_ZHENG_COLUMNS = ("image_id", "class_label")
_NUMBER = re.compile(r"\d+(\.0*)?")


@dataclass
class LabelledSource:
    """One dataset of a multi-source training set.

    Attributes:
        name: a short unique name (its path relative to the sources' common folder).
        root: the folder as given.
        folder: its samples, each with ``source == name``.
    """

    name: str
    root: Path
    folder: ImageFolder


def scan_labelled(root: str | Path, classes: list[str] | None = None) -> ImageFolder:
    """Index a labelled dataset in either layout (see the module docstring).

    Args:
        root: the dataset folder.
        classes: keep only these canonical classes; each must be present.

    Raises:
        DatasetError: no such folder, an unrecognised layout, or a labels CSV that does not match its
            images (missing files, unknown class codes, an image labelled twice).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    table = find_label_table(root)
    if table is None:
        if (root / "images").is_dir():
            # Not a class called "images": a labels CSV is missing (segmentation sets have images/ + masks/ only).
            raise DatasetError(f"{root} has images/ but no labels CSV beside it (columns: image ID, class); "
                               "or give class folders ROOT/<class>/*")
        return scan_image_folder(root, classes)
    folder = scan_label_table(root, table)
    return keep_classes(folder, classes)


def _image_dir(root: Path) -> Path | None:
    if (root / "images").is_dir():
        return root / "images"
    if any(path.is_file() and is_image_file(path) for path in root.iterdir()):
        return root
    return None


def find_label_table(root: str | Path) -> Path | None:
    """The labels CSV of an ``images/`` + CSV dataset, or None when ``root`` is not one.

    A CSV counts when its columns name an image ID and a class (or, with two unnamed columns, when
    one of them matches the image files). Several such CSVs: the one whose name says label or class.

    Raises:
        DatasetError: several CSVs qualify and none is preferred by name.
    """
    root = Path(root)
    image_dir = _image_dir(root)
    if image_dir is None:
        return None
    index = _FileIndex(image_dir)
    tables = []
    for path in sorted(root.glob("*.csv")):
        if path.name.startswith(".") or path.name == CODES_FILE:
            continue
        try:
            if _columns(_read_rows(path), index):
                tables.append(path)
        except DatasetError as error:  # an unreadable CSV is not a label table; say why if none is found
            log.warning("%s", error)
    if len(tables) > 1:
        named = [path for path in tables if re.search("label|class", path.stem, re.IGNORECASE)]
        if len(named) != 1:
            raise DatasetError(f"{root}: several label tables {[p.name for p in tables]}; keep one CSV of image ID -> class")
        tables = named
    return tables[0] if tables else None


class _FileIndex:
    """The images of one folder, found by file name, stem, or number (``1`` = ``001.png``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = sorted(path for path in folder.iterdir() if path.is_file() and is_image_file(path))
        self.by_key: dict[str, list[Path]] = defaultdict(list)
        for path in self.files:
            keys = {f"name:{path.name.lower()}", f"stem:{path.stem.lower()}"}
            if path.stem.isdigit():
                keys.add(f"number:{int(path.stem)}")
            for key in keys:
                self.by_key[key].append(path)

    def find(self, image_id: str) -> list[Path]:
        """The files an ID may name: none (missing), one, or several (ambiguous).

        The full name is tried first, then the stem (so ``001.bmp`` finds ``001.png`` after a lossless
        conversion), then the number (``1`` and ``1.0`` find ``001.png``).
        """
        name = PurePosixPath(image_id.strip().replace("\\", "/")).name.lower()
        stem = PurePosixPath(name).stem if "." in name else name
        for key in (f"name:{name}", f"stem:{name}", f"stem:{stem}"):
            if key in self.by_key:
                return self.by_key[key]
        return self.by_key.get(f"number:{int(stem)}", []) if stem.isdigit() else []


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not a readable CSV: {error}") from None
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [row for row in csv.reader(text.splitlines(), dialect) if any(cell.strip() for cell in row)]


@dataclass(frozen=True)
class _Columns:
    image_id: int
    label: int
    split: int | None
    header: bool


def _columns(rows: list[list[str]], index: _FileIndex) -> _Columns | None:
    """Which columns hold the ID, the class and the split; None if the table is not a label table."""
    if not rows:
        return None
    names = [_normalise_column(cell) for cell in rows[0]]

    def named(candidates: tuple[str, ...], exclude: int | None = None) -> int | None:
        return next((names.index(c) for c in candidates if c in names and names.index(c) != exclude), None)

    image_id = named(ID_COLUMNS)
    label = named(LABEL_COLUMNS, exclude=image_id)
    if image_id is not None and label is not None:
        return _Columns(image_id, label, named(SPLIT_COLUMNS), header=True)
    if len(rows[0]) != 2:
        return None
    # Two unnamed columns: the ID column is the one whose values are the image files.
    matches = [sum(len(index.find(row[i])) == 1 for row in rows if len(row) == 2) for i in (0, 1)]
    image_id = int(matches[1] > matches[0])
    if matches[image_id] < max(1, len(rows) // 2):
        return None
    return _Columns(image_id, 1 - image_id, None, header=len(index.find(rows[0][image_id])) != 1)


def scan_label_table(root: str | Path, table: str | Path) -> ImageFolder:
    """Index an ``images/`` + labels CSV dataset.

    Raises:
        DatasetError: the CSV's columns are not recognised, a labelled image is missing or ambiguous,
            a class code is unknown, or an image is labelled twice with different classes.
    """
    root, table = Path(root), Path(table)
    image_dir = _image_dir(root)
    if image_dir is None:
        raise DatasetError(f"{root}: no images/ folder (or images) beside {table.name}")
    index = _FileIndex(image_dir)
    rows = _read_rows(table)
    columns = _columns(rows, index)
    if columns is None:
        raise DatasetError(f"{table}: expected an image ID column ({', '.join(ID_COLUMNS[:4])}, ...) "
                           f"and a class column ({', '.join(LABEL_COLUMNS[:4])}, ...); found {rows[0] if rows else 'no rows'}")
    header = [_normalise_column(cell) for cell in rows[0]] if columns.header else []
    body = rows[1:] if columns.header else rows
    width = max(columns.image_id, columns.label, columns.split or 0) + 1
    body = [row + [""] * (width - len(row)) for row in body]
    decode = _label_decoder(root, table, [row[columns.label].strip() for row in body], header, columns)

    labelled: dict[Path, Sample] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    unlabelled = 0
    for row in body:
        image_id, raw_label = row[columns.image_id].strip(), row[columns.label].strip()
        if not raw_label:
            unlabelled += 1
            continue
        found = index.find(image_id)
        if len(found) != 1:
            (ambiguous if found else missing).append(image_id)
            continue
        split = None
        if columns.split is not None and row[columns.split].strip():
            split = SPLIT_ALIASES.get(row[columns.split].strip().lower())
            if split is None:
                raise DatasetError(f"{table}: split {row[columns.split]!r} of image {image_id} is not one of "
                                   f"{sorted(set(SPLIT_ALIASES.values()))}")
        sample = Sample(found[0], decode(raw_label, image_id), split)
        previous = labelled.get(found[0])
        if previous is not None and previous != sample:
            raise DatasetError(f"{table}: image {image_id} is labelled twice ({previous.label}, {sample.label})")
        labelled[found[0]] = sample
    if missing:
        raise DatasetError(f"{table}: {len(missing)} labelled image(s) not found in {image_dir}, e.g. ID(s) "
                           f"{', '.join(missing[:5])} (IDs match file names or stems, with or without zero padding)")
    if ambiguous:
        raise DatasetError(f"{table}: ID(s) {', '.join(ambiguous[:5])} match several files in {image_dir} "
                           f"(e.g. {', '.join(p.name for p in index.find(ambiguous[0]))}); give full file names")
    if not labelled:
        raise DatasetError(f"{table}: no labelled images")
    if unlabelled:
        log.warning("%s: %d row(s) without a class left out", table, unlabelled)
    others = [path for path in index.files if path not in labelled]
    if others:
        log.warning("%s: %d image(s) in %s have no label and are left out", table, len(others), image_dir)
    ignored = others + sorted(path for path in image_dir.iterdir() if path.is_file() and not is_image_file(path))
    samples = sorted(labelled.values(), key=lambda sample: sample.path)
    return ImageFolder(root, samples, ignored, labels_file=table)


def _label_decoder(root: Path, table: Path, labels: list[str], header: list[str],
                   columns: _Columns) -> Callable[[str, str], str]:
    """A function (label, image id) -> canonical class: names are normalised, numeric codes looked up."""
    values = [label for label in labels if label]
    if not values or not all(_NUMBER.fullmatch(label) for label in values):
        return lambda label, image_id: normalize_class_name(label)
    codes_file = root / CODES_FILE
    if codes_file.is_file():
        codes = {}
        for row in _read_rows(codes_file):
            if len(row) >= 2 and _NUMBER.fullmatch(row[0].strip()):
                codes[int(float(row[0]))] = normalize_class_name(row[1])
        where = str(codes_file)
    elif header and (header[columns.image_id], header[columns.label]) == _ZHENG_COLUMNS:
        codes, where = dict(ZHENG_CODES), "Zheng et al.'s Dataset 1 codes"
    else:
        raise DatasetError(f"{table}: the class column holds numeric codes ({', '.join(sorted(set(values))[:6])}); "
                           f"say which class each code is in {codes_file} (rows: code,class)")

    def decode(label: str, image_id: str) -> str:
        code = int(float(label))
        if code not in codes:
            raise DatasetError(f"{table}: class code {code} of image {image_id} is unknown; "
                               f"the codes ({where}) are {codes}")
        return codes[code]

    return decode


def source_names(roots: list[Path]) -> list[str]:
    """Short unique names: each folder's path relative to the folders' common parent.

    One folder is named by its own name. ``../shared/data/pbc_dev`` and ``../shared/data/wbc_seg_zheng/dataset1``
    become ``pbc_dev`` and ``wbc_seg_zheng/dataset1``.

    Raises:
        DatasetError: a folder is given twice or lies inside another.
    """
    paths = [Path(os.path.abspath(root)) for root in roots]
    if len(paths) == 1:
        return [paths[0].name]
    for i, path in enumerate(paths):
        for other in paths[i + 1:]:
            if path == other or path in other.parents or other in path.parents:
                raise DatasetError(f"--data {path} and {other} overlap; give each dataset once")
    common = Path(os.path.commonpath(paths))
    return [path.relative_to(common).as_posix() for path in paths]


def scan_sources(roots: list[Path], classes: list[str] | None = None) -> list[LabelledSource]:
    """Index several labelled datasets; every sample records its source's name.

    Args:
        roots: dataset folders, each in either layout.
        classes: keep only these classes. Each must be in at least one source (with one source:
            in that source, as :func:`scan_labelled` asks); a class may be missing from some sources.

    Raises:
        DatasetError: a bad folder, overlapping folders, a wanted class in no source, or a source
            left without images by ``classes``.
    """
    names = source_names(roots)
    sources = []
    for root, name in zip(roots, names):
        folder = scan_labelled(root, classes if len(roots) == 1 else None)
        folder.samples = [replace(sample, source=name) for sample in folder.samples]
        sources.append(LabelledSource(name, Path(root), folder))
    if classes is not None and len(roots) > 1:
        wanted = {normalize_class_name(name) for name in classes}
        found = set().union(*(source.folder.class_names for source in sources))
        if wanted - found:
            raise DatasetError(f"classes {sorted(wanted - found)} are in none of the datasets; found {sorted(found)}")
        for source in sources:
            source.folder.samples = [sample for sample in source.folder.samples if sample.label in wanted]
            if not source.folder.samples:
                raise DatasetError(f"{source.root} has none of the classes {sorted(wanted)}")
    return sources


def report_sources(sources: list[LabelledSource], samples: list[Sample], splits: list[str], digests: list[str]) -> None:
    """Log what a merge of several datasets may hide: classes some lack, parts a source is absent from, copies."""
    for name, present in classes_in_some_sources({s.name: set(s.folder.class_names) for s in sources}).items():
        log.info("class %s is only in %s", name, ", ".join(present))
    for source in sources:
        parts = {split for sample, split in zip(samples, splits) if sample.source == source.name}
        if missing := {"train", "val", "test"} - parts:
            log.warning("%s has no images in the %s split (too few images per class)", source.name, "/".join(sorted(missing)))
    first_source: dict[str, str | None] = {}
    copies = sum(first_source.setdefault(digest, sample.source) != sample.source for sample, digest in zip(samples, digests))
    if copies:
        log.warning("%d file(s) are byte-identical to a file of another source; each source is split on its own, "
                    "so such copies may sit on both sides of the split", copies)


def source_summaries(roots: list[Path], samples: list[Sample], used: dict[str, list[Sample]],
                     seeded: str) -> list[dict[str, Any]]:
    """Per source (for the model card): its name, folder, how it was split, and images per split and class.

    Args:
        roots: the source folders, in ``--data`` order.
        samples: every sample scanned (their ``split`` says whether a source had split folders).
        used: the samples actually used in each part (readable, of the model's classes).
        seeded: how a source without split folders was split.
    """
    summaries = []
    for name, path in zip(source_names(roots), roots):
        counts: dict[str, dict[str, int]] = {}
        for part, part_samples in used.items():
            for sample in part_samples:
                if sample.source == name:
                    by_class = counts.setdefault(part, {})
                    by_class[sample.label] = by_class.get(sample.label, 0) + 1
        given = any(sample.split for sample in samples if sample.source == name)
        summaries.append({"name": name, "path": str(path), "split": "given folders" if given else seeded,
                          "n_images": {part: sum(by_class.values()) for part, by_class in counts.items()},
                          "counts": {part: dict(sorted(by_class.items())) for part, by_class in counts.items()}})
    return summaries


def classes_in_some_sources(present: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each class that some sources lack, with the sources that have it ({} when all share every class).

    Args:
        present: the classes of each source, by source name.
    """
    everywhere = set().union(*present.values())
    return {c: [name for name, have in present.items() if c in have]
            for c in sorted(everywhere) if not all(c in have for have in present.values())}
