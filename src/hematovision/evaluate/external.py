"""``hematovision evaluate``: a trained run on every image of another folder (all of it is test data)."""

from __future__ import annotations

import logging
from pathlib import Path

from hematovision._io import write_json
from hematovision.data.folder import label_indices, load_images, scan_image_folder
from hematovision.errors import DatasetError

log = logging.getLogger(__name__)


def evaluate_folder(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Evaluate the run in ``run_dir`` on all images under ``data_dir``.

    Classes of ``data_dir`` that the model does not know are reported (``unknown_classes``)
    and left out; classes the model knows but ``data_dir`` lacks simply have no support.

    Returns:
        The metrics dict, also written to ``out_dir/metrics.json`` with a report and plots.
    """
    from hematovision.evaluate.report import write_evaluation
    from hematovision.predict import Predictor

    predictor = Predictor.from_run_dir(run_dir)
    folder = scan_image_folder(data_dir)
    known = set(predictor.class_names)
    unknown = sorted(set(folder.class_names) - known)
    if unknown:
        log.warning("classes not known to the model, left out: %s", unknown)
    samples = [sample for sample in folder.samples if sample.label in known]
    if not samples:
        raise DatasetError(f"{data_dir} has no images of the model's classes {predictor.class_names}")
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval_{Path(data_dir).resolve().name}"
    loaded = load_images(samples, predictor.prep.image_size, desc="loading")
    if not loaded.samples:
        raise DatasetError(f"none of the {len(samples)} images in {data_dir} could be read")
    probabilities = predictor.predict(list(loaded.images))
    labels = label_indices(loaded.samples, predictor.class_names)
    context = {
        "run": str(run_dir), "data": str(data_dir), "split": "all images of the folder (external test set)",
        "unknown_classes": ", ".join(unknown) or "none",
        "left_out_images": len(folder.samples) - len(samples), "unreadable_files": len(loaded.failures),
    }
    metrics = write_evaluation(out, labels, probabilities, predictor.class_names,
                               f"{predictor.card['backbone']} ({predictor.card['mode']}) on {Path(data_dir).name}", context)
    metrics["unknown_classes"] = unknown
    metrics["unreadable_files"] = [[str(p), reason] for p, reason in loaded.failures]
    write_json(out / "metrics.json", metrics)
    return metrics
