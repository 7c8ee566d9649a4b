"""Seeded, stratified and grouped splits, saved as CSV so every number names its split.

Images that must not be separated share a *group*: byte-identical files always do, and
a dataset can add its own groups (e.g. ``provenance_sift.csv`` maps each augmented image
to the smear frame it was made from).
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write
from hematovision.data.folder import Sample
from hematovision.errors import DatasetError


def file_digests(samples: Sequence[Sample]) -> list[str]:
    """The sha256 of each sample's file (unreadable files get a digest of their path)."""
    digests = []
    for sample in samples:
        try:
            if not sample.path.is_file():  # reading a FIFO would block until something writes to it
                raise OSError("not a regular file")
            digests.append(hashlib.sha256(sample.path.read_bytes()).hexdigest())
        except OSError:
            digests.append(hashlib.sha256(str(sample.path).encode()).hexdigest())
    return digests


def content_groups(samples: Sequence[Sample], extra_groups: Mapping[str, str] | None = None,
                   digests: Sequence[str] | None = None) -> list[str]:
    """A group id per sample: the explicit group for its file if given, else its sha256.

    Byte-identical files get the same id, so they can never land on both sides of a split.
    Explicit groups are looked up by the file's trailing path parts, longest first
    (``split/class/file``, ``class/file``, ``file``; lower case), as :func:`read_group_csv` keys them.
    """
    digests = digests if digests is not None else file_digests(samples)
    groups = []
    for sample, digest in zip(samples, digests):
        group = _lookup_group(sample.path, extra_groups) if extra_groups else None
        groups.append(f"group:{group}" if group is not None else f"sha256:{digest}")
    return groups


def _lookup_group(path: Path, extra_groups: Mapping[str, str]) -> str | None:
    parts = [part.lower() for part in path.parts]
    for length in (3, 2, 1):
        key = "/".join(parts[-length:])
        if key in extra_groups:
            return extra_groups[key]
    return None


def read_group_csv(path: str | Path, file_column: str | None = None, group_column: str | None = None) -> dict[str, str]:
    """Read a file→group mapping from a CSV.

    Without explicit columns the file column is the first one whose values end in an image
    extension and the group column is ``group``, ``source_original`` or the second column.
    Keys are lower-case ``split/class/file`` when the CSV has ``split`` and ``class`` columns
    (file names repeat across classes in some datasets), ``class/file`` with only ``class``,
    else the file name.
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DatasetError(f"group file {path} is empty")
    columns = list(rows[0])
    if file_column is None:
        file_column = next(
            (c for c in columns if str(rows[0][c]).lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))), columns[0]
        )
    if group_column is None:
        group_column = next((c for c in ("group", "source_original") if c in columns), columns[1])
    prefix_columns = [c for c in ("split", "class") if c in columns]
    mapping = {}
    for row in rows:
        if row.get(group_column):
            key = "/".join([row[c] for c in prefix_columns] + [Path(row[file_column]).name]).lower()
            mapping[key] = row[group_column]
    return mapping


def _group_labels(labels: Sequence[str], groups: Sequence[str]) -> tuple[list[str], dict[str, list[int]]]:
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    order = list(members)
    # A group is stratified by its most common label (groups of mixed labels are rare: cross-class duplicates).
    group_label = [max(set(labels[i] for i in members[g]), key=lambda lab: sum(labels[i] == lab for i in members[g]))
                   for g in order]
    return group_label, members


def train_val_test_split(
    labels: Sequence[str],
    groups: Sequence[str],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Assign each sample to ``train``, ``val`` or ``test``, stratified by class, whole groups together.

    Within each class, groups are shuffled with ``seed`` and dealt out so each part gets
    its fraction of the class's images (rounded); every part gets at least one group per
    class when the class has three or more groups.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    group_label, members = _group_labels(labels, groups)
    rng = np.random.default_rng(seed)
    assignment = [""] * len(labels)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, label in zip(members, group_label):
        by_class[label].append(group)
    for label in sorted(by_class):
        class_groups = by_class[label]
        rng.shuffle(class_groups)
        total = sum(len(members[g]) for g in class_groups)
        targets = np.array(fractions) * total
        counts = np.zeros(3)
        for position, group in enumerate(class_groups):
            remaining = len(class_groups) - position
            # Parts still without any group of this class take the next groups first.
            empty = [part for part in (2, 1) if counts[part] == 0 and targets[part] > 0]
            if empty and remaining <= len(empty) and len(class_groups) >= 3:
                part = empty[0]
            else:
                part = int(np.argmax(targets - counts))
            counts[part] += len(members[group])
            for index in members[group]:
                assignment[index] = ("train", "val", "test")[part]
    return assignment


def carve_validation(labels: Sequence[str], groups: Sequence[str], seed: int = 0) -> list[str]:
    """Split a training part into ``train`` (85%) and ``val`` (15%), stratified, whole groups together.

    Used where only training data is given: ``hematovision train --train-dir`` and the frozen
    head of the benchmark's "ours" row, whose regularisation is chosen on the validation part.
    """
    return train_val_test_split(labels, groups, fractions=(0.85, 0.15, 0.0), seed=seed)


def kfold_assignment(labels: Sequence[str], groups: Sequence[str], k: int, seed: int = 0) -> list[int]:
    """Fold number (0..k-1) per sample: stratified by class, whole groups together."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = defaultdict(int)
    for label in labels:
        counts[label] += 1
    if min(counts.values()) < k:
        rare = {label: n for label, n in counts.items() if n < k}
        raise DatasetError(f"{k}-fold needs at least {k} images per class; too few in {rare}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [-1] * len(labels)
    dummy = np.zeros(len(labels))
    for fold, (_, test_index) in enumerate(splitter.split(dummy, list(labels), list(groups))):
        for index in test_index:
            folds[index] = fold
    return folds


def write_split_csv(path: str | Path, samples: Sequence[Sample], parts: Sequence[str | int], groups: Sequence[str],
                    column: str = "split") -> Path:
    """Save (file, label, split or fold, group) rows; ``file`` is the path as given.

    A fifth column, ``source``, names each sample's dataset when the samples record one.
    """
    with_source = any(sample.source for sample in samples)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label", column, "group"] + (["source"] if with_source else []))
            for sample, part, group in zip(samples, parts, groups):
                writer.writerow([str(sample.path), sample.label, part, group] + ([sample.source] if with_source else []))

    return atomic_write(path, write)


def read_split_csv(path: str | Path) -> list[tuple[Sample, str]]:
    """Read a split CSV back as (sample, split-or-fold) pairs; files without a ``source`` column read as before."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        column = "split" if "split" in (reader.fieldnames or []) else "fold"
        return [(Sample(Path(row["file"]), row["label"], source=row.get("source") or None), row[column])
                for row in reader]
