"""``hematovision adapt RUN --out NEW_RUN (--unlabelled DIR | --data DIR)``: a run fitted to another lab.

The result is an ordinary run folder: the source run's weights with the adapted parts replaced,
its card (``card.adaptation`` says what was adapted, on which cells, from which run, and the
numbers before and after), its split and training settings (still true of the training data), and,
when the source had one, a review policy for the new weights (``serving.json``). Exports made for
the source weights (ONNX, the OOD model) are not copied: run ``hematovision export`` again if needed.

Guards: the source run is never changed; the new folder appears only when complete; an unlabelled
adaptation is refused (exit 2, nothing written) when the folder has too few usable cells or when it
does not bring the cells closer to the training data (lab-shift score); a few-shot adaptation keeps
the source head and normalisation when cross-validation on the lab's cells finds nothing better.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hematovision
from hematovision.adapt import normalise as norm
from hematovision.adapt.cells import LabCells, read_labelled, read_unlabelled
from hematovision.adapt.head import HeadChoice, choose_head, refit_on_folds, summarise, threshold_and_temperature
from hematovision.adapt.morphology import lab_expert
from hematovision.errors import HematoVisionError
from hematovision.evaluate.metrics import softmax
from hematovision.infer import lab_standardise as per_lab
from hematovision.infer.morphology import expert_of, measure_files
from hematovision.infer.policy import ReviewPolicy
from hematovision.infer.runtime import classifier_layer
from hematovision.infer.shift import ShiftReference, fit_reference_out_of_fold, head_inputs
from hematovision.models.frozen import FrozenClassifier
from hematovision.run import (
    CONFIG_FILE,
    FEW_SHOT_START_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    UNREADABLE_FILE,
    ModelCard,
    check_weights,
    load_run,
    save_weights,
    write_card,
)

log = logging.getLogger(__name__)

MIN_CELLS = 30  # unlabelled: fewer cells give statistics too noisy to normalise ~2000 features with
MIN_LABELLED = 2
OUTLIER_IQR = 3.0  # Tukey's "far out": images this unlike the folder's others are not taken for cells
TARGET_ACCURACY = 0.99  # of the cells the review policy accepts, when the source policy does not say


class AdaptationRefused(HematoVisionError):
    """The adaptation was not done (too few cells, or it would not help); the source run is unchanged."""


def adapt_run(source: str | Path, out: str | Path, unlabelled: str | Path | None = None,
              data: str | Path | None = None, k_per_class: int | None = None, seed: int = 0,
              entropy_epochs: int = 0, finetune: bool = True, target_accuracy: float | None = None) -> dict[str, Any]:
    """Adapt the run in ``source`` to a lab's cells and write the new run folder ``out``.

    Args:
        source: a run folder from ``hematovision train`` (or ``adapt``).
        out: the new run folder (must not exist, or be empty).
        unlabelled: a folder of the lab's cells, without labels (label-free adaptation).
        data: the lab's labelled cells in class folders (few-shot adaptation).
        k_per_class: use at most this many labelled cells per class (a seeded subset); default all.
        seed: seeds the subset and the folds.
        entropy_epochs: unlabelled only: passes of entropy minimisation after the statistics (0: off).
        finetune: few-shot only: also try fine-tuning the backbone's last stages (kept when it wins
            out-of-fold; :mod:`hematovision.adapt.finetune`).
        target_accuracy: few-shot only: the accuracy wanted of the cells the recalibrated review policy
            does not flag (default: the source policy's target, else ``TARGET_ACCURACY``). Lower flags fewer.

    Returns:
        ``card.adaptation`` of the new run.

    Raises:
        AdaptationRefused: too few usable cells, or nothing to adapt; nothing was written.
        HematoVisionError: bad arguments or input (one line each).
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if (unlabelled is None) == (data is None):
        raise HematoVisionError("give the lab's cells with --unlabelled DIR or with --data DIR (labelled), one of them")
    if target_accuracy is not None and not 0.5 <= target_accuracy < 1:
        raise HematoVisionError(f"--target-accuracy must be at least 0.5 and below 1, got {target_accuracy}")
    if target_accuracy is not None and data is None:
        raise HematoVisionError("--target-accuracy needs labelled cells (--data): without labels the review "
                                "threshold is not recalibrated")
    if k_per_class is not None and k_per_class < 1:
        raise HematoVisionError(f"--k-per-class must be at least 1, got {k_per_class}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HematoVisionError(f"{out} already exists; choose a new --out folder (the source run stays as it is)")
    if out.resolve() == source.resolve():
        raise HematoVisionError("--out must be a new folder, not the source run")
    card, model = load_run(source)
    source_policy = _source_policy(source, card)
    card, dropped = _without_routing(card, model)
    torch.manual_seed(seed)
    if unlabelled is not None:
        result = _unlabelled(card, model, Path(unlabelled), source_policy, entropy_epochs, seed)
    else:
        assert data is not None
        result = _few_shot(card, model, source, Path(data), source_policy, k_per_class, seed, finetune, target_accuracy)
    model, adaptation, temperature = result["model"], result["adaptation"], result["temperature"]
    if dropped:
        adaptation["adapted"].append(dropped)
    adaptation.update({"source_run": str(source.resolve()), "source_sha256": card.weights_sha256,
                       "settings": {"k_per_class": k_per_class, "seed": seed, "entropy_epochs": entropy_epochs,
                                    "finetune": finetune, "target_accuracy": target_accuracy},
                       "seconds": round(time.perf_counter() - started, 1)})
    new_card = replace(card, **result.get("card", {}), temperature=temperature, metrics=result.get("metrics", {}),
                       adaptation=adaptation, files={}, hematovision_version=hematovision.__version__,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__)
    if new_card.few_shot_start is not None:  # still a frozen run: a later adapt --data can start from it too
        new_card.files = {FEW_SHOT_START_FILE: card.files[FEW_SHOT_START_FILE]}
    _write_run(source, out, model, new_card, result)
    return adaptation


def _without_routing(card: ModelCard, model: torch.nn.Module) -> tuple[ModelCard, str]:
    """A per-lab run's head stops routing images to its training labs' statistics: the adapted run scores
    every image on the standardisation fitted here (the lab's own, or the head refitted on it)."""
    if not isinstance(model, FrozenClassifier) or card.frozen is None or not model.drop_routing():
        return card, ""
    head = {key: value for key, value in card.frozen.head.items() if key != "routing"}
    return (replace(card, frozen=replace(card.frozen, head=head)),
            f"routing to the training labs' statistics ({', '.join(card.frozen.routed_labs)}) dropped")


def _unlabelled(card: ModelCard, model: torch.nn.Module, folder: Path, source_policy: ReviewPolicy | None,
                entropy_epochs: int, seed: int) -> dict[str, Any]:
    prep, views = card.preprocessing, card.tta
    cells = read_unlabelled(folder, prep)
    _require_cells(cells, folder, MIN_CELLS, "unlabelled ")
    frozen = norm.is_frozen(model)
    if frozen:
        pooled = norm.pooled_features(model, cells.images, prep, views)
        keep = feature_inliers(pooled)
        cells.drop(keep, "not a cell: unlike the folder's other images (features far out)")
        pooled = pooled[keep]
        _require_cells(cells, folder, MIN_CELLS, "unlabelled ")
        logits0, features0 = norm.head_outputs(model, pooled)
        if per_lab.applies(card):  # class-balanced, as the run standardised each training lab
            lab = per_lab.head_moments(model, pooled)
            adapted = ["feature standardisation (feature_mean, feature_std) re-estimated on the lab's cells, "
                       "class-balanced with the head's predicted classes (a per-lab run)"]
        else:
            lab = norm.lab_standardisation(pooled, model.feature_std.numpy())
            adapted = ["feature standardisation (feature_mean, feature_std) re-estimated on the lab's cells"]
        norm.set_standardisation(model, *lab)
        if entropy_epochs:
            logits_of, parameters, commit = norm.frozen_entropy_parameters(model, pooled)
            norm.minimise_entropy(logits_of, parameters, len(pooled), entropy_epochs, card.temperature, seed=seed)
            commit()
            adapted.append(f"feature standardisation tuned by entropy minimisation ({entropy_epochs} epochs)")
        logits1, features1 = norm.head_outputs(model, pooled)
    else:
        if not norm.batchnorm_layers(model):
            raise AdaptationRefused(f"{card.backbone} has no batch-norm layers: there are no statistics to re-estimate "
                                    "without labels; adapt with --data and a few labelled cells per class instead")
        logits0, features0 = norm.final_outputs(model, cells.images, prep, views)
        keep = feature_inliers(features0)
        cells.drop(keep, "not a cell: unlike the folder's other images (features far out)")
        logits0, features0 = logits0[keep], features0[keep]
        _require_cells(cells, folder, MIN_CELLS, "unlabelled ")
        layers = norm.adapt_batchnorm(model, cells.images, prep, views)
        adapted = [f"batch-norm running statistics of {layers} layers re-estimated on the lab's cells (AdaBN)"]
        if entropy_epochs:
            logits_of, parameters = norm.batchnorm_entropy_parameters(model, cells.images, prep)
            norm.minimise_entropy(logits_of, parameters, len(cells.images), entropy_epochs, card.temperature, seed=seed)
            adapted.append(f"batch-norm scales and shifts tuned by entropy minimisation ({entropy_epochs} epochs)")
        logits1, features1 = norm.final_outputs(model, cells.images, prep, views)

    reference = shift_reference(card, model)
    before = _state(logits0, features0, card.temperature, card.class_names, reference)
    after = _state(logits1, features1, card.temperature, card.class_names, reference)
    threshold = before.get("lab_shift_threshold")
    if threshold is not None and before["lab_shift"] <= threshold:
        # Re-estimating ~2000 statistics on a folder that is not shifted only adds its sampling noise.
        raise AdaptationRefused(f"the cells in {folder} already look like the training data (lab-shift score "
                                f"{before['lab_shift']:.2f}, threshold {threshold:.2f}): there is no lab shift to "
                                "adapt to; the source run is kept (adapt with --data to fit it to labelled cells)")
    if before["lab_shift"] is not None and after["lab_shift"] >= before["lab_shift"]:
        raise AdaptationRefused(f"adapting on {folder} did not bring its cells closer to the training data (lab-shift "
                                f"score {before['lab_shift']:.2f} -> {after['lab_shift']:.2f}); the source run is kept")
    adaptation = {"method": "unlabelled", "adapted": adapted, "cells": cells.record(card.class_names),
                  "before": before, "after": after,
                  "predictions_changed": round(float((logits0.argmax(1) != logits1.argmax(1)).mean()), 4),
                  "note": "no labels: accuracy on this lab is not measured; the shift score and entropy are"}
    policy = None
    if source_policy is not None:
        # Without labels the confidence threshold cannot be recalibrated: the source's is kept. Its OOD
        # model was fitted on the old features, which the new normalisation moved: it is dropped.
        policy = ReviewPolicy(source_policy.confidence_threshold, None, calibrated=source_policy.calibrated, info={
            "target_accuracy": source_policy.info.get("target_accuracy"),
            "fitted_on": {"thresholds": "the source run's validation split (no labels to recalibrate on this lab)"},
            "ood": "no OOD check: the source's OOD model was fitted on features this adaptation re-normalised"})
    result = {"model": model, "adaptation": adaptation, "temperature": card.temperature, "policy": policy}
    expert = expert_of(card.morphology, len(card.class_names))
    if expert is not None:  # the cell measurements get the lab's statistics too
        on_lab = expert.on_lab(measure_files(cells.paths(), prep, desc="measuring the lab's cells"), folder.name)
        result["card"] = {"morphology": {**(card.morphology or {}), **on_lab.to_dict()}}
        adapted.append("morphology expert's standardisation re-estimated on the lab's cells; it is now fused "
                       "into every prediction")
    return result


def _few_shot(card: ModelCard, model: torch.nn.Module, source: Path, folder: Path, source_policy: ReviewPolicy | None,
              k_per_class: int | None, seed: int, finetune: bool = True,
              target_accuracy: float | None = None) -> dict[str, Any]:
    prep, views, names = card.preprocessing, card.tta, card.class_names
    cells = read_labelled(folder, names, prep, k_per_class, seed)
    _require_cells(cells, folder, MIN_LABELLED, "labelled ")
    labels = cells.labels
    assert labels is not None
    layer = classifier_layer(model)
    weight0 = layer.weight.detach().numpy().copy()
    bias0 = layer.bias.detach().numpy().copy() if layer.bias is not None else np.zeros(len(names), np.float32)
    frozen = norm.is_frozen(model)
    lab_model = model
    if frozen:
        pooled = norm.pooled_features(model, cells.images, prep, views)
        source_mean, source_std = model.feature_mean.numpy().copy(), model.feature_std.numpy().copy()
        logits0, features0 = norm.head_outputs(model, pooled)

        def lab_features(train: np.ndarray) -> np.ndarray:
            norm.set_standardisation(model, *norm.lab_standardisation(pooled[train], source_std))
            try:
                return head_inputs(model, pooled)
            finally:
                norm.set_standardisation(model, source_mean, source_std)

        makers = {"source": lambda train: features0, "lab": lab_features}
    else:
        logits0, features0 = norm.final_outputs(model, cells.images, prep, views)
        makers = {"source": lambda train: features0}
        if norm.batchnorm_layers(model):
            # AdaBN on all the labelled cells (label-free, so the folds share it).
            lab_model = copy.deepcopy(model)
            norm.adapt_batchnorm(lab_model, cells.images, prep, views)
            lab_features_all = norm.final_outputs(lab_model, cells.images, prep, views)[1]
            makers["lab"] = lambda train: lab_features_all
    choice = choose_head(makers, labels, weight0, bias0, seed)
    if finetune:
        def head_on(folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
            return refit_on_folds(choice, makers, labels, folds, weight0, bias0)

        tuned = _fine_tune_if_it_pays(card, model, source, cells.images, labels, cells.missing_classes, choice,
                                      head_on, seed)
        if tuned is not None:
            return _few_shot_result(card, cells, folder, source_policy, logits0, features0, *tuned, seed=seed,
                                    target_accuracy=target_accuracy)

    adapted = []
    if choice.norm == "lab":
        if frozen:
            norm.set_standardisation(model, *norm.lab_standardisation(pooled, source_std))
            adapted.append("feature standardisation (feature_mean, feature_std) re-estimated on the lab's cells")
        else:
            model = lab_model
            adapted.append("batch-norm running statistics re-estimated on the lab's cells (AdaBN)")
    if choice.prior is not None:
        layer = classifier_layer(model)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(choice.weight))
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(choice.bias))
        adapted.append(f"final layer refitted on the lab's cells, pulled towards the source head (prior {choice.prior:g})"
                       if choice.anchor == "source" else
                       f"final layer fitted anew on the lab's cells (L2 {choice.prior:g})")
    # A model class without labelled cells: a refitted source head keeps its row (pushed down only
    # by the lab's other cells); a new head has never seen it and does not predict it.
    missing = ""
    if cells.missing_classes:
        missing = ("never predicted by the new head" if choice.prior is not None and choice.anchor == "zero"
                   else "kept from the source head; not measured on this lab")
        log.info("no labelled cells of %s: %s", ", ".join(cells.missing_classes), missing)
    choice_record = {"chosen": choice.describe(), "norm": choice.norm, "anchor": choice.anchor,
                     "prior": choice.prior, "folds": choice.folds, "candidates": choice.candidates}
    changes: dict[str, Any] = {}
    shift = _lab_reference(choice.features, labels, seed)
    if shift is not None:
        changes["shift"] = shift
    if choice.prior is not None and per_lab.applies(card) and card.frozen is not None:
        # The refitted head learnt the features as standardised now: `evaluate` must not standardise
        # the lab's other cells on their own statistics again.
        changes["frozen"] = replace(card.frozen, standardisation="training")
    return _few_shot_result(card, cells, folder, source_policy, logits0, features0, model, adapted, choice_record,
                            choice.oof_logits, choice.features, missing, changes, seed=seed,
                            target_accuracy=target_accuracy)


def _lab_reference(features: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any] | None:
    """The lab-shift reference of a head-only adaptation: the lab's own cells, per class.

    The source run's reference describes its training labs' classes, which the lab's cells need not
    be near even when the new head classifies them well. The threshold comes from 3 stratified folds
    (each fold's held-out cells scored against the classes of the others). ``None`` (the source's
    reference is kept) when no class has 3 cells.
    """
    from hematovision.adapt.head import fold_indices

    if np.bincount(labels).max() < 3:
        return None
    folds, _ = fold_indices(labels, seed, folds=3, leave_one_out_up_to=0)
    return fit_reference_out_of_fold(features, [(features[train], features[test]) for train, test in folds],
                                     np.concatenate([labels[test] for _, test in folds]), seed=seed,
                                     labels=labels, fold_labels=[labels[train] for train, _ in folds])


def _few_shot_result(card: ModelCard, cells: LabCells, folder: Path, source_policy: ReviewPolicy | None,
                     logits0: np.ndarray, features0: np.ndarray, model: torch.nn.Module, adapted: list[str],
                     choice_record: dict[str, Any], oof_logits: np.ndarray, features: np.ndarray, missing: str,
                     card_changes: dict[str, Any], seed: int, target_accuracy: float | None = None) -> dict[str, Any]:
    """Temperature, review threshold, before/after numbers and the card's record of a few-shot adaptation.

    A run with a morphology expert gets the lab's own one when it pays out-of-fold
    (:func:`hematovision.adapt.morphology.lab_expert`); the calibration is then on the fused logits.
    """
    names, labels = card.class_names, cells.labels
    assert labels is not None
    morphology_record = None
    if card.morphology is not None:
        measured = measure_files(cells.paths(), card.preprocessing, desc="measuring the lab's cells")
        oof_logits, morphology, morphology_record = lab_expert(card, measured, labels, oof_logits, folder.name, seed)
        card_changes = {**card_changes, "morphology": morphology}
        adapted = adapted + ([morphology_record] if morphology is not None else [])
    target = float(target_accuracy or (source_policy.info.get("target_accuracy") if source_policy else None)
                   or TARGET_ACCURACY)
    temperature, threshold, policy_info = threshold_and_temperature(oof_logits, labels, target)
    adapted = adapted + ["temperature recalibrated on the lab's cells (out-of-fold)",
                         "review policy's confidence threshold recalibrated on the lab's cells (out-of-fold)"]
    reference = shift_reference(card, model)
    before = {**summarise(labels, softmax(logits0, card.temperature), names),
              **_state(logits0, features0, card.temperature, names, reference)}
    # A network fine-tuned on the lab's cells computes other features: its own reference applies, the
    # source's does not (scored here on its own training cells, so "after" is on the low side).
    after_reference = ShiftReference.from_card(card_changes["shift"]) if "shift" in card_changes else reference
    oof_probs = softmax(oof_logits, temperature)
    after = {**summarise(labels, oof_probs, names),
             **_state(oof_logits, features, temperature, names, after_reference)}
    folds = choice_record["folds"]
    adaptation = {"method": "few-shot", "adapted": adapted, "cells": cells.record(names),
                  "choice": choice_record,
                  "classes_without_cells": {"classes": cells.missing_classes, "what happens": missing or None},
                  "before": before, "after": after,
                  "measured": f"before: the source run on all {len(labels)} labelled cells; after: out-of-fold "
                              f"predictions ({folds}; the configuration was chosen on the same folds)",
                  "temperature": {"source": card.temperature, "lab": round(temperature, 4)},
                  "review_threshold": {"confidence": threshold, **policy_info}}
    if morphology_record is not None:
        adaptation["morphology"] = morphology_record
    metrics = {"split": f"the lab's labelled cells, out-of-fold ({folds})",
               **{k: after[k] for k in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")}}
    policy = ReviewPolicy(threshold, None, calibrated=True, info={
        "target_accuracy": target,
        "fitted_on": {"thresholds": f"out-of-fold predictions on {len(labels)} labelled cells of {folder}"},
        "validation": {"coverage": policy_info["coverage"], "accepted_accuracy": policy_info["accepted_accuracy"]},
        "ood": "no OOD check: too few cells of the new lab to fit one"})
    return {"model": model, "adaptation": adaptation, "temperature": temperature, "policy": policy,
            "metrics": metrics, "evaluation": (labels, oof_probs), "card": card_changes}


def _fine_tune_if_it_pays(card: ModelCard, model: torch.nn.Module, source: Path, images: np.ndarray, labels: np.ndarray,
                          missing_classes: list[str], choice: HeadChoice,
                          head_on: Callable[[list[tuple[np.ndarray, np.ndarray]]], np.ndarray],
                          seed: int) -> tuple | None:
    """Fine-tune the backbone's last stages on the lab's cells when that beats ``choice`` out-of-fold.

    Both are scored on the fine-tune's folds (``head_on`` refits the head-only choice on them), by the
    balanced accuracy over the classes that have a labelled cell in every fold's training part. The
    head-only choice's score on its own folds is not a fair opponent: each of its fits saw 4/5 of the
    cells where a fine-tune fold sees 2/3, and it was chosen among many candidates on those folds.

    Returns:
        ``None`` (the head-only choice stays), or the arguments of :func:`_few_shot_result` after ``features0``.
    """
    from sklearn.metrics import balanced_accuracy_score

    from hematovision.adapt import finetune as ft
    from hematovision.adapt.head import fold_indices

    why_not = ft.can_finetune(card.backbone)
    if why_not is None and len(labels) <= ft.MIN_CELLS:
        why_not = f"{len(labels)} labelled cells are too few (more than {ft.MIN_CELLS} needed)"
    if why_not is not None:
        log.info("few-shot fine-tuning not tried: %s", why_not)
        choice.candidates.append({"finetune": "not tried", "why": why_not})
        return None
    folds, how = fold_indices(labels, seed, folds=ft.FOLDS, leave_one_out_up_to=0)
    settings = ft.FineTuneSettings()
    start, started_from = ft.starting_network(card, model, source)
    num_classes = len(card.class_names)
    oof = np.zeros((len(labels), num_classes))
    fold_features = []  # (the fold's training cells, its held-out cells): the lab-shift threshold
    for number, (train, test) in enumerate(folds, 1):
        tuned = ft.fine_tune(start, images[train], labels[train], num_classes, card.preprocessing, settings,
                             seed + number, progress=f"fine-tuning, fold {number}/{len(folds)}")
        logits, fold_outputs = norm.final_outputs(tuned, images, card.preprocessing, ft.VIEWS)  # one pass, both parts
        oof[test] = logits[test]
        fold_features.append((fold_outputs[train], fold_outputs[test]))
    # Only classes with a labelled cell in every fold's training part are compared: a new head cannot
    # predict a class its fold never showed it, while a refitted source head can, so a class of one or
    # two cells would decide the choice by itself (BCCD: one basophil, 0.2 of the balanced accuracy).
    counts = np.bincount(labels, minlength=num_classes)
    compared = np.isin(labels, np.flatnonzero(counts >= len(folds)))
    if not compared.any():
        compared[:] = True

    def score(logits: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(balanced_accuracy_score(labels[compared], logits[compared].argmax(1)))

    tuned_score, head_score = score(oof), score(head_on(folds))
    record = {"finetune": f"the last {settings.stages} stages and a new head", "folds": how,
              "compared_classes": [card.class_names[k] for k in np.unique(labels[compared])],
              "balanced_accuracy": round(tuned_score, 4), "head_only_balanced_accuracy": round(head_score, 4),
              "head_only_balanced_accuracy_own_folds": round(score(choice.oof_logits), 4)}
    choice.candidates.append(record)
    log.info("few-shot fine-tuning: balanced accuracy %.3f out-of-fold (%s) against %.3f for %s on the same folds",
             tuned_score, how, head_score, choice.describe())
    if not fine_tuning_wins(tuned_score, head_score):
        return None
    tuned = ft.fine_tune(start, images, labels, num_classes, card.preprocessing, settings, seed,
                         progress="fine-tuning on all cells")
    features = norm.final_outputs(tuned, images, card.preprocessing, ft.VIEWS)[1]
    shift = fit_reference_out_of_fold(features, fold_features, np.concatenate([labels[test] for _, test in folds]),
                                      seed=seed, labels=labels, fold_labels=[labels[train] for train, _ in folds])
    missing = "never predicted: the new head has not seen them" if missing_classes else ""
    adapted = [f"the backbone's last {settings.stages} stages and a new head fine-tuned on the lab's cells, from "
               f"{started_from}, {settings.steps} steps with stain and optics augmentation; it scores each cell "
               f"on its {ft.VIEWS} dihedral views averaged"]
    choice_record = {"chosen": f"fine-tuned: the last {settings.stages} stages and a new head",
                     "norm": "fine-tuned", "anchor": None, "prior": None, "folds": how,
                     "candidates": choice.candidates}
    changes = {"mode": "finetune", "frozen": None, "shift": shift, "pretrained": True, "few_shot_start": None,
               "tta": ft.VIEWS,
               "finetune": {"few_shot": {**asdict(settings), "started_from": started_from}},
               "weights": f"{card.weights or card.backbone}; then fine-tuned on a lab's labelled cells (adapt)"}
    return tuned, adapted, choice_record, oof, features, missing, changes


def fine_tuning_wins(tuned_score: float, head_score: float) -> bool:
    """Whether the fine-tuned network replaces the head-only choice: only when strictly better
    out-of-fold (on a tie the smaller change stays, and the run keeps its exports' kind)."""
    return tuned_score > head_score


def _source_policy(source: Path, card: ModelCard) -> ReviewPolicy | None:
    """The source run's review policy, if it has one made for its current weights."""
    try:
        policy = ReviewPolicy.load(source)
    except (ValueError, KeyError, OSError):
        return None
    if policy is not None and policy.info.get("source_sha256") not in (None, card.weights_sha256):
        return None
    return policy


def _require_cells(cells: LabCells, folder: Path, minimum: int, kind: str) -> None:
    if len(cells.files) >= minimum:
        return
    reasons: dict[str, int] = {}
    for _, reason in cells.excluded:
        key = reason.split(" (")[0] if reason.startswith("not a cell") else reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    left_out = "; ".join(f"{n} {why}" for why, n in reasons.items())
    raise AdaptationRefused(f"{folder} has {len(cells.files)} usable {kind}cell image(s), fewer than the {minimum} "
                            f"needed{f' (left out: {left_out})' if left_out else ''}; the source run is kept")


def feature_inliers(features: np.ndarray) -> np.ndarray:
    """Which images look like the folder's others: a non-cell photo among cells is far out.

    Each image's mean squared robust z-score (median and MAD of the folder, capped at 100) is
    compared with the folder's: above the third quartile plus 3 interquartile ranges (Tukey's far
    out) it is left out. Folders of fewer than :data:`MIN_CELLS` images are kept whole.
    """
    n = len(features)
    if n < MIN_CELLS:
        return np.ones(n, bool)
    median = np.median(features, axis=0)
    mad = 1.4826 * np.median(np.abs(features - median), axis=0)
    spread = np.where(mad < 1e-6, features.std(axis=0), mad)
    spread = np.where(spread < 1e-6, 1.0, spread)
    scores = np.minimum(((features - median) / spread) ** 2, 100.0).mean(axis=1)
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    keep: np.ndarray = scores <= q3 + OUTLIER_IQR * (q3 - q1)
    return keep


def shift_reference(card: ModelCard, model: torch.nn.Module) -> ShiftReference | None:
    """The lab-shift reference of the run: its card's, or (frozen linear head) the standardised one."""
    reference = ShiftReference.from_card(card.shift)
    if reference is None and card.frozen is not None and card.frozen.hidden == 0 and norm.is_frozen(model):
        reference = ShiftReference.standardised()
    return reference


def _state(logits: np.ndarray, features: np.ndarray, temperature: float, names: list[str],
           reference: ShiftReference | None) -> dict[str, Any]:
    """Lab-shift score, mean prediction entropy and predicted class shares of the lab's cells."""
    probs = softmax(logits, temperature)
    entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1).mean())
    shares = np.bincount(probs.argmax(1), minlength=len(names)) / max(len(probs), 1)
    state: dict[str, Any] = {"lab_shift": None, "mean_entropy": round(entropy, 4),
                             "predicted": {name: round(float(x), 4) for name, x in zip(names, shares) if x}}
    if reference is not None:
        result = reference.assess(reference.image_scores(features))
        if result is not None:
            state["lab_shift"] = round(result.score, 4)
            state["lab_shift_threshold"] = None if result.threshold is None else round(result.threshold, 4)
    return state


def _write_run(source: Path, out: Path, model: torch.nn.Module, card: ModelCard, result: dict[str, Any]) -> None:
    """Write the new run folder under a temporary name, check it loads, then move it into place."""
    from hematovision._io import sha256_file

    tmp = out.parent / f".{out.name}.adapting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in (SPLIT_FILE, CONFIG_FILE, UNREADABLE_FILE):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        for name, entry in card.files.items():  # the source's files the new card keeps (a few-shot start)
            check_weights(source / name, entry["sha256"])
            shutil.copy2(source / name, tmp / name)
        save_weights(model.eval(), tmp / MODEL_FILE)
        write_card(tmp, card)
        policy: ReviewPolicy | None = result.get("policy")
        if policy is not None:
            policy.info.update({"source_sha256": sha256_file(tmp / MODEL_FILE), "views": card.tta})
            policy.save(tmp)
        if "evaluation" in result:
            from hematovision.evaluate.report import write_evaluation

            labels, probs = result["evaluation"]
            write_evaluation(tmp, labels, probs, card.class_names,
                             f"{card.backbone} ({card.mode}) adapted — the lab's cells, out-of-fold",
                             {"run": str(out), "source run": str(source), "split": card.metrics.get("split", "")})
        load_run(tmp)  # the folder is complete and its weights match its card
        if out.exists():
            out.rmdir()  # empty (checked before)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
