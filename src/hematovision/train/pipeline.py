"""``hematovision train``: data → split → frozen or fine-tuned model → calibrated, evaluated run folder."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import hematovision
from hematovision._io import write_json
from hematovision.data.folder import LoadedImages, Sample, label_indices, load_images
from hematovision.data.sources import (
    LabelledSource,
    classes_in_some_sources,
    report_sources,
    scan_labelled,
    scan_sources,
    source_summaries,
)
from hematovision.data.splits import (
    carve_validation,
    content_groups,
    file_digests,
    read_group_csv,
    train_val_test_split,
    write_split_csv,
)
from hematovision.data.transforms import Preprocessing
from hematovision.errors import DatasetError
from hematovision.evaluate.metrics import fit_temperature, softmax
from hematovision.models import create_model, get_model_info
from hematovision.models.frozen import DEFAULT_TAPS, backbone_names, frozen_input_spec
from hematovision.run import (
    CONFIG_FILE,
    FEW_SHOT_START_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    UNREADABLE_FILE,
    VAL_DIR,
    FrozenHead,
    ModelCard,
    save_weights,
    write_card,
)
from hematovision.train import distributed
from hematovision.train.augment import augmented_copy_features, copies_record, fit_training_stain
from hematovision.train.features import FeatureExtractor
from hematovision.train.finetune import FinetuneConfig, finetune, predict_logits
from hematovision.train.frozen import fit_frozen_classifier, head_hidden
from hematovision.train.last_stages import FineTuneSettings, can_finetune, fine_tune

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything ``hematovision train`` needs; saved as ``train_config.json`` in the run folder.

    Attributes:
        out: the run folder.
        data: a dataset folder, or several (``--data A --data B``): each is split on its own (70/15/15
            unless it has train/val/test folders) and the parts are merged; ``split.csv`` names each
            image's source.
        train_dir, val_dir, test_dir: explicit splits instead of ``data``.
        mode: ``frozen`` (cached features + head) or ``finetune``.
        backbone: registry name.
        pretrained: start from ImageNet weights (frozen mode requires them).
        image_size: input side; default 224 for frozen, 192 for finetune.
        classes: keep only these classes.
        group_csv: CSV mapping file names to groups that must stay on one side of the split.
        seed: split and training seed.
        head: frozen head, ``logreg`` or ``mlp``.
        tta: dihedral views (flips/90° rotations) averaged per image: in the features (frozen)
            or in the logits (finetune). Saved in the model card; prediction uses the same.
        finetune: the fine-tuning settings.
        resume: continue an interrupted fine-tuning run.
        stain_norm: ``reinhard`` or ``macenko``: fit a stain reference on the training images and
            normalise every image to it (``Preprocessing.stain``: prediction does the same).
        augment_copies: frozen mode: K stain- and optics-augmented copies of each training image
            join the head's training data (0: none). Recorded in the card's ``data["augment_copies"]``.
        augment_strength: how strong those copies' changes are (1: the spread measured between labs).
        cell_scale: scale normalisation (``Preprocessing.cell_scale``): every image is cropped or padded
            around its white cell so the cell spans this fraction of the input; ``None``: off.
        lab_standardise: frozen mode, logistic head: standardise each source's features with its own
            class-balanced statistics before the head (``train.frozen.fit_head``); ``evaluate`` then
            standardises another lab's folder on its own cells. Recorded as ``frozen.standardisation``.
        morphology: with ``lab_standardise``: fit the morphology expert (:mod:`hematovision.infer.morphology`)
            on the cells' measured shape and colour ratios, per lab; it is fused with the network's
            logits on another lab's cells. Recorded as the card's ``morphology``.
        few_shot_start: frozen mode: also fine-tune the backbone's last stages on the training split for
            this many steps (0: off) and keep that network beside the head (``few_shot_start.safetensors``):
            ``adapt --data`` then fine-tunes a new lab's cells from white-cell features rather than
            ImageNet's (:func:`_fit_few_shot_start`). Recorded as the card's ``few_shot_start``.
    """

    out: Path
    data: Path | list[Path] | None = None
    train_dir: Path | None = None
    val_dir: Path | None = None
    test_dir: Path | None = None
    mode: str = "frozen"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int | None = None
    classes: list[str] | None = None
    group_csv: Path | None = None
    seed: int = 0
    head: str = "logreg"
    tta: int = 1
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resume: bool = False
    stain_norm: str | None = None
    augment_copies: int = 0
    augment_strength: float = 1.0
    cell_scale: float | None = None
    lab_standardise: bool = False
    morphology: bool = False
    few_shot_start: int = 0

    def data_dirs(self) -> list[Path]:
        """The ``data`` folders as a list (empty when the splits are given with ``train_dir``)."""
        if self.data is None:
            return []
        return [Path(path) for path in self.data] if isinstance(self.data, (list, tuple)) else [Path(self.data)]

    def resolved_image_size(self) -> int:
        if self.image_size:
            return self.image_size
        if self.mode == "frozen":
            return frozen_input_spec(self.backbone)[0]
        return min(192, get_model_info(self.backbone).input_size)


