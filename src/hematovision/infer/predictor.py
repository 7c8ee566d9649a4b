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
from hematovision.infer.runtime import view_logits
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
    """

    def __init__(self, model: nn.Module, card: ModelCard, views: int | None = None) -> None:
        self.card = card
        self.class_names: list[str] = list(card.class_names)
        self.prep: Preprocessing = card.preprocessing
        self.temperature = float(card.temperature)
        self.views = views or card.tta
        self.model = model.eval().to(memory_format=torch.channels_last)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, views: int | None = None) -> Predictor:
        """Load a run folder; its weights are checked against the card's sha256."""
        card, model = load_run(run_dir)
        return cls(model, card, views)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images of any size → normalised (N, 3, S, S) tensor."""
        batch = np.stack([self.prep.prepare(image) for image in images])
        return normalize(batch, self.prep).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Raw logits, (N, K)."""
        outputs = [view_logits(self.model, self.preprocess(images[i : i + batch_size]), self.views).numpy()
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Calibrated class probabilities, (N, K).

        Raises:
            NonFiniteOutputError: the model gave NaN or infinite outputs.
        """
        probabilities = softmax(self.logits(images, batch_size), self.temperature)
        check_finite(probabilities)
        return probabilities


def check_finite(probabilities: np.ndarray) -> None:
    """Refuse NaN or infinite probabilities: an answer like "basophil, confidence nan" is never given."""
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        raise NonFiniteOutputError(f"the model gave non-finite outputs for {int(bad.sum())} of {len(bad)} image(s); "
                                   "its weights or model card are damaged: restore the run folder or train again")
