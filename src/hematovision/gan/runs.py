"""A GAN run folder: one DCGAN per class in ``OUT/<class>/``, and ``OUT/run.json`` over them all; or
one class-conditional projected GAN for every class in ``OUT/`` itself.

:func:`train_gans` is what ``hematovision gan train`` runs. Classes may be trained by separate
calls into one run folder (e.g. one class per machine, or ``--resume`` with more iterations);
``run.json`` then merges each call's classes with those already recorded.
:func:`train_projected` is what ``hematovision gan train --arch projected`` runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from hematovision._io import write_json
from hematovision.data.folder import Sample
from hematovision.errors import HematoVisionError
from hematovision.gan.train import GanConfig
from hematovision.gan.train_projected import ProjectedGanConfig

RUN_FILE = "run.json"
# What run.json keeps of each class's card (the card itself is in the class folder).
_RUN_FIELDS = ("iterations", "train_seconds", "num_train_images")


def check_config(config: GanConfig) -> None:
    """Refuse settings training would only fail on later (an unknown DiffAugment operation).

    Raises:
        HematoVisionError: the setting is invalid, in one line.
    """
    from hematovision.gan.augment import parse_policy

    try:
        parse_policy(config.augment)
    except ValueError as error:
        raise HematoVisionError(str(error)) from None


def training_samples(
    data: str | Path | None = None,
    split: str | Path | None = None,
    split_part: str = "train",
    classes: Sequence[str] | None = None,
) -> dict[str, list[Sample]]:
    """Class -> training samples, from one part of a split CSV or from a class-folder dataset.

    Args:
        data: class-folder dataset ``ROOT/<class>/*`` (used when ``split`` is not given).
        split: split CSV (file,label,split); only its ``split_part`` rows are used, so held-out
            images stay unseen.
        split_part: which rows of ``split`` to train on.
        classes: the classes wanted (any spelling :func:`normalize_class_name` knows); all when
            ``None`` or empty.

    Raises:
        HematoVisionError: no source, a missing split file, no rows of ``split_part``, or a wanted
            class without images.
    """
    from hematovision.data.classes import normalize_class_name
    from hematovision.data.folder import scan_image_folder
    from hematovision.data.splits import read_split_csv

    if split:
        split = Path(split)
        if not split.exists():
            raise HematoVisionError(f"split file not found: {split}")
        samples = [sample for sample, part in read_split_csv(split) if part == split_part]
        if not samples:
            raise HematoVisionError(f"{split} has no rows with split {split_part!r}")
    elif data:
        samples = scan_image_folder(data).samples
    else:
        raise HematoVisionError("give --data DIR or --split CSV")
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    wanted = [normalize_class_name(name) for name in classes] if classes else sorted(by_class)
    missing = [name for name in wanted if name not in by_class]
    if missing:
        raise HematoVisionError(f"no training images for class(es) {missing}; found {sorted(by_class)}")
    return {name: by_class[name] for name in wanted}


def train_gans(
    out_dir: str | Path,
    config: GanConfig,
    data: str | Path | None = None,
    split: str | Path | None = None,
    split_part: str = "train",
    classes: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    on_trained: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Train (or resume) one DCGAN per class into ``out_dir/<class>/`` and record the run.

    Args:
        out_dir: the run folder.
        config: training settings, the same for every class.
        data, split, split_part, classes: where the training images come from (see
            :func:`training_samples`).
        resume: continue classes from their checkpoints.
        progress: show progress bars.
        max_minutes: stop each class after this many minutes of training in this call.
        on_trained: called with each class's name and card as soon as it is trained.

    Returns:
        The GAN card of each class trained in this call.
    """
    from hematovision.data.folder import load_images
    from hematovision.gan.train import train_class_gan

    check_config(config)
    out_dir = Path(out_dir)
    cards = {}
    for class_name, samples in training_samples(data, split, split_part, classes).items():
        loaded = load_images(samples, config.size, desc=f"loading {class_name}")
        cards[class_name] = train_class_gan(
            loaded.images, out_dir / class_name, config, class_name,
            resume=resume, progress=progress, max_minutes=max_minutes,
        )
        if on_trained is not None:
            on_trained(class_name, cards[class_name])
    record_run(out_dir, cards, source=str(split or data), split_part=split_part if split else None)
    return cards


def train_projected(
    out_dir: str | Path,
    config: ProjectedGanConfig,
    data: str | Path | None = None,
    split: str | Path | None = None,
    split_part: str = "train",
    classes: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    device: str = "cpu",
) -> dict:
    """Train (or resume) one class-conditional projected GAN for all classes into ``out_dir``.

    The arguments are those of :func:`train_gans`, plus ``device``. Returns the GAN card.

    Raises:
        HematoVisionError: fewer than two classes, or what :func:`training_samples` and
            :func:`hematovision.gan.train_projected.train_projected_gan` refuse.
    """
    from hematovision.data.folder import load_images
    from hematovision.gan.train_projected import train_projected_gan

    samples = training_samples(data, split, split_part, classes)
    if len(samples) < 2:
        raise HematoVisionError(f"a class-conditional GAN needs at least two classes; got {sorted(samples)}")
    config.check(len(samples))
    images = {name: load_images(found, config.size, desc=f"loading {name}").images for name, found in samples.items()}
    return train_projected_gan(images, out_dir, config, resume=resume, progress=progress, max_minutes=max_minutes,
                               device=device)


def record_run(out_dir: str | Path, cards: dict[str, dict], source: str, split_part: str | None) -> dict:
    """Merge the classes trained in one call into ``run.json`` (classes trained before stay).

    Args:
        out_dir: the run folder.
        cards: class -> GAN card of the classes just trained.
        source: the dataset folder or split CSV they were trained on.
        split_part: the split CSV's part used (``None`` for a dataset folder).

    Returns:
        The summary written: the config, source, each class's iterations, training seconds
        and image count, and the total training seconds.
    """
    run_file = Path(out_dir) / RUN_FILE
    summary = json.loads(run_file.read_text()) if run_file.exists() else {"classes": {}}
    summary["config"] = cards[next(iter(cards))]["config"]
    summary["source"] = source
    summary["split_part"] = split_part
    for name, card in cards.items():
        summary["classes"][name] = {key: card[key] for key in _RUN_FIELDS}
    summary["total_train_seconds"] = round(sum(c["train_seconds"] for c in summary["classes"].values()), 1)
    write_json(run_file, summary)
    return summary
