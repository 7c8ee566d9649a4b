"""``hematovision evaluate``: a trained run on images it did not train on.

Either every image of another folder (all of it is test data), or one part of the run's own
``split.csv`` (e.g. to re-score the held-out test split with test-time views).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematovision._io import write_json
from hematovision.data.folder import Sample, label_indices
from hematovision.data.images import display_path
from hematovision.data.sources import scan_labelled
from hematovision.errors import DatasetError
from hematovision.run import METRICS_FILE, SPLIT_FILE, read_split

if TYPE_CHECKING:
    from hematovision.infer.predictor import Predictor

log = logging.getLogger(__name__)


def evaluate_folder(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
                    views: int | None = None, backend: str = "auto", workers: int | None = None,
                    batch_size: int | None = None, lab_standardise: bool = True) -> dict:
    """Evaluate the run in ``run_dir`` on all images under ``data_dir`` (class folders, or images/ + a labels CSV).

    Classes of ``data_dir`` that the model does not know are reported (``unknown_classes``)
    and left out; classes the model knows but ``data_dir`` lacks simply have no support.

    Args:
        views: dihedral views averaged per image (default: the run's own setting).
        backend: ``auto``, ``torch``, ``onnx``, ``int8`` or ``openvino`` (see :mod:`hematovision.infer.backend`).
        workers: image-decoding threads (see :mod:`hematovision.infer.stream`).
        batch_size: images per forward pass; the model's activations, not the images, set the peak
            memory (Lite0 at 224 px: about 400 MB at 32, 100 MB at 8).
        lab_standardise: a per-lab run (``train --lab-standardise``) re-scores a folder whose lab-shift
            score warns with the folder's own feature statistics (:mod:`hematovision.infer.lab_standardise`);
            ``False`` keeps the run's statistics. Ignored for other runs.

    The images are streamed (decoded while the model runs, a few batches at a time), so memory
    holds the (N, K) probabilities, never the images.

    Returns:
        The metrics dict, also written to ``out_dir/metrics.json`` with a report and plots.
    """
    folder = scan_labelled(data_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval_{Path(data_dir).resolve().name}"
    context = {"data": str(data_dir), "split": "all images of the folder (external test set)"}
    return _evaluate_samples(run_dir, folder.samples, out, Path(data_dir).name, context, views, backend, workers,
                             batch_size, lab_standardise)


def evaluate_split(run_dir: str | Path, split: str, out_dir: str | Path | None = None, views: int | None = None,
                   backend: str = "auto", workers: int | None = None, batch_size: int | None = None) -> dict:
    """Evaluate the run on one part (``test``, ``val``, ...) of its own ``split.csv``.

    A run trained on several datasets also gets metrics per source (``per_source``).
    """
    parts = read_split(run_dir)
    samples = parts.get(split, [])
    if not samples:
        raise DatasetError(f"{SPLIT_FILE} of {run_dir} has no '{split}' rows; its parts are {sorted(parts)}")
    split_file = Path(run_dir) / SPLIT_FILE
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval_{split}"
    context = {"data": str(split_file), "split": f"the '{split}' part of the run's split.csv"}
    return _evaluate_samples(run_dir, samples, out, f"its {split} split", context, views, backend, workers,
                             batch_size)


def _evaluate_samples(run_dir: str | Path, samples: Sequence[Sample], out: Path, name: str, context: dict,
                      views: int | None, backend: str = "auto", workers: int | None = None,
                      batch_size: int | None = None, lab_standardise: bool = False) -> dict:
    from hematovision.evaluate.report import write_evaluation
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(run_dir, views, backend=backend)
    known = set(predictor.class_names)
    unknown = sorted({sample.label for sample in samples} - known)
    if unknown:
        log.warning("classes not known to the model, left out: %s", unknown)
    chosen = [sample for sample in samples if sample.label in known]
    if not chosen:
        raise DatasetError(f"{context['data']} has no images of the model's classes {predictor.class_names}")
    from hematovision.infer import lab_standardise as per_lab

    restandardise = lab_standardise and predictor.shift is not None and per_lab.applies(predictor.card)
    if restandardise:
        assert predictor.shift is not None
        predictor.shift.keep_features = True
    kept, probabilities, flagged, failures = _stream_scores(predictor, chosen, workers, batch_size)
    if not kept:
        raise DatasetError(f"none of the {len(chosen)} images in {context['data']} could be read")
    shift = predictor.lab_shift()  # None for runs trained before the lab-shift score
    labels = label_indices(kept, predictor.class_names)
    standardised = routing = None
    if restandardise:
        assert predictor.shift is not None and predictor.card.frozen is not None
        head_inputs = predictor.shift.features()
        routing = per_lab.routed_shares(predictor.model, predictor.card.frozen.routed_labs, head_inputs)
        probabilities, flagged, standardised = _on_own_statistics(predictor, head_inputs, labels, probabilities,
                                                                  flagged)
    context = {
        "run": str(run_dir), **context, "test-time views": predictor.views,
        "unknown_classes": ", ".join(unknown) or "none",
        "left_out_images": len(samples) - len(chosen), "unreadable_files": len(failures),
    }
    review = review_summary(labels, probabilities, flagged) if predictor.policy is not None else None
    context["review policy"] = _review_line(review)
    if routing is not None:  # a per-lab run's head scores each training lab's images on that lab's statistics
        context["lab routing"] = ", ".join(f"{lab} {share:.0%}" for lab, share in routing.items()) + (
            " (the training lab whose statistics scored the images; none: the labs' average)"
            + ("; replaced by the folder's own statistics below" if standardised and standardised["applied"] else ""))
    if standardised is not None:
        context["lab standardisation"] = standardised["description"]
    if shift is not None:
        context["lab-shift score"] = (f"{shift.score:.2f} (threshold {shift.threshold:.2f})" if shift.threshold
                                      else f"{shift.score:.2f}") + (": " + shift.message() if shift.shifted else "")
    metrics = write_evaluation(out, labels, probabilities, predictor.class_names,
                               f"{predictor.card.backbone} ({predictor.card.mode}) on {name}", context,
                               sources=[sample.source for sample in kept])
    metrics["unknown_classes"] = unknown
    metrics["unreadable_files"] = [[display_path(p), reason] for p, reason in failures]
    metrics["views"] = predictor.views
    metrics["backend"] = predictor.backend
    metrics["precision"] = predictor.precision  # bf16 for OpenVINO on CPUs that have it
    metrics["lab_shift"] = shift.to_dict() if shift is not None else None
    metrics["review"] = review
    metrics["lab_standardisation"] = standardised
    metrics["lab_routing"] = routing
    write_json(out / METRICS_FILE, metrics)
    return metrics


def _on_own_statistics(predictor: Predictor, head_inputs: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                       flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """A per-lab run's scores with the folder's own feature statistics, when its lab-shift score warns.

    ``head_inputs``: the folder's final-layer inputs, as the first pass kept them in the shift monitor.

    Returns:
        The probabilities and review flags to report, and what was done (``applied``, and the run's
        own-statistics accuracy as ``before`` when applied). The review policy keeps its confidence
        threshold; its out-of-distribution check was fitted on the run's statistics and is not used.
    """
    from sklearn.metrics import balanced_accuracy_score

    from hematovision.infer import lab_standardise as per_lab

    assert predictor.shift is not None
    shift = predictor.shift.result()
    n = len(labels)
    if shift is None or not shift.shifted or n < per_lab.MIN_IMAGES:
        why = ("the folder's lab-shift score does not warn: its images are standardised like the training labs'"
               if n >= per_lab.MIN_IMAGES else f"only {n} image(s): at least {per_lab.MIN_IMAGES} are needed")
        return probabilities, flagged, {"applied": False, "description": f"not applied ({why})"}
    logits = per_lab.restandardise(predictor.model, head_inputs)
    expert = predictor.morphology
    if expert is not None:  # the cell measurements too, on the lab's own statistics when it was trained per lab
        measured = predictor.kept_morphology()
        own = expert.on_lab(measured) if expert.standardisation == "per_lab" else expert
        logits = own.fuse(logits, measured)
    restandardised, new_flags = predictor.review(logits, None)  # no OOD check: fitted on the run's statistics
    before = probabilities.argmax(axis=1)
    record = {"applied": True, "images": n, "iterations": per_lab.ITERATIONS, "morphology": expert is not None,
              "before": {"accuracy": float((before == labels).mean()),
                         "balanced_accuracy": float(balanced_accuracy_score(labels, before)),
                         "predictions_changed": float((restandardised.argmax(axis=1) != before).mean())}}
    record["description"] = (f"applied: the {n} images were standardised on their own class-balanced feature "
                             f"statistics (a per-lab run on another lab{', with its morphology expert' if expert else ''}); "
                         f"with the run's statistics the accuracy was "
                             f"{record['before']['accuracy']:.4f}, balanced {record['before']['balanced_accuracy']:.4f}")
    log.info("lab standardisation %s", record["description"])
    return restandardised, new_flags, record


def _stream_scores(predictor: Predictor, samples: Sequence[Sample], workers: int | None,
                   batch_size: int | None = None) -> tuple[list[Sample], np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Score ``samples`` streaming (bounded memory: only the (N, K) probabilities are kept, never the images).

    Returns:
        The readable samples, their probabilities (N, K) and review flags (N,), and the unreadable
        files with their reasons.
    """
    from contextlib import closing

    from hematovision.infer.stream import stream_predictions

    predictor.reset_shift()
    kept: list[Sample] = []
    probabilities = np.zeros((len(samples), len(predictor.class_names)), np.float64)  # softmax's dtype
    flagged = np.zeros(len(samples), bool)
    failures: list[tuple[Path, str]] = []
    with closing(stream_predictions(predictor, [s.path for s in samples], batch_size, workers,
                                    desc="evaluating")) as stream:
        for result in stream:
            sample = samples[result.index]
            if result.probabilities is None:
                failures.append((sample.path, result.error or "unreadable"))
                continue
            probabilities[len(kept)] = result.probabilities
            flagged[len(kept)] = result.flagged
            kept.append(sample)
    if failures:
        log.warning("skipped %d unreadable file(s) of %d, e.g. %s", len(failures), len(samples), failures[0][1])
    return kept, probabilities[: len(kept)], flagged[: len(kept)], failures


def review_summary(labels: np.ndarray, probabilities: np.ndarray, flagged: np.ndarray) -> dict:
    """What the review policy does on labelled images: how many it flags, how right the rest are."""
    right = probabilities.argmax(axis=1) == labels
    kept = ~flagged
    return {"flagged_fraction": float(flagged.mean()) if len(flagged) else 0.0,
            "n_unflagged": int(kept.sum()),
            "unflagged_accuracy": float(right[kept].mean()) if kept.any() else None,
            "flagged_accuracy": float(right[flagged].mean()) if flagged.any() else None}


def _review_line(review: dict | None) -> str:
    if review is None:
        return "none fitted for these weights (run `hematovision export RUN` to calibrate one)"
    line = f"{review['flagged_fraction']:.1%} flagged for review"
    if review["unflagged_accuracy"] is None:
        return line + " (every image)"
    return line + f"; accuracy of the unflagged {review['unflagged_accuracy']:.4f} on {review['n_unflagged']} images"