def resolve_splits(config: TrainConfig) -> tuple[list[Sample], list[str], list[str], list[str]]:
    """The samples, their split names, groups and file sha256 digests; writes nothing.

    With ``data``, every sample's ``source`` names its dataset; with several datasets each is split
    on its own and its groups are prefixed with its name, so no group spans two sources.
    """
    if config.data is None and config.train_dir is None:
        raise DatasetError("give --data DIR, or --train-dir (with optional --val-dir/--test-dir)")
    extra_groups = read_group_csv(config.group_csv) if config.group_csv else None
    if config.data is not None:
        sources = scan_sources(config.data_dirs(), config.classes)
        samples, splits, groups, digests = [], [], [], []
        for source in sources:
            part = _split_source(source, extra_groups, config.seed)
            samples += part[0]
            splits += part[1]
            groups += [f"{source.name}:{group}" for group in part[2]] if len(sources) > 1 else part[2]
            digests += part[3]
        if len(sources) > 1:
            report_sources(sources, samples, splits, digests)
        return samples, splits, groups, digests
    samples, given = [], []
    for name, folder_path in (("train", config.train_dir), ("val", config.val_dir), ("test", config.test_dir)):
        if folder_path is not None:
            part_samples = scan_labelled(folder_path, config.classes).samples
            samples += part_samples
            given += [name] * len(part_samples)
    return _grouped_split(samples, given, extra_groups, config.seed)


def _split_source(source: LabelledSource, extra_groups: dict[str, str] | None,
                  seed: int) -> tuple[list[Sample], list[str], list[str], list[str]]:
    """One dataset's split: its own split folders if it has them, else the seeded grouped 70/15/15."""
    folder = source.folder
    samples = folder.samples
    if folder.split_names:
        given: list[str] | None = [sample.split or "" for sample in samples]
        if "train" not in given:
            raise DatasetError(f"{source.root} has split folders {folder.split_names} but no train folder")
    else:
        given = None
    return _grouped_split(samples, given, extra_groups, seed)


def _grouped_split(samples: list[Sample], given: list[str] | None, extra_groups: dict[str, str] | None,
                   seed: int) -> tuple[list[Sample], list[str], list[str], list[str]]:
    digests = file_digests(samples)
    groups = content_groups(samples, extra_groups, digests)
    labels = [sample.label for sample in samples]
    if given is None:
        splits = train_val_test_split(labels, groups, seed=seed)
    else:
        splits = list(given)
        if "val" not in splits:
            # Carve a validation part out of train, whole groups together (needed for early stopping and calibration).
            train_index = [i for i, s in enumerate(splits) if s == "train"]
            carved = carve_validation([labels[i] for i in train_index], [groups[i] for i in train_index], seed=seed)
            for i, part in zip(train_index, carved):
                splits[i] = part
    return samples, splits, groups, digests


