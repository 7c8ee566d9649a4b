"""The OpenVINO IR of the exported ONNX model, and how far its answers are from fp32.

``hematovision export`` converts ``model.onnx`` to ``model.xml``/``model.bin`` (weights kept in fp32:
no fp16 compression) and measures it on the run's own images, so that ``auto``
(:mod:`hematovision.infer.backend`) uses it only when the measured loss is within the rule. The
plugin's default inference precision is measured, since that is what ``auto`` runs: bf16 on CPUs with
AVX512-BF16 or AMX (about 2.5x ONNX Runtime fp32 on the PBC run of docs/scale.md, -0.13 points), f32
elsewhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hematovision._optional import optional_import
from hematovision.data.folder import Sample, label_indices, load_images
from hematovision.data.transforms import Preprocessing
from hematovision.evaluate.metrics import softmax
from hematovision.infer.backend import MAX_ACCURACY_LOSS, accuracy_rule_holds, openvino_installed
from hematovision.infer.exported import OPENVINO_HINT, Forward, openvino_forward, openvino_model, openvino_precision
from hematovision.infer.runtime import LogitsAndFeatures
from hematovision.run import ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE

log = logging.getLogger(__name__)

#: Most images of the split the accuracy is measured on (a seeded sample above that): 2,000 resolve
#: 0.05 points, ten times finer than the rule, in well under a minute at 224 px on 2 cores.
MAX_CHECK_IMAGES = 2000
#: Images decoded at a time while measuring, so the check's memory does not grow with the split.
CHUNK = 256


def export_openvino(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """Convert ``onnx_path`` to an OpenVINO IR at ``xml_path`` (its ``.bin`` beside it), weights in fp32.

    Both files are written under temporary names and renamed, the weights first, so a reader never
    finds a new graph with old weights.
    """
    ov = optional_import("openvino", "openvino")
    xml_path = Path(xml_path)
    model = ov.convert_model(str(onnx_path))
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=".openvino-") as tmp:
        staged = Path(tmp) / xml_path.name
        # compress_to_fp16=False: the weights stay fp32; the plugin chooses the arithmetic at compile time.
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(staged, xml_path)
    return xml_path


def compare_outputs(model: nn.Module, compiled: Any, inputs: Tensor, views: int = 1) -> dict[str, float]:
    """Max absolute differences between PyTorch and a compiled OpenVINO model on normalised ``inputs``.

    The same keys as :func:`hematovision.export.onnx.compare_with_torch`.
    """
    wrapped = LogitsAndFeatures(model, views).eval()
    with torch.inference_mode():
        logits, features = (t.numpy() for t in wrapped(inputs))
    results = compiled.create_infer_request().infer({"input": inputs.numpy()})
    ov_logits, ov_features = results[compiled.output("logits")], results[compiled.output("features")]
    return {
        "logits_max_abs_diff": float(np.abs(logits - ov_logits).max()),
        "features_max_abs_diff": float(np.abs(features - ov_features).max()),
        "prob_max_abs_diff": float(np.abs(softmax(logits) - softmax(ov_logits)).max()),
        "argmax_agreement": float((logits.argmax(1) == ov_logits.argmax(1)).mean()),
    }


def accuracy_against(reference: Forward, candidate: Forward, samples: Sequence[Sample], class_names: Sequence[str],
                     prep: Preprocessing, batch_size: int = 32) -> dict[str, Any]:
    """Top-1 accuracy of ``candidate`` and of the fp32 ``reference`` on the same images, and their agreement.

    The images are decoded :data:`CHUNK` at a time (unreadable ones are skipped, as everywhere).

    Returns:
        ``images``, ``accuracy_fp32``, ``accuracy_openvino``, ``accuracy_change`` (candidate minus
        reference, a fraction) and ``agreement_with_fp32`` (fraction of images with the same top class).
    """
    labels, ours, theirs = [], [], []
    for start in range(0, len(samples), CHUNK):
        loaded = load_images(samples[start:start + CHUNK], prep, desc="openvino check images")
        if not len(loaded.images):
            continue
        labels.append(label_indices(loaded.samples, class_names))
        for i in range(0, len(loaded.images), batch_size):
            batch = loaded.images[i:i + batch_size]
            ours.append(reference(batch)[0].argmax(1))
            theirs.append(candidate(batch)[0].argmax(1))
    if not labels:
        raise ValueError("none of the check images could be read")
    y, fp32, candidate_pred = np.concatenate(labels), np.concatenate(ours), np.concatenate(theirs)
    accuracy_fp32, accuracy = float((fp32 == y).mean()), float((candidate_pred == y).mean())
    return {"images": len(y), "accuracy_fp32": accuracy_fp32, "accuracy_openvino": accuracy,
            "accuracy_change": accuracy - accuracy_fp32,
            "agreement_with_fp32": float((candidate_pred == fp32).mean())}


def export_and_measure(run_dir: Path, model: nn.Module, reference: Forward, check_inputs: Tensor, checked_on: str,
                       views: int, prep: Preprocessing, class_names: Sequence[str],
                       splits: dict[str, list[Sample]] | None, threads: int) -> dict[str, Any]:
    """Write ``RUN/model.xml`` from ``RUN/model.onnx`` and measure it; the ``openvino`` section of ``export.json``.

    Args:
        reference: the fp32 ONNX Runtime forward of the same export (what the accuracy is compared with).
        check_inputs: normalised images for the output check against PyTorch (those of the ONNX check).
        checked_on: what ``check_inputs`` are, in words.
        splits: the run's split; the accuracy is measured on its test part (its validation part when
            it has none); without one, nothing is measured and ``auto`` will not use the IR.

    Returns:
        ``{"skipped": why}`` when openvino is not installed (the export goes on without it); otherwise
        the file names, views, precision, the check against PyTorch and the accuracy against fp32.
    """
    if not openvino_installed():
        why = "openvino is not installed; pip install 'hematovision[openvino]' to export an OpenVINO IR"
        log.warning("OpenVINO IR skipped: %s", why)
        return {"skipped": why}
    import openvino as ov

    xml = export_openvino(run_dir / ONNX_FILE, run_dir / OPENVINO_FILE)
    compiled = openvino_model(xml, threads)
    precision = openvino_precision(compiled)
    section: dict[str, Any] = {
        "file": OPENVINO_FILE, "weights": OPENVINO_WEIGHTS_FILE, "views": views, "openvino": ov.__version__,
        "weights_precision": "f32", "precision": precision, "performance_hint": OPENVINO_HINT,
        "checked_on": checked_on, **compare_outputs(model, compiled, check_inputs, views),
    }
    part = "test" if splits and splits.get("test") else "val" if splits and splits.get("val") else None
    if part is None or splits is None:
        section["accuracy_change"] = None
        section["auto"] = False
        log.warning("OpenVINO IR written but not measured against fp32 (no split): `auto` will not use it")
        return section
    samples = list(splits[part])
    if len(samples) > MAX_CHECK_IMAGES:
        rng = np.random.default_rng(0)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), MAX_CHECK_IMAGES, replace=False))]
    scores = accuracy_against(reference, openvino_forward(compiled, prep), samples, class_names, prep)
    images = scores.pop("images")
    section.update({"split": f"{part} ({images} images)", **scores,
                    "max_accuracy_loss": MAX_ACCURACY_LOSS,
                    "auto": accuracy_rule_holds(scores["accuracy_change"])})
    log.info("OpenVINO (%s): %+.2f accuracy points against fp32 on %s, agreement %.3f; auto %s it",
             precision, 100 * scores["accuracy_change"], section["split"], scores["agreement_with_fp32"],
             "uses" if section["auto"] else "does not use")
    return section
