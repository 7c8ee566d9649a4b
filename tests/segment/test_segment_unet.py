"""U-Net shapes, one training step, a tiny end-to-end training run and loading it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hematovision.errors import HematoVisionError
from hematovision.segment.masks import find_seg_samples
from hematovision.segment.unet import (
    UNet,
    UNetConfig,
    augment_batch,
    load_unet,
    predict_labels,
    segmentation_loss,
    train_unet,
)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_unet_output_has_input_size_and_classes(num_classes: int) -> None:
    model = UNet(num_classes=num_classes, base_width=4, depth=3)
    out = model(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, num_classes, 32, 48)


def test_unet_rejects_sizes_not_divisible_by_the_pooling() -> None:
    with pytest.raises(HematoVisionError):
        UNet(base_width=4, depth=3)(torch.rand(1, 3, 30, 32))


def test_unet_blocks_follow_the_paper_design() -> None:
    model = UNet(base_width=4, depth=2)
    convs = [m for m in model.down[0] if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert all(isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2) for m in model.upconv)
    assert [b[0].in_channels for b in model.up] == [16, 8]  # skip concatenation doubles the input channels


@pytest.mark.parametrize("num_classes", [1, 3])
def test_one_adam_step_lowers_the_loss_on_the_same_batch(num_classes: int) -> None:
    torch.manual_seed(0)
    model = UNet(num_classes=num_classes, base_width=4, depth=2)
    x = torch.rand(4, 3, 16, 16)
    y = torch.zeros(4, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12] = 1
    y[:, 6:10, 6:10] = 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = segmentation_loss(model(x), y)
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    after = segmentation_loss(model(x), y)
    assert torch.isfinite(after) and after < before


def test_augmentation_moves_image_and_mask_together() -> None:
    x = torch.zeros(1, 3, 8, 8)
    x[..., 0, 0] = 1.0
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    y[..., 0, 0] = 2
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        xa, ya = augment_batch(x, y, generator)
        bright = xa[0].mean(0) == xa[0].mean(0).max()
        assert bool(bright[ya[0] == 2].all())


def _write_dataset(root: Path, n: int = 10, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(14, size - 14, 2)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        mask = np.where(r2 <= 100, 128, 0).astype(np.uint8)
        mask[r2 <= 25] = 255
        palette = np.array([[240, 230, 180], [200, 150, 160], [90, 40, 120]], np.float64)
        image = palette[np.digitize(mask, [64, 192])] + rng.normal(0, 4, (size, size, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


def test_tiny_training_run_writes_a_loadable_run_folder(tmp_path: Path) -> None:
    samples = find_seg_samples(_write_dataset(tmp_path / "data"))
    config = UNetConfig(image_size=32, base_width=4, depth=2, epochs=2, batch_size=4, threads=1)
    history = train_unet(samples[:8], samples[8:], tmp_path / "run", config)
    assert len(history["val_dice"]) == 2 and 0.0 <= history["best_val_dice"] <= 1.0
    for name in ("unet.safetensors", "unet_config.json", "history.json", "training_curve.png", "report.md"):
        assert (tmp_path / "run" / name).is_file()
    model, loaded = load_unet(tmp_path / "run")
    assert loaded.base_width == 4 and loaded.mode == "3class"
    image = np.asarray(Image.open(samples[0].image_path))
    labels = predict_labels(model, image, loaded)
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) <= {0, 1, 2}


def test_loading_a_folder_without_a_unet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HematoVisionError, match="not a U-Net run folder"):
        load_unet(tmp_path)