SEEDED_SPLIT = "seeded stratified 70/15/15, duplicate files grouped"


def _data_section(config: TrainConfig, samples: list[Sample], parts: dict[str, LoadedImages], failures: int) -> dict:
    """The card's ``data``: where the images came from, how they were split, how many were used."""
    dirs = config.data_dirs()
    if len(dirs) > 1:
        split = "each source split on its own (its given folders, else " + SEEDED_SPLIT + "); groups never span sources"
    else:
        split = "given folders" if config.train_dir or any(s.split for s in samples) else SEEDED_SPLIT
    data = {
        "source": " + ".join(map(str, dirs)) or str(config.train_dir),
        "n_images": {part: len(loaded.samples) for part, loaded in parts.items()},
        "unreadable_files": failures,
        "seed": config.seed,
        "split": split,
    }
    if dirs:
        used = {part: loaded.samples for part, loaded in parts.items()}
        data["sources"] = source_summaries(dirs, samples, used, SEEDED_SPLIT)
    if len(dirs) > 1:
        data["classes_in_some_sources"] = classes_in_some_sources(
            {entry["name"]: {c for by_class in entry["counts"].values() for c in by_class} for entry in data["sources"]})
    return data


def run_training(config: TrainConfig) -> dict:
    """Train, calibrate and evaluate; returns the test metrics. The run folder gets:

    ``split.csv``, ``train_config.json``, ``model.safetensors``, ``model_card.json``,
    ``metrics.json`` + ``report.md`` + plots (test split, or validation when there is none), ``val/``.

    Under torchrun every rank runs this: all of them read the data and fine-tune together (frozen
    mode: share the feature extraction); rank 0 alone writes the run folder and returns the metrics,
    the others return ``{}`` after training (frozen: after the features).
    """
    from hematovision.evaluate.report import write_evaluation

    started = time.perf_counter()
    world = distributed.world()
    out = Path(config.out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if config.mode not in ("frozen", "finetune"):
        raise ValueError(f"mode must be frozen or finetune, not {config.mode!r}")
    if config.mode == "finetune" and "+" in config.backbone:
        raise DatasetError("combined backbones (a+b) are for frozen mode; fine-tune one backbone")
    if config.augment_copies and config.mode != "frozen":
        raise DatasetError("--augment-copies is for frozen mode; fine-tuning augments every epoch (--strong-augment)")
    if config.augment_copies < 0 or config.augment_strength < 0:
        raise DatasetError("--augment-copies and --augment-strength must be 0 or more")
    if config.morphology and not config.lab_standardise:
        raise DatasetError("--morphology goes with --lab-standardise: the expert joins when another lab's cells are "
                           "scored on their own statistics")
    if config.lab_standardise and (config.mode != "frozen" or config.head != "logreg"):
        raise DatasetError("--lab-standardise is for frozen mode with the logreg head (a fine-tuned network "
                           "re-estimates its batch-norm statistics instead: adapt --unlabelled)")
    if config.few_shot_start:
        if config.few_shot_start < 0 or config.mode != "frozen":
            raise DatasetError("--few-shot-start takes a number of steps (1 or more) and is for frozen mode: a "
                               "fine-tuned run's adapt starts from its own weights")
        if (why_not := can_finetune(config.backbone)) is not None:
            raise DatasetError(f"--few-shot-start: {why_not}")
    if config.mode == "frozen" and not config.pretrained:
        raise DatasetError("frozen mode needs pretrained weights: frozen random features are meaningless")
    if config.mode == "frozen":
        _, mean, std = frozen_input_spec(config.backbone)
        weights = "; ".join(filter(None, (get_model_info(n).weights for n in backbone_names(config.backbone))))
    else:
        info = get_model_info(config.backbone)
        mean, std, weights = info.mean, info.std, info.weights
    samples, splits, groups, digests = resolve_splits(config)
    if world.is_main:
        write_split_csv(out / SPLIT_FILE, samples, splits, groups)
        write_json(out / CONFIG_FILE, _config_dict(config))

    class_names = sorted({sample.label for sample, split in zip(samples, splits) if split == "train"})
    if len(class_names) < 2:
        raise DatasetError(f"training needs at least 2 classes; found {class_names or 'none'} in the training data")
    size = config.resolved_image_size()
    prep = Preprocessing(size, mean, std, cell_scale=config.cell_scale)
    if config.stain_norm:
        train_samples = [s for s, split in zip(samples, splits) if split == "train" and s.label in class_names]
        prep = replace(prep, stain=fit_training_stain(train_samples, prep, config.stain_norm, config.seed))
    parts: dict[str, LoadedImages] = {}
    for part in ("train", "val", "test"):
        chosen = [s for s, split in zip(samples, splits) if split == part and s.label in class_names]
        parts[part] = load_images(chosen, prep, desc=f"loading {part}")
    failures = [(str(p), reason) for loaded in parts.values() for p, reason in loaded.failures]
    if failures and world.is_main:
        write_json(out / UNREADABLE_FILE, failures)
        log.warning("%d unreadable file(s) skipped; listed in %s", len(failures), out / UNREADABLE_FILE)
    for part in ("train", "val"):
        if len(parts[part].samples) == 0:
            raise DatasetError(f"the {part} split has no readable images")
    y = {part: label_indices(loaded.samples, class_names) for part, loaded in parts.items()}
    log.info("images: %s", {part: len(loaded.samples) for part, loaded in parts.items()})

    card = ModelCard(
        class_names=class_names,
        mode=config.mode,
        backbone=config.backbone,
        preprocessing=prep,
        pretrained=config.pretrained,
        weights=weights if config.pretrained else "random initialisation (no pretrained weights)",
        tta=config.tta,
        data=_data_section(config, samples, parts, len(failures)),
        hematovision_version=hematovision.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        torch=torch.__version__,
        platform=platform.platform(),
    )
    history: list[dict] = []
    if config.mode == "frozen":
        extractor = FeatureExtractor(config.backbone, size, DEFAULT_TAPS, tta=config.tta, prep=prep)
        digest_of = dict(zip((s.path for s in samples), digests))
        features = {}
        for part, loaded in parts.items():
            hashes = [digest_of[sample.path] for sample in loaded.samples]
            features[part] = extractor.extract_cached(loaded.images, hashes) if len(loaded.samples) else np.zeros((0, 1))
        train_x, train_y = features["train"], y["train"]
        if config.augment_copies:
            train_hashes = [digest_of[sample.path] for sample in parts["train"].samples]
            copies = augmented_copy_features(extractor, parts["train"].images, train_hashes, config.augment_copies,
                                             config.augment_strength, config.seed)
            train_x = np.concatenate([train_x, copies])
            train_y = np.concatenate([train_y, np.tile(train_y, config.augment_copies)])
            card.data["augment_copies"] = copies_record(config.augment_copies, config.augment_strength, len(y["train"]))
        if not world.is_main:  # the ranks shared the feature extraction; rank 0 fits the head and writes
            return {}
        if world.distributed:
            card.data["feature_processes"] = world.size
        labs = None
        if config.lab_standardise:
            train_labs, val_labs = _labs(parts)
            labs = (np.tile(train_labs, config.augment_copies + 1), val_labs)
        model, summary = fit_frozen_classifier(extractor.module, train_x, train_y, features["val"],
                                               y["val"], len(class_names), head=config.head, seed=config.seed,
                                               sources=labs)
        card.frozen = FrozenHead(taps=list(extractor.taps), num_features=int(features["train"].shape[1]),
                                 hidden=head_hidden(config.head), head=summary,
                                 standardisation="per_lab" if config.lab_standardise else "training")
        with torch.no_grad():
            logits = {part: model.forward_head(torch.as_tensor(f, dtype=torch.float32)).numpy()
                      for part, f in features.items() if len(f) and f.shape[1] > 1}
        save_weights(model.eval(), out / MODEL_FILE)
        if config.few_shot_start:
            card.few_shot_start = _fit_few_shot_start(card, parts["train"].images, y["train"], config.few_shot_start,
                                                      config.seed, out)
    else:
        torch.manual_seed(config.seed)  # new layers' initial weights are part of the seeded run
        model = create_model(config.backbone, num_classes=len(class_names), pretrained=config.pretrained)
        result = finetune(model, prep, parts["train"].images, y["train"], parts["val"].images, y["val"],
                          len(class_names), config.finetune, out, resume=config.resume)
        if not world.is_main:
            return {}
        model, history = result.model, result.history
        card.finetune = {**config.finetune.to_dict(), "best_epoch": result.best_epoch, "seconds": result.seconds,
                         **({"processes": world.size} if world.distributed else {})}
        logits = {part: predict_logits(model, loaded.images, prep, views=config.tta)
                  for part, loaded in parts.items() if len(loaded.samples)}

    if config.morphology:
        _fit_morphology(card, parts, y, len(class_names))
    card.shift = _lab_shift_reference(model, prep, config.tta, parts, y,
                                      features if config.mode == "frozen" else None, config.seed)
    temperature = fit_temperature(logits["val"], y["val"])
    card.temperature = temperature
    log.info("temperature fitted on val: %.3f", temperature)
    write_evaluation(out / VAL_DIR, y["val"], softmax(logits["val"], temperature), class_names,
                                   f"{config.backbone} ({config.mode}) — validation split")
    context = {"model": config.backbone, "mode": config.mode, "split": "test part of split.csv",
               "data": card.data["source"], "seed": config.seed, "temperature": round(temperature, 4),
               "test-time views": config.tta}
    if "test" in logits:
        metrics = write_evaluation(out, y["test"], softmax(logits["test"], temperature), class_names,
                                   f"{config.backbone} ({config.mode}) — held-out test split", context, history,
                                   sources=[sample.source for sample in parts["test"].samples])
    else:
        log.warning("no test split: the run's report is on the validation split")
        context["split"] = "validation part of split.csv (no test split was given)"
        metrics = write_evaluation(out, y["val"], softmax(logits["val"], temperature), class_names,
                                   f"{config.backbone} ({config.mode}) — validation split (no test split)", context, history,
                                   sources=[sample.source for sample in parts["val"].samples])
    metrics["split"] = "test" if "test" in logits else "val"
    card.metrics = {"split": metrics["split"],
                       **{k: metrics[k] for k in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")},
                       **({"per_source": metrics["per_source"]} if "per_source" in metrics else {})}
    card.train_seconds = time.perf_counter() - started
    write_card(out, card)
    log.info("run folder: %s (test accuracy %.4f, macro-F1 %.4f)", out, metrics["accuracy"], metrics["macro_f1"])
    return metrics


def _fit_few_shot_start(card: ModelCard, images: np.ndarray, labels: np.ndarray, steps: int, seed: int,
                        out: Path) -> dict:
    """Fine-tune ImageNet's last stages on the training split; the network ``adapt --data`` starts from.

    A frozen run's head reads ImageNet features, and a few-shot fine-tune used to start from them too.
    Starting from white-cell features instead (the last stages trained here, with the same stain and
    optics augmentation) raised BCCD's k = 20 result on the rest of the lab in a leave-one-lab-out
    probe (docs/labs.md). Only the training split is used, so the run's val and test stay held out.
    """
    started = time.perf_counter()
    settings = FineTuneSettings(steps=steps)
    imagenet = create_model(card.backbone, num_classes=len(card.class_names), pretrained=True)
    network = fine_tune(imagenet, images, labels, len(card.class_names), card.preprocessing, settings, seed,
                        progress="few-shot start (last stages)")
    card.files[FEW_SHOT_START_FILE] = {"sha256": save_weights(network, out / FEW_SHOT_START_FILE)}
    seconds = time.perf_counter() - started
    log.info("few-shot start: the last %d stages fine-tuned on %d training cells in %.0f s", settings.stages,
             len(labels), seconds)
    return {"file": FEW_SHOT_START_FILE, "trained_on": f"the training split ({len(labels)} cells)",
            **asdict(settings), "seconds": round(seconds, 1)}


def _labs(parts: dict[str, LoadedImages]) -> tuple[np.ndarray, np.ndarray]:
    """The lab (``--data`` source) of each training and each validation image: per-lab standardisation's groups."""
    train, val = (np.array([str(sample.source) for sample in parts[part].samples]) for part in ("train", "val"))
    return train, val


def _fit_morphology(card: ModelCard, parts: dict[str, LoadedImages], y: dict[str, np.ndarray], num_classes: int) -> None:
    """Measure the training and validation cells and fit the morphology expert into ``card.morphology``.

    The files are decoded again: the cells are measured before stain normalisation, which the loaded
    images have been through (:func:`~hematovision.infer.morphology.prepare_measured`).

    Each lab is standardised on its own statistics, like the head. The run's temperature and test
    report are the network's alone: the expert joins on another lab's cells (:mod:`hematovision.infer.morphology`).
    """
    from hematovision.infer.morphology import measure_files
    from hematovision.train.frozen import fit_morphology

    measured = {part: measure_files([sample.path for sample in parts[part].samples], card.preprocessing,
                                    desc=f"measuring {part} cells") for part in ("train", "val")}
    expert, summary = fit_morphology(measured["train"], y["train"], measured["val"], y["val"], num_classes,
                                     _labs(parts))
    card.morphology = {**expert.to_dict(), "fit": summary}
    log.info("morphology expert fitted: %s", summary)


def _config_dict(config: TrainConfig) -> dict:
    def plain(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in asdict(config).items()}


# Training images whose final-layer features set a fine-tuned run's lab-shift reference (a seeded subset).
SHIFT_MAX_TRAIN = 2000


def _lab_shift_reference(model: torch.nn.Module, prep: Preprocessing, views: int, parts: dict[str, LoadedImages],
                         labels: dict[str, np.ndarray], pooled: dict[str, np.ndarray] | None, seed: int) -> dict | None:
    """``card.shift``: the final layer's input statistics on train (per class), the warning threshold from val batches.

    A frozen run's features come from its cached pooled features (no second backbone pass); a
    fine-tuned run's from one more pass over the validation, test and (at most 2000) training images.
    """
    from hematovision.errors import HematoVisionError
    from hematovision.infer.runtime import torch_forward
    from hematovision.infer.shift import fit_reference, head_inputs

    try:
        if pooled is not None:
            features = {part: head_inputs(model, f) for part, f in pooled.items() if len(f) and f.shape[1] > 1}
        else:
            forward = torch_forward(model, prep, views)
            rng = np.random.default_rng(seed)
            features = {}
            labels = dict(labels)
            for part, loaded in parts.items():
                images = loaded.images
                if part == "train" and len(images) > SHIFT_MAX_TRAIN:
                    chosen = np.sort(rng.choice(len(images), SHIFT_MAX_TRAIN, replace=False))
                    images, labels["train"] = images[chosen], labels["train"][chosen]
                if len(images):
                    features[part] = np.concatenate([forward(images[i:i + 64])[1] for i in range(0, len(images), 64)])
    except HematoVisionError as error:  # a network without a final linear layer has no features to score
        log.warning("no lab-shift reference: %s", error)
        return None
    if len(features.get("train", ())) < 2 or not len(features.get("val", ())):
        return None
    shift = fit_reference(features["train"], features["val"], labels["val"], features.get("test"), seed=seed,
                          train_labels=labels["train"])
    log.info("lab-shift threshold %.3f (%s)", shift["threshold"], shift["calibrated_on"])
    return shift
