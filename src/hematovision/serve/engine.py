"""The served model: preprocessing, batched inference (OpenVINO, ONNX Runtime or PyTorch), review flags, Grad-CAM.

The engine is built once at start-up from a predictor (see ``hematovision.predict``) and
is then used from two places: the micro-batcher's single inference thread
(:meth:`Engine.run_batch`) and, for heat maps, request threads (:meth:`Engine.heatmap`).
A lock keeps the PyTorch model to one caller at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hematovision.data.transforms import Preprocessing, normalize
from hematovision.errors import HematoVisionError
from hematovision.evaluate.metrics import softmax
from hematovision.infer.backend import LoadedBackend, load_backend
from hematovision.infer.exported import BATCH_SIZE, Forward
from hematovision.infer.morphology import Measured, fused_expert, pixels_of, prepare_measured
from hematovision.infer.policy import ReviewPolicy
from hematovision.infer.predictor import NonFiniteOutputError, check_finite
from hematovision.infer.runtime import LogitsAndFeatures
from hematovision.infer.shift import LabShift, ShiftReference

log = logging.getLogger(__name__)

#: How ``/health``, ``/api/v1/model`` and the answers name each backend of :mod:`hematovision.infer.backend`.
# The micro-batcher may gather more images than one model call should take (activation memory grows
# with the batch, images/s does not: infer/exported.BATCH_SIZE). So a batch is run in calls of at most
# MODEL_CHUNK images, and the start-up pass runs one full call: the memory serving needs is taken at
# start, not in the first rush.
MODEL_CHUNK = BATCH_SIZE

BACKEND_LABELS = {"torch": "pytorch", "onnx": "onnxruntime", "int8": "onnxruntime-int8", "openvino": "openvino"}


class PredictorLike(Protocol):
    """What the engine needs from a predictor (``hematovision.predict.Predictor`` has it)."""

    class_names: list[str]
    prep: Preprocessing
    model: nn.Module
    temperature: float
    card: Any


@dataclass(frozen=True)
class ImagePrediction:
    """The model's answer for one image.

    Attributes:
        label: predicted class.
        confidence: its calibrated probability.
        probabilities: class → calibrated probability.
        ood_score: out-of-distribution score (``None`` when the run has no OOD model).
        reasons: why a person should check it; empty when no review is needed.
        shift_score: the image's lab-shift score (``None`` when the run has no shift reference);
            a request's images are scored together by :meth:`Engine.lab_shift`.
    """

    label: str
    confidence: float
    probabilities: dict[str, float]
    ood_score: float | None
    reasons: list[str]
    shift_score: float | None = None

    @property
    def needs_review(self) -> bool:
        """Whether a person should check this prediction."""
        return bool(self.reasons)


class Engine:
    """Inference for the web app.

    Args:
        predictor: the loaded run (class names, preprocessing, model, temperature, card).
        run_dir: the run folder, searched for its exports and the review policy.
        backend: ``auto`` (the best up-to-date export, see :mod:`hematovision.infer.backend`), ``onnx``,
            ``int8`` (``model.int8.onnx``), ``openvino`` (``model.xml``) or ``torch``.
        threads: CPU threads for inference.
        confidence_threshold: overrides the calibrated confidence threshold.
        policy: overrides the policy found in ``run_dir`` (tests inject one).
    """

    def __init__(
        self,
        predictor: PredictorLike,
        run_dir: str | Path | None = None,
        backend: str = "auto",
        threads: int = 2,
        confidence_threshold: float | None = None,
        policy: ReviewPolicy | None = None,
    ) -> None:
        self.class_names = list(predictor.class_names)
        self.prep: Preprocessing = predictor.prep
        self.temperature = float(getattr(predictor, "temperature", 1.0) or 1.0)
        card = getattr(predictor, "card", None) or {}
        self.card: dict[str, Any] = card.to_dict() if hasattr(card, "to_dict") else dict(card)
        # The run's test-time views: a frozen --tta run's head and temperature were fitted on them.
        self.views = int(getattr(predictor, "views", 1) or 1)
        self.model = predictor.model.eval()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.shift = ShiftReference.from_card(self.card.get("shift"))
        self.morphology = fused_expert(self.card.get("morphology"), len(self.class_names))
        self._shift_warned = False
        self._torch_lock = threading.Lock()
        self._wrapped = LogitsAndFeatures(self.model, self.views)
        self._gradcam: Any = None
        torch.set_num_threads(threads)
        # The engine's own numpy work (OOD scores) is a few small products per batch: threaded
        # BLAS only spins there, and costs 3x the CPU of one thread while the model waits for it.
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")

        stale = self._stale_exports()
        if policy is None and self.run_dir is not None and "policy" not in stale:
            policy = ReviewPolicy.load(self.run_dir)
        self.policy = policy or ReviewPolicy()
        if not self.policy.calibrated:
            log.warning("no calibrated review policy in the run folder; run `hematovision export RUN` "
                        "to calibrate; flagging below confidence %.2f only", self.policy.confidence_threshold)
        if confidence_threshold is not None:
            self.policy = replace(self.policy, confidence_threshold=confidence_threshold)

        # The same rule as `predict`/`evaluate` (hematovision.infer.backend): auto takes OpenVINO when its
        # measured accuracy loss is within the rule, else an up-to-date model.onnx, else PyTorch.
        if self.run_dir is not None:
            loaded = load_backend(self.run_dir, self.views, self.prep, threads, backend, stale)
        elif backend in ("auto", "torch"):
            loaded = LoadedBackend("torch", None, "f32")
        else:
            raise HematoVisionError(f"backend {backend!r} needs a run folder with its export; "
                                    "run `hematovision export RUN`")
        self._exported: Forward | None = loaded.forward
        self.backend = BACKEND_LABELS[loaded.name]
        self.precision = loaded.precision
        self._check()
        log.info("serving %d classes with %s (%s) at %d px", len(self.class_names), self.backend, self.precision,
                 self.prep.image_size)

    def _stale_exports(self) -> set[str]:
        """Which exported files (``onnx``, ``openvino``, ``policy``) were made from other weights or other views."""
        from hematovision.infer.backend import stale_exports

        return stale_exports(self.run_dir, self.views) if self.run_dir is not None else set()

    def _check(self) -> None:
        # One pass at start-up: it warms the backend (the first request is not the slow one) and
        # catches a review policy calibrated for another model before any request fails on it.
        size = self.prep.image_size
        logits, features = self.forward(np.zeros((MODEL_CHUNK, size, size, 3), np.uint8))
        if logits.shape[1] != len(self.class_names):
            raise HematoVisionError(f"the model has {logits.shape[1]} outputs but the card lists "
                                    f"{len(self.class_names)} classes")
        # Finite weights can still overflow to NaN or infinity; such a model must not start serving
        # (every upload would then fail), and it is told apart from a bad upload here, once.
        check_finite(softmax(logits, self.temperature))
        means = self.policy.class_means
        if means is not None and means.shape[1] != features.shape[1]:
            raise HematoVisionError(
                f"the review policy in {self.run_dir} was calibrated on {means.shape[1]}-d features but the model "
                f"gives {features.shape[1]}-d ones; run `hematovision export RUN` again"
            )

    def prepare(self, image: np.ndarray) -> np.ndarray | Measured:
        """An RGB uint8 image (H, W, 3) → the model input (S, S, 3), and the cell's measurements when the run
        fuses a lab's morphology expert (taken before stain normalisation); safe on any thread."""
        return prepare_measured(image, self.prep) if self.morphology is not None else self.prep.prepare(image)

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and features (N, D) for prepared images (N, S, S, 3) uint8."""
        if len(batch) > MODEL_CHUNK:
            parts = [self.forward(batch[i : i + MODEL_CHUNK]) for i in range(0, len(batch), MODEL_CHUNK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if self._exported is not None:  # ONNX Runtime or OpenVINO: the views are in the exported graph
            return self._exported(batch)
        inputs = normalize(batch, self.prep)
        with self._torch_lock, torch.inference_mode():
            logits_t, features_t = self._wrapped(inputs)
        return logits_t.numpy(), features_t.numpy()

    def run_batch(self, images: list[np.ndarray | Measured]) -> list[ImagePrediction]:
        """Predict images from :meth:`prepare` in one pass; the micro-batcher's ``process``."""
        logits, features = self.forward(np.stack([pixels_of(x) for x in images]))
        if self.morphology is not None:  # a lab's morphology expert (train --morphology, then adapt)
            logits = self.morphology.fuse(logits, np.stack([x.measured for x in images if isinstance(x, Measured)]))
        probabilities = softmax(logits, self.temperature)
        try:
            check_finite(probabilities)
        except NonFiniteOutputError as error:
            # Inputs are uint8 pixels, always finite: the model is at fault, so the server log says so
            # (the client gets a 503 with the same line, and nothing is stored).
            log.error("%s", error)
            raise
        ood = self.policy.ood_scores(features)
        shift = self.shift.image_scores(features) if self.shift is not None else None
        results = []
        for i, probs in enumerate(probabilities):
            top = int(probs.argmax())
            score = None if ood is None else float(ood[i])
            results.append(ImagePrediction(
                label=self.class_names[top],
                confidence=float(probs[top]),
                probabilities={name: float(p) for name, p in zip(self.class_names, probs)},
                ood_score=score,
                reasons=self.policy.reasons(float(probs[top]), score),
                shift_score=None if shift is None else float(shift[i]),
            ))
        return results

    def lab_shift(self, predictions: list[ImagePrediction]) -> LabShift | None:
        """The lab-shift score of one request's images; the server log warns the first time one is shifted."""
        if self.shift is None:
            return None
        result = self.shift.assess([p.shift_score for p in predictions if p.shift_score is not None])
        if result is not None and result.shifted and not self._shift_warned:
            self._shift_warned = True  # once per process: every shifted answer carries the warning anyway
            log.warning("%s", result.message())
        return result

    def heatmap(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """Grad-CAM for one image (H, W, 3) uint8; returns the (S, S) heat map in [0, 1].

        Args:
            image: the original RGB image.
            label: class to explain; the predicted class when ``None``.
        """
        from hematovision.infer.gradcam import GradCAM

        target = None if label is None else [self.class_names.index(label)]
        inputs = normalize(np.array(self.prep.prepare(image)[None]), self.prep)  # a writable copy for torch
        with self._torch_lock:
            if self._gradcam is None:
                self._gradcam = GradCAM(self.model)
            cams, _ = self._gradcam(inputs, target)
        cam: np.ndarray = cams[0]  # numpy types an index into an array as Any
        return cam

    def describe(self) -> dict[str, Any]:
        """The model card plus how it is served, for ``GET /api/v1/model``."""
        return {
            "class_names": self.class_names,
            "preprocessing": self.prep.to_dict(),
            "temperature": self.temperature,
            "backend": self.backend,
            "precision": self.precision,
            "review_policy": self.policy.describe(),
            "card": self.card,
        }


def load_engine(run_dir: str | Path, backend: str = "auto", threads: int = 2,
                confidence_threshold: float | None = None) -> Engine:
    """Load a run folder with ``hematovision.predict.Predictor`` and wrap it in an :class:`Engine`.

    Raises:
        HematoVisionError: the folder is missing or not a run folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HematoVisionError(f"{run_dir} is not a folder; pass a run folder made by `hematovision train`")
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(run_dir)
    return Engine(predictor, run_dir, backend=backend, threads=threads, confidence_threshold=confidence_threshold)
