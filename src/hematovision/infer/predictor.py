"""A trained run loaded once, classifying images with calibrated probabilities.

An exported backend (ONNX Runtime, OpenVINO) takes numpy arrays, so a predictor that uses one never
imports torch: the run's card is read and its weights' sha256 checked (:func:`~hematovision.run.read_run`)
without building the network, and the images are prepared and normalised in numpy. The PyTorch
network is built only when something uses :attr:`Predictor.model` (the ``torch`` backend, the server,
Grad-CAM, export).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematovision.data.transforms import Preprocessing
from hematovision.errors import HematoVisionError
from hematovision.evaluate.metrics import softmax
from hematovision.infer.backend import LoadedBackend
from hematovision.infer.exported import Forward, onnx_forward, onnx_session
from hematovision.infer.morphology import Measured, MorphologyExpert, expert_of, pixels_of, prepare_measured
from hematovision.infer.policy import ReviewPolicy, current_policy
from hematovision.infer.shift import LabShift, ShiftMonitor, ShiftReference
from hematovision.run import ModelCard, load_model, read_run
from hematovision.threads import inference_threads

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hematovision.infer.runtime import LogitsAndFeatures


class NonFiniteOutputError(HematoVisionError):
    """The model answered NaN or infinity: its weights or card are damaged."""


class Predictor:
    """A trained model ready for inference.

    Args:
        model: the PyTorch network, or ``None`` to build it from ``run_dir`` when first needed (a
            predictor on an exported backend never needs it, and never imports torch).
        card: the run's model card.
        views: dihedral views per image (default ``card.tta``).
        run_dir: the run folder the network is built from when ``model`` is ``None``.

    Attributes:
        card: the run's model card.
        class_names: the K class names, in output order.
        prep: preprocessing (size, mean, std).
        temperature: calibration temperature fitted on validation data.
        views: dihedral views (flips/90° rotations) averaged per image; by default the number the
            run was trained and calibrated with (``card.tta``).
        shift: the lab-shift score of the images predicted since :meth:`reset_shift` (``None``: the
            run has no calibrated reference in ``card.shift``); see :meth:`lab_shift`.
        policy: the run's review policy, when fitted for these weights and views.
        backend: the runtime that scores the images (``torch``, ``onnx``, ``int8``, ``openvino``);
            ``precision`` the arithmetic it really uses.
        morphology: the run's morphology expert (``train --morphology``); ``None`` for other runs.
            Fused into every logit this predictor gives, whatever the backend, once it holds a lab's
            own statistics (``adapt --unlabelled``); before that only ``evaluate``'s re-scoring of
            another lab uses it (with the measurements kept here, :meth:`kept_morphology`).
    """

    def __init__(self, model: nn.Module | None, card: ModelCard, views: int | None = None,
                 run_dir: str | Path | None = None) -> None:
        self.card = card
        self.class_names: list[str] = list(card.class_names)
        self.prep: Preprocessing = card.preprocessing
        self.temperature = float(card.temperature)
        self.views = views or card.tta
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._model = _for_inference(model) if model is not None else None
        reference = ShiftReference.from_card(card.shift)
        self.shift = ShiftMonitor(reference) if reference is not None else None
        self.morphology: MorphologyExpert | None = expert_of(card.morphology, len(self.class_names))
        self._kept_morphology: list[np.ndarray] = []  # with the shift's kept features: evaluate re-scores them
        # PyTorch only: the final layer's input comes from the same pass as the logits (a forward hook).
        self._with_features: LogitsAndFeatures | None = None
        # The review policy of `hematovision export` (or `adapt`), when fitted for these weights.
        self.policy: ReviewPolicy | None = None
        # Set by use_onnx()/use_backend(): ONNX Runtime or OpenVINO scores the images instead of
        # `model` (same two outputs); `precision` is the arithmetic the backend really uses.
        self.backend = "torch"
        self.precision = "f32"
        self._exported: Forward | None = None

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, views: int | None = None, backend: str = "torch") -> Predictor:
        """Load a run folder; its weights are checked against the card's sha256.

        Args:
            backend: ``torch``, ``onnx`` (``model.onnx``), ``int8`` (``model.int8.onnx``), ``openvino``
                (``model.xml``) or ``auto`` (the best up-to-date export the run has; OpenVINO only when
                its measured accuracy loss is within the rule); see :mod:`hematovision.infer.backend`.
                Exported backends get as many threads as PyTorch has
                (:func:`~hematovision.threads.inference_threads`), and torch is not imported for them;
                for ``torch`` the network is built here, so damaged weights fail now, not mid-job.
        """
        from hematovision.infer.backend import load_backend

        card = read_run(run_dir)
        views = views or card.tta
        loaded = load_backend(run_dir, views, card.preprocessing, inference_threads(), backend)
        predictor = cls(load_model(run_dir, card) if loaded.forward is None else None, card, views, run_dir)
        predictor.policy = current_policy(run_dir, card.weights_sha256, predictor.views)
        predictor.use_backend(loaded)
        return predictor

    @property
    def model(self) -> nn.Module:
        """The PyTorch network (takes normalised (N, 3, S, S) float tensors, returns logits).

        Built from :attr:`run_dir` on first use when the predictor was made without it (an exported
        backend); this imports torch.
        """
        if self._model is None:
            if self.run_dir is None:
                raise HematoVisionError("this predictor has neither a PyTorch model nor a run folder to build it from")
            self._model = _for_inference(load_model(self.run_dir, self.card))
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = _for_inference(model)
        self._with_features = None  # it wrapped the previous network

    def use_backend(self, loaded: LoadedBackend) -> None:
        """Score images with a backend from :func:`~hematovision.infer.backend.load_backend` (PyTorch: :attr:`model`)."""
        self._exported = loaded.forward
        self.backend = loaded.name
        self.precision = loaded.precision

    def use_onnx(self, path: str | Path, name: str = "onnx") -> None:
        """Score images with ONNX Runtime from ``path`` (exported with this run's views) instead of PyTorch.

        The session gets as many intra-op threads as PyTorch has (:func:`~hematovision.threads.inference_threads`).
        """
        self._exported = onnx_forward(onnx_session(path, inference_threads()), self.prep)
        self.backend = name
        self.precision = "int8" if name == "int8" else "f32"

    def preprocess(self, images: Sequence[np.ndarray], prepared: bool = False) -> torch.Tensor:
        """RGB uint8 images of any size → normalised (N, 3, S, S) channels-last tensor (for the PyTorch network).

        Args:
            prepared: the images already went through ``prep.prepare`` (e.g. loaded with
                ``load_images(samples, prep)``); scale and stain normalisation are not applied twice.
        """
        items = list(images) if prepared else [self.prep.prepare(image) for image in images]
        return self._tensor(np.stack([pixels_of(item) for item in items]))

    def logits(self, images: Sequence[np.ndarray], batch_size: int = 32, prepared: bool = False) -> np.ndarray:
        """Raw logits, (N, K). With a shift reference, the images' lab-shift scores are collected too."""
        return self._forward(images, batch_size, prepared, keep_features=False)[0]

    @property
    def measures(self) -> bool:
        """Whether the cells are measured for the morphology expert: fused (a lab's expert), or kept for
        ``evaluate``'s re-scoring of another lab (while the shift keeps its features)."""
        return self.morphology is not None and (
            self.morphology.lab is not None or (self.shift is not None and self.shift.keep_features))

    def prepare(self, image: np.ndarray) -> np.ndarray | Measured:
        """A decoded image as :meth:`predict` takes it with ``prepared=True`` (the streaming decoders call this).

        The network's input pixels, or, while :attr:`measures`, those and the cell's measurements
        taken before stain normalisation (:func:`~hematovision.infer.morphology.prepare_measured`).
        """
        return prepare_measured(image, self.prep) if self.measures else self.prep.prepare(image)

    def _pixels(self, images: Sequence[np.ndarray | Measured], prepared: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S, 3) uint8, the images as the model sees them, and (while :attr:`measures`) the cells' (N, F)
        measurements. ``prepared``: the images came from :meth:`prepare` (else ``prep.prepare`` is applied)."""
        items = list(images) if prepared else [self.prepare(np.asarray(image)) for image in images]
        if not self.measures:
            return np.stack([pixels_of(item) for item in items]), None
        if not all(isinstance(item, Measured) for item in items):
            raise ValueError("prepared images for a run whose morphology expert is in use must come from "
                             "Predictor.prepare (the cells are measured before stain normalisation)")
        measured = [item for item in items if isinstance(item, Measured)]
        return np.stack([item.pixels for item in measured]), np.stack([item.measured for item in measured])

    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        import torch

        from hematovision.data.transforms import normalize

        return normalize(pixels, self.prep).contiguous(memory_format=torch.channels_last)

    def _forward(self, images: Sequence[np.ndarray], batch_size: int, prepared: bool,
                 keep_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, when asked, the final layer's inputs (what the OOD score needs)."""
        outputs, kept = [], []
        for i in range(0, len(images), batch_size):
            pixels, measured = self._pixels(images[i : i + batch_size], prepared)
            logits, features = self._score(pixels, with_features=keep_features or self.shift is not None)
            if measured is not None and self.morphology is not None:
                if self.morphology.lab is not None:
                    logits = self.morphology.fuse(logits, measured)
                if self.shift is not None and self.shift.keep_features:
                    self._kept_morphology.append(measured)
            if features is not None and self.shift is not None:
                self.shift.update(features)
            if features is not None and keep_features:
                kept.append(features)
            outputs.append(logits)
        logits_all = np.concatenate(outputs) if outputs else np.zeros((0, len(self.class_names)), np.float32)
        return logits_all, (np.concatenate(kept) if kept else None)

    def _score(self, pixels: np.ndarray, with_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S, 3) prepared uint8 → logits and (when asked; an exported graph always gives them) features."""
        if self._exported is not None:  # the exported graph (ONNX or OpenVINO) has the views and both outputs
            return self._exported(pixels)
        import torch

        from hematovision.infer.runtime import LogitsAndFeatures, view_logits

        batch = self._tensor(pixels)
        with torch.inference_mode():
            if not with_features:
                return view_logits(self.model, batch, self.views).numpy(), None
            if self._with_features is None:
                self._with_features = LogitsAndFeatures(self.model, self.views)
            logits, features = self._with_features(batch)
            return logits.numpy(), features.numpy()

    def lab_shift(self) -> LabShift | None:
        """The lab-shift score of every image predicted since the last :meth:`reset_shift`.

        ``None`` when the run has no calibrated reference (trained before the score existed) or
        nothing was predicted. ``result.shifted`` says whether to warn; ``result.message()`` how.
        """
        return self.shift.result() if self.shift is not None else None

    def reset_shift(self) -> None:
        """Start a new batch for :meth:`lab_shift` (e.g. per sample or per request)."""
        if self.shift is not None:
            self.shift.reset()
        self._kept_morphology = []

    def kept_morphology(self) -> np.ndarray:
        """(N, F) the cell measurements of the images predicted while the shift kept its features."""
        return np.concatenate(self._kept_morphology) if self._kept_morphology else np.zeros((0, 0))

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 32, prepared: bool = False) -> np.ndarray:
        """Calibrated class probabilities, (N, K); ``prepared`` as in :meth:`preprocess`.

        Raises:
            NonFiniteOutputError: the model gave NaN or infinite outputs.
        """
        probabilities = softmax(self.logits(images, batch_size, prepared), self.temperature)
        check_finite(probabilities)
        return probabilities

    def predict_reviewed(self, images: Sequence[np.ndarray], batch_size: int = 32,
                         prepared: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and whether the run's review policy flags each image (N,) bool.

        The same rules as the server (low confidence, out of distribution); without a policy
        fitted for these weights nothing is flagged — check :attr:`policy` first.
        """
        needs_features = self.policy is not None and self.policy.has_ood
        logits, features = self._forward(images, batch_size, prepared, keep_features=needs_features)
        return self.review(logits, features)

    def review(self, logits: np.ndarray, features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and review flags from logits and, for the OOD check, the final layer's inputs.

        Without ``features`` only the confidence rule applies (``evaluate`` re-scoring a lab on its
        own statistics: the OOD model was fitted on the run's).
        """
        probabilities = softmax(logits, self.temperature)
        check_finite(probabilities)
        if self.policy is None:
            return probabilities, np.zeros(len(probabilities), bool)
        ood = self.policy.ood_scores(features) if features is not None else None
        flagged = np.array([bool(self.policy.reasons(float(p.max()), None if ood is None else float(ood[i])))
                            for i, p in enumerate(probabilities)], bool)
        return probabilities, flagged


def check_finite(probabilities: np.ndarray) -> None:
    """Refuse NaN or infinite probabilities: an answer like "basophil, confidence nan" is never given."""
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        raise NonFiniteOutputError(f"the model gave non-finite outputs for {int(bad.sum())} of {len(bad)} image(s); "
                                   "its weights or model card are damaged: restore the run folder or train again")


def _for_inference(model: nn.Module) -> nn.Module:
    """The network in eval mode, its weights in channels-last memory (the faster layout for CPU convolutions)."""
    import torch

    return model.eval().to(memory_format=torch.channels_last)
