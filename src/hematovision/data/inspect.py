"""``hematovision data inspect``: what is in a dataset folder, before training on it."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from hematovision.data.images import ImageLoadError, check_file, decode_problem, display_path, load_rgb
from hematovision.data.sources import scan_labelled
from hematovision.data.splits import file_digests


def inspect_dataset(root: str | Path, decode: bool = True) -> dict:
    """Counts per class and split, image sizes and modes, exact duplicates and unreadable files.

    Args:
        root: a dataset folder: class folders, or images/ + a labels CSV.
        decode: fully decode every image to find truncated files (slower); otherwise read headers only.
    """
    from tqdm.auto import tqdm

    folder = scan_labelled(root)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), n in sorted(folder.counts().items(), key=lambda item: (str(item[0][0]), item[0][1])):
        counts[split or "all"][label] = n
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    unreadable = []
    for sample in tqdm(folder.samples, desc="checking images", unit="img"):
        try:
            size, mode = _read_header(sample.path)
            sizes[size] += 1
            modes[mode] += 1
            if decode:
                load_rgb(sample.path)
        except ImageLoadError as error:
            unreadable.append({"file": display_path(sample.path), "reason": str(error)})
    by_digest = defaultdict(list)
    for sample, digest in zip(folder.samples, file_digests(folder.samples)):
        by_digest[digest].append(sample)
    duplicates = [[f"{s.split + '/' if s.split else ''}{s.label}/{display_path(s.path.name)}" for s in group]
                  for group in by_digest.values() if len(group) > 1]
    cross = [group for group in duplicates if len({entry.rsplit("/", 1)[0] for entry in group}) > 1]
    return {
        "root": display_path(folder.root),
        "labels_file": str(folder.labels_file) if folder.labels_file else None,
        "n_images": len(folder.samples),
        "classes": folder.class_names,
        "splits": folder.split_names or None,
        "counts": dict(counts),
        "image_sizes": dict(sizes.most_common(10)),
        "distinct_sizes": len(sizes),
        "modes": dict(modes),
        "duplicate_groups": duplicates,
        "duplicates_across_classes_or_splits": cross,
        "unreadable": unreadable,
        "ignored_non_image_files": [display_path(p) for p in folder.ignored],
    }


def _read_header(path: Path) -> tuple[str, str]:
    """``(WxH, mode)`` from an image's header, without decoding its pixels.

    Raises:
        ImageLoadError: not a regular file (a FIFO is never opened), empty, or no readable image header.
    """
    check_file(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise ImageLoadError(f"{display_path(path)}: cannot open ({error.strerror or error})") from error
    try:
        with handle, Image.open(handle) as image:
            return f"{image.width}x{image.height}", image.mode
    except (MemoryError, RecursionError):
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types on bad headers; each means a bad file
        # (its bomb error from Image.open for headers over 2x its pixel limit, a ValueError for a
        # PNG text chunk over its limit, an OSError for an unknown or unreadable file, ...)
        raise ImageLoadError(f"{display_path(path)}: {decode_problem(error, 'not a readable image')}") from error


def format_inspection(report: dict) -> str:
    """A plain-text table of an :func:`inspect_dataset` report."""
    classes = report["classes"]
    parts = list(report["counts"])
    width = max(12, *(len(c) for c in classes))
    lines = [f"{report['root']}: {report['n_images']} images, {len(classes)} classes"]
    if report.get("labels_file"):
        lines.append(f"labels: {report['labels_file']}")
    lines.append("")
    lines.append(f"{'class':{width}} " + " ".join(f"{p:>11}" for p in parts) + f" {'total':>8}")
    for name in classes:
        row = [report["counts"][p].get(name, 0) for p in parts]
        lines.append(f"{name:{width}} " + " ".join(f"{n:>11}" for n in row) + f" {sum(row):>8}")
    totals = [sum(report["counts"][p].values()) for p in parts]
    lines.append(f"{'total':{width}} " + " ".join(f"{n:>11}" for n in totals) + f" {sum(totals):>8}")
    lines += ["", f"image sizes ({report['distinct_sizes']} distinct, most common): "
              + ", ".join(f"{size} ×{n}" for size, n in report["image_sizes"].items()),
              "modes: " + ", ".join(f"{mode} ×{n}" for mode, n in report["modes"].items()),
              f"exact duplicates: {len(report['duplicate_groups'])} group(s), "
              f"{len(report['duplicates_across_classes_or_splits'])} across classes/splits"]
    for group in report["duplicates_across_classes_or_splits"][:10]:
        lines.append("  " + " = ".join(group))
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    for entry in report["unreadable"][:10]:
        lines.append(f"  {entry['reason']}")
    if report["ignored_non_image_files"]:
        what = "files ignored (not images, or images without a label)" if report.get("labels_file") else "non-image files ignored"
        lines.append(f"{what}: {len(report['ignored_non_image_files'])}")
    return "\n".join(lines)
