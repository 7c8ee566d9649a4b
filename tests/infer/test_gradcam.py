"""Grad-CAM: the right layer is found, and the heat map falls on the cell where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hematovision.data.transforms import Preprocessing, normalize
from hematovision.infer.gradcam import GradCAM, find_target_layer, jet, overlay
from hematovision.models import create_model, get_model_info, list_models

SIZE = 48
PREP = Preprocessing(SIZE)


def synthetic_smear(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy pale background with red-cell-like discs and one stained "white cell" whose colour is the class.

    Returns the image (SIZE, SIZE, 3) uint8 and the mask of the white cell.
    """
    image = rng.uniform(190, 235, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(10, SIZE - 10, 2)
    cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
    for _ in range(3):  # distractors present in both classes: they carry no information
        ry, rx = rng.integers(5, SIZE - 5, 2)
        disc = ((yy - ry) ** 2 + (xx - rx) ** 2 <= 20) & ~cell
        image[disc] = (215, 150, 150)
    image[cell] = (110, 50, 170) if label == 0 else (60, 110, 200)
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8), cell


def test_gradcam_highlights_the_cell_not_the_background(one_thread: None) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("tiny_cnn", 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        labels = rng.integers(0, 2, 32)
        batch = normalize(np.stack([synthetic_smear(rng, int(y))[0] for y in labels]), PREP)
        loss = nn.functional.cross_entropy(model(batch), torch.as_tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    labels = np.arange(40) % 2
    samples = [synthetic_smear(rng, int(y)) for y in labels]
    cams, logits = GradCAM(model)(normalize(np.stack([s[0] for s in samples]), PREP))
    assert (logits.argmax(1) == labels).mean() >= 0.95  # the model learned the task
    assert cams.shape == (40, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    inside = np.array([cam[mask].mean() for cam, (_, mask) in zip(cams, samples)])
    outside = np.array([cam[~mask].mean() for cam, (_, mask) in zip(cams, samples)])
    assert np.median(inside / (outside + 1e-6)) > 3.0
    # The hottest pixel lies on the cell (or its rim) in nearly every image.
    hits = []
    for cam, (_, mask) in zip(cams, samples):
        y, x = np.unravel_index(cam.argmax(), cam.shape)
        hits.append(mask[max(0, y - 2):y + 3, max(0, x - 2):x + 3].any())
    assert np.mean(hits) >= 0.9


def test_target_layer_of_tiny_cnn_is_its_feature_block() -> None:
    model = create_model("tiny_cnn", 3)
    assert find_target_layer(model) is model.features


def test_target_layer_of_efficientnet_is_the_activated_head_conv() -> None:
    model = create_model("efficientnet_lite0", 5, pretrained=False)
    assert find_target_layer(model) is model.bn2


def test_gradcam_layer_attribute_wins_even_on_a_wrapped_part() -> None:
    backbone = create_model("tiny_cnn", 3)
    backbone.gradcam_layer = backbone.features[0]  # type: ignore[assignment]
    wrapper = nn.Sequential(backbone)
    assert find_target_layer(wrapper) is backbone.features[0]
    named = create_model("tiny_cnn", 3)
    named.gradcam_layer = "features.4"  # type: ignore[assignment]
    assert find_target_layer(nn.Sequential(named)) is named.features[4]


def test_models_without_spatial_maps_are_refused() -> None:
    with pytest.raises(ValueError, match="no spatial feature map"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2)))


def _cnn_backbones() -> list:
    names = [name for name in list_models() if get_model_info(name).family in ("backbone", "test")]
    # VGG-19's 120M-parameter head takes ~10 s just to initialise: run it with the slow tests.
    return [pytest.param(name, marks=pytest.mark.slow) if name.startswith("vgg") else name for name in names]


@pytest.mark.parametrize("name", _cnn_backbones())
def test_gradcam_runs_on_every_registered_cnn(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model(name, 4, pretrained=False)
    inputs = torch.randn(2, 3, 64, 64)
    cams, logits = GradCAM(model)(inputs, targets=[1, 3])
    assert cams.shape == (2, 64, 64) and logits.shape == (2, 4)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    # Explaining leaves the model as it was: no gradients kept, no hooks left behind, same mode.
    assert all(p.grad is None for p in model.parameters())
    assert not any(module._forward_hooks for module in model.modules())


def test_overlay_and_colour_map() -> None:
    colours = jet(np.array([[0.0, 0.5, 1.0]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 3, 3)
    assert colours[0, 0, 2] > colours[0, 0, 0]  # cold is blue
    assert colours[0, 2, 0] > colours[0, 2, 2]  # hot is red
    image = np.full((30, 40, 3), 128, np.uint8)
    blended = overlay(image, np.zeros((8, 8), np.float32))
    assert blended.shape == (30, 40, 3) and blended.dtype == np.uint8
