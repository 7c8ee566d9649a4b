"""``prepare_run``: everything ``hematovision export`` does to make a run folder ready to serve."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hematovision._io import sha256_file, write_json
from hematovision.data.transforms import normalize
from hematovision.errors import DatasetError, HematoVisionError
from hematovision.infer.exported import onnx_forward, onnx_session
from hematovision.infer.runtime import torch_forward
from hematovision.run import EXPORT_FILE, INT8_FILE, MODEL_FILE, ONNX_FILE, SPLIT_FILE

log = logging.getLogger(__name__)


def prepare_run(
    run_dir: str | Path,
    onnx: bool = True,
    int8: bool = False,
    calibrate: bool = True,
    opset: int = 17,
    target_accuracy: float = 0.99,
    ood_quantile: float = 0.95,
    max_train: int = 3000,
    threads: int = 2,
    predictor: Any = None,
    openvino: bool = True,
) -> dict[str, Any]:
    """Export ONNX (checked against PyTorch), its OpenVINO IR, optionally INT8, and calibrate the review policy.

    Args:
        run_dir: a run folder from ``hematovision train``.
        onnx: write ``model.onnx``.
        int8: also write ``model.int8.onnx`` and measure its accuracy on the test split.
        calibrate: fit the review policy (``serving.json``, ``ood.npz``) on the run's split.
        opset: ONNX opset.
        target_accuracy: accuracy wanted among predictions not flagged for low confidence.
        ood_quantile: fraction of validation cells the OOD threshold lets through.
        max_train: most training images for the OOD model.
        threads: CPU threads.
        predictor: an already loaded predictor (tests); loaded from ``run_dir`` otherwise.
        openvino: also write the OpenVINO IR (``model.xml``/``model.bin``) of ``model.onnx`` and measure its
            accuracy against fp32 on the run's test split (``auto`` uses it only within the accuracy rule,
            see :mod:`hematovision.infer.backend`); skipped with a warning when openvino is not installed.

    Returns:
        The report, also written to ``RUN/export.json``.
    """
    from hematovision.export import calibrate as calibration
    from hematovision.export.onnx import compare_with_torch, export_onnx

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HematoVisionError(f"{run_dir} is not a run folder")
    torch.set_num_threads(threads)
    if predictor is None:
        from hematovision.infer.predictor import Predictor

        predictor = Predictor.from_run_dir(run_dir)
    model, prep = predictor.model.eval(), predictor.prep
    # The run's test-time views: its head and temperature were fitted on them, so the export,
    # its check and the review policy all score images the same way.
    views = int(getattr(predictor, "views", 1) or 1)
    # What the exported files were made from: the server ignores them once the weights change.
    source = run_dir / MODEL_FILE
    report: dict[str, Any] = {"run_dir": str(run_dir),
                              "source_sha256": sha256_file(source) if source.is_file() else None}
    splits: dict[str, list[Any]] | None
    try:
        splits = calibration.read_run_split(run_dir, getattr(predictor.card, "split_file", SPLIT_FILE))
    except DatasetError as error:
        log.warning("%s", error)
        splits = None
    if (int8 or calibrate) and splits is None:
        raise HematoVisionError("INT8 calibration and the review policy need the run's split.csv and images; "
                                "use --no-calibrate (and no --int8) to export only")

    forward = torch_forward(model, prep, views)
    if onnx or int8:
        path = run_dir / ONNX_FILE
        export_onnx(model, prep.image_size, path, opset, views)
        session = onnx_session(path, threads)
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(4, 3, prep.image_size, prep.image_size, generator=generator)
        source = "4 random normal inputs"
        if splits and splits.get("val"):
            from hematovision.data.folder import load_images

            real = load_images(splits["val"][:16], prep, desc="check images").images
            if len(real):
                inputs = torch.cat([inputs, normalize(real, prep)])
                source += f" + {len(real)} validation images"
        check = compare_with_torch(model, session, inputs, views)
        report["onnx"] = {"file": ONNX_FILE, "opset": opset, "dynamic_batch": True, "views": views,
                          "checked_on": source, **check}
        log.info("ONNX export: max |logit difference| %.2e on %s", check["logits_max_abs_diff"], source)
        forward = onnx_forward(session, prep)
        if openvino:
            from hematovision.export.openvino_ir import export_and_measure

            report["openvino"] = export_and_measure(run_dir, model, forward, inputs, source, views, prep,
                                                    predictor.class_names, splits, threads)
        if int8:
            report["int8"] = _quantize(run_dir, session, predictor, splits or {}, threads)

    lab_policy = _policy_fitted_by_adapt(predictor) if calibrate else None
    if lab_policy is not None:
        # split.csv of an adapted run lists the source labs' images: calibrating on them would replace the
        # thresholds fitted on the new lab's own cells with ones for the labs the run was adapted away from.
        log.info("review policy: keeping the one `hematovision adapt` wrote for the lab "
                 "(split.csv holds the source run's images, not this lab's)")
        report["review_policy"] = {**lab_policy.describe(), "kept": "written by `hematovision adapt` for the lab; "
                                   "not recalibrated on split.csv (the source run's images)"}
    elif calibrate and splits is not None:
        if getattr(predictor.card, "adaptation", None):
            log.warning("this run was adapted to another lab but has no review policy of its own; calibrating "
                        "one on split.csv, i.e. on the source run's images")
        policy = calibration.calibrate(forward, predictor.class_names, prep, splits,
                                       float(getattr(predictor, "temperature", 1.0) or 1.0),
                                       target_accuracy, ood_quantile, max_train)
        policy.info["source_sha256"] = report["source_sha256"]
        policy.info["views"] = views
        policy.save(run_dir)
        report["review_policy"] = policy.describe()
    write_json(run_dir / EXPORT_FILE, report)
    return report


def _policy_fitted_by_adapt(predictor: Any) -> Any:
    """The review policy ``hematovision adapt`` wrote for a lab (thresholds fitted on its cells, or the
    source's carried over), when the run is adapted and that policy is current (made for these weights
    and views), else ``None``."""
    if not getattr(predictor.card, "adaptation", None):
        return None
    return getattr(predictor, "policy", None)


def _quantize(run_dir: Path, session: Any, predictor: Any, splits: dict[str, list[Any]], threads: int) -> dict[str, Any]:
    from hematovision.data.folder import label_indices, load_images
    from hematovision.export.quantize import compare_accuracy, quantize_int8

    prep = predictor.prep
    train = splits.get("train") or []
    if not train:
        raise HematoVisionError("INT8 calibration needs the run's train split")
    rng = np.random.default_rng(0)
    chosen = [train[i] for i in sorted(rng.choice(len(train), min(200, len(train)), replace=False))]
    calibration_images = load_images(chosen, prep, desc="int8 calibration images").images
    quantize_int8(run_dir / ONNX_FILE, run_dir / INT8_FILE, calibration_images, prep)
    result: dict[str, Any] = {"file": INT8_FILE, "calibration": f"{len(calibration_images)} train images"}
    test = splits.get("test") or []
    if test:
        loaded = load_images(test, prep, desc="int8 test images")
        labels = label_indices(loaded.samples, predictor.class_names)
        scores = compare_accuracy({"fp32": session, "int8": onnx_session(run_dir / INT8_FILE, threads)},
                                  loaded.images, labels, prep)
        result.update({
            "split": f"test ({len(labels)} images)",
            "accuracy_fp32": scores["fp32"]["accuracy"],
            "accuracy_int8": scores["int8"]["accuracy"],
            "accuracy_change": scores["int8"]["accuracy"] - scores["fp32"]["accuracy"],
            "agreement_with_fp32": scores["int8"]["agreement"],
        })
    return result
