"""A trained run loaded once, classifying images with calibrated probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hematovision.data.transforms import Preprocessing, normalize
from hematovision.errors import HematoVisionError
from hematovision.evaluate.metrics import softmax
from hematovision.infer.policy import ReviewPolicy, current_policy
from hematovision.infer.runtime import Forward, LogitsAndFeatures, onnx_forward, onnx_session, view_logits
from hematovision.infer.shift import LabShift, ShiftMonitor, ShiftReference
from hematovision.run import ModelCard, load_run


class NonFiniteOutputError(HematoVisionError):
    """The model answered NaN or infinity: its weights or card are damaged."""


class Predictor:
    """A trained model ready for inference.

    Attributes:
        card: the run's model card.
        class_names: the K class names, in output order.
        prep: preprocessing (size, mean, std).
        model: the network; takes normalised (N, 3, S, S) float tensors, returns logits.
        temperature: calibration temperature fitted on validation data.
        views: dihedral views (flips/90° rotations) averaged per image; by default the number the
            run was trained and calibrated with (``card.tta``).
        shift: the lab-shift score of the images predicted since :meth:`reset_shift` (``None``: the
            run has no calibrated reference in ``card.shift``); see :meth:`lab_shift`.
    """

    def __init__(self, model: nn.Module, card: ModelCard, views: int | None = None) -> None:
        self.card = card
        self.class_names: list[str] = list(card.class_names)
        self.prep: Preprocessing = card.preprocessing
        self.temperature = float(card.temperature)
        self.views = views or card.tta
        self.model = model.eval().to(memory_format=torch.channels_last)
        reference = ShiftReference.from_card(card.shift)
        self.shift = ShiftMonitor(reference) if reference is not None else None
        # The final layer's input comes from the same pass as the logits (a forward hook).
        self._with_features = LogitsAndFeatures(self.model, self.views) if self.shift is not None else None
        # The review policy of `hematovision export` (or `adapt`), when fitted for these weights.
        self.policy: ReviewPolicy | None = None
        # Set by use_onnx(): ONNX Runtime scores the images instead of `model` (same two outputs).
        self.backend = "torch"
        self._onnx: Forward | None = None

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, views: int | None = None, backend: str = "torch") -> Predictor:
        """Load a run folder; its weights are checked against the card's sha256.

        Args:
            backend: ``torch``, ``onnx`` (``model.onnx``), ``int8`` (``model.int8.onnx``) or ``auto``
                (ONNX when the run has an up-to-date export); see :mod:`hematovision.infer.backend`.
        """
        from hematovision.infer.backend import resolve_backend

        card, model = load_run(run_dir)
        predictor = cls(model, card, views)
        predictor.policy = current_policy(run_dir, card.weights_sha256, predictor.views)
        name, path = resolve_backend(run_dir, predictor.views, backend)
        if path is not None:
            predictor.use_onnx(path, name)
        return predictor

    def use_onnx(self, path: str | Path, name: str = "onnx") -> None:
        """Score images with ONNX Runtime from ``path`` (exported with this run's views) instead of PyTorch.

        The session gets as many intra-op threads as PyTorch has (``torch.get_num_threads()``).
        """
        self._onnx = onnx_forward(onnx_session(path, torch.get_num_threads()), self.prep)
        self.backend = name

    def preprocess(self, images: Sequence[np.ndarray], prepared: bool = False) -> torch.Tensor:
        """RGB uint8 images of any size → normalised (N, 3, S, S) tensor.

        Args:
            prepared: the images already went through ``prep.prepare`` (e.g. loaded with
                ``load_images(samples, prep)``); scale and stain normalisation are not applied twice.
        """
        batch = np.stack(list(images) if prepared else [self.prep.prepare(image) for image in images])
        return normalize(batch, self.prep).contiguous(memory_format=torch.channels_last)

    def logits(self, images: Sequence[np.ndarray], batch_size: int = 32, prepared: bool = False) -> np.ndarray:
        """Raw logits, (N, K). With a shift reference, the images' lab-shift scores are collected too."""
        return self._forward(images, batch_size, prepared, keep_features=False)[0]

    @torch.inference_mode()
    def _forward(self, images: Sequence[np.ndarray], batch_size: int, prepared: bool,
                 keep_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, when asked, the final layer's inputs (what the OOD score needs)."""
        if (keep_features or self.shift is not None) and self._with_features is None:
            self._with_features = LogitsAndFeatures(self.model, self.views)
        outputs, kept = [], []
        for i in range(0, len(images), batch_size):
            if self._onnx is not None:  # the exported graph has the views and both outputs
                chunk = images[i : i + batch_size]
                pixels = np.stack(list(chunk) if prepared else [self.prep.prepare(image) for image in chunk])
                logits_np, features_np = self._onnx(pixels)
                if self.shift is not None:
                    self.shift.update(features_np)
                if keep_features:
                    kept.append(features_np)
                outputs.append(logits_np)
                continue
            batch = self.preprocess(images[i : i + batch_size], prepared)
            if self._with_features is not None:
                logits, features = self._with_features(batch)
                if self.shift is not None:
                    self.shift.update(features.numpy())
                if keep_features:
                    kept.append(features.numpy())
            else:
                logits = view_logits(self.model, batch, self.views)
            outputs.append(logits.numpy())
        logits_all = np.concatenate(outputs) if outputs else np.zeros((0, len(self.class_names)), np.float32)
        return logits_all, (np.concatenate(kept) if kept else None)

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
