"""Image transforms: RGB uint8 (H, W, 3) in, normalised float32 (3, S, S) tensors out.

Evaluation resizes the whole image to a square (single-cell crops are centred on the
cell, so no centre crop is taken). Training adds the augmentations that suit stained
cells: any dihedral symmetry (a cell has no "up"), small rescaled crops and mild colour
jitter, which stands in for other labs' stains and scanners.

The evaluation path (:meth:`Preprocessing.prepare`, :func:`normalize_array`) is numpy only, so an
exported model (ONNX Runtime, OpenVINO) scores images without importing torch; torch is imported
by the functions that make tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into model inputs; saved in every model card.

    Attributes:
        image_size: side of the square model input, in pixels.
        mean: per-channel mean subtracted from RGB in [0, 1].
        std: per-channel std divided after subtracting the mean.
        cell_scale: scale normalisation: the white cell is found in the image and the image is
            resampled so that the cell's diameter is this fraction of ``image_size``, whatever the
            microscope's magnification (``None``: the whole image is resized as it is).
        stain: stain normalisation to a reference (see :mod:`hematovision.data.stain`), e.g.
            ``{"method": "reinhard", ...reference statistics}``; ``None``: colours as they are.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    cell_scale: float | None = None
    stain: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Cards of runs without these steps keep the layout older readers know.
        return {key: value for key, value in data.items() if value is not None or key not in ("cell_scale", "stain")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        cell_scale = data.get("cell_scale")
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),  # type: ignore[arg-type]
                   None if cell_scale is None else float(cell_scale), data.get("stain"))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB uint8 image (H, W, 3) → the model's input pixels (S, S, 3) uint8.

        The one path from a file's pixels to what the network sees, at training and at
        inference alike: scale normalisation (:meth:`rescale`), stain normalisation, then the
        resize (:meth:`finish`).
        """
        return self.finish(self.rescale(image))

    def rescale(self, image: np.ndarray) -> np.ndarray:
        """The scale normalisation step alone (the image as it is without ``cell_scale``), at full resolution.

        Its colours are the lab's own: the morphology expert measures the cell here, before stain
        normalisation moves them (:func:`hematovision.infer.morphology.prepare_measured`).
        """
        if self.cell_scale is None:
            return image
        from hematovision.data.scale import rescale_to_cell

        return rescale_to_cell(image, self.cell_scale)

    def finish(self, scaled: np.ndarray) -> np.ndarray:
        """Stain normalisation and the resize, on the output of :meth:`rescale`."""
        if self.stain is not None:
            from hematovision.data.stain import normalize_stain

            scaled = normalize_stain(scaled, self.stain)
        return resize(scaled, self.image_size)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3) with bicubic, antialiased resampling."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def normalize_array(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 → (N, 3, H, W) or (3, H, W) float32, normalised: ``(x / 255 - mean) / std``.

    The one definition of the model-input arithmetic (:func:`normalize` wraps it for PyTorch). The
    result is a channels-first view of channels-last memory (what PyTorch's ``channels_last`` format
    is); ONNX Runtime and OpenVINO take it as it is.
    """
    pixels = np.asarray(images).astype(np.float32) / np.float32(255.0)
    pixels -= np.asarray(prep.mean, dtype=np.float32)
    pixels /= np.asarray(prep.std, dtype=np.float32)
    return np.moveaxis(pixels, -1, -3)


def normalize(images: np.ndarray | torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 → (N, 3, H, W) or (3, H, W) float32 tensor: :func:`normalize_array`."""
    import torch

    if isinstance(images, torch.Tensor):
        return torch.from_numpy(normalize_array(images.detach().cpu().numpy(), prep)).to(images.device)
    return torch.from_numpy(normalize_array(images, prep))


def eval_transform(image: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """The deterministic transform used for validation, test and prediction."""
    return normalize(prep.prepare(image), prep)


def dihedral(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """One of the 8 flips/90° rotations of the last two dimensions (index 0 is the identity).

    The same as ``torch.rot90(tensor, index % 4, dims=(-2, -1))`` after an optional flip, written
    with flips and a transpose because ONNX has no rot90: the run's views go into the export.
    """
    if index >= 4:
        tensor = tensor.flip(-1)
    turns = index % 4
    if turns == 1:
        return tensor.transpose(-2, -1).flip(-2)
    if turns == 2:
        return tensor.flip(-2).flip(-1)
    if turns == 3:
        return tensor.transpose(-2, -1).flip(-1)
    return tensor


def dihedral_mean(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, views: int) -> torch.Tensor:
    """``fn`` averaged over the first ``views`` dihedral views of ``batch`` (test-time augmentation).

    A cell's class does not change under flips and 90° rotations, so averaging over them
    removes the orientation noise of a single view.
    """
    import torch

    if views not in (1, 2, 4, 8):
        raise ValueError(f"views must be 1, 2, 4 or 8, got {views}")
    if views == 1:
        return fn(batch)
    return torch.stack([fn(dihedral(batch, k)) for k in range(views)]).mean(0)


class TrainTransform:
    """Random augmentation for training; randomness comes from the given generator.

    Args:
        prep: the model's preprocessing.
        scale: range of the area fraction kept by the random crop.
        color_jitter: strength of brightness/contrast/saturation changes (0 disables them);
            hue moves by a tenth of it.
        strong: also prepare for other labs' images: wider zoom in and out, blur and lost
            resolution (other scanners and magnifications), stronger stain and colour changes:
            :func:`hematovision.data.stain.augment_stain` (stain in CIELAB or HED space, blur,
            resolution, noise, illumination) at ``stain_strength``.
        stain_strength: strength of the strong mode's stain and optics augmentation.
    """

    def __init__(self, prep: Preprocessing, scale: tuple[float, float] = (0.75, 1.0), color_jitter: float = 0.15,
                 strong: bool = False, stain_strength: float = 1.0) -> None:
        self.prep = prep
        self.stain_strength = stain_strength
        self.scale = (0.1, 1.0) if strong else scale
        self.color_jitter = max(color_jitter, 0.3) if strong else color_jitter
        self.strong = strong

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        import torch

        height, width = image.shape[:2]
        fraction = rng.uniform(*self.scale)
        side_h, side_w = max(1, round(height * fraction**0.5)), max(1, round(width * fraction**0.5))
        if self.strong:
            # Close zooms must still hold the cell, which single-cell images have near the centre.
            top = _near_centre(height, side_h, rng)
            left = _near_centre(width, side_w, rng)
        else:
            top = int(rng.integers(0, height - side_h + 1))
            left = int(rng.integers(0, width - side_w + 1))
        crop = resize(np.ascontiguousarray(image[top : top + side_h, left : left + side_w]), self.prep.image_size)
        if self.strong:
            from hematovision.data.stain import augment_stain

            crop = augment_stain(_degrade(crop, rng), rng, self.stain_strength)
        tensor = torch.as_tensor(crop).movedim(-1, 0).float().div_(255.0)
        tensor = dihedral(tensor, int(rng.integers(0, 8)))
        if self.color_jitter > 0:
            tensor = _jitter_colors(tensor, rng, self.color_jitter)
        if self.strong:
            # Stains differ between labs channel by channel, not only in overall hue.
            tensor = (tensor * torch.as_tensor(rng.uniform(0.9, 1.1, 3), dtype=torch.float32).view(3, 1, 1)).clamp_(0, 1)
        mean = torch.tensor(self.prep.mean).view(3, 1, 1)
        std = torch.tensor(self.prep.std).view(3, 1, 1)
        return (tensor - mean) / std


def _near_centre(length: int, side: int, rng: np.random.Generator) -> int:
    """Start of a window of ``side`` whose centre is within 10% of ``length`` of the middle."""
    start = (length - side) / 2 + rng.uniform(-0.1, 0.1) * length
    return int(np.clip(round(start), 0, length - side))


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom out (cell smaller, the border colour around it) and/or lose resolution, at random."""
    size = image.shape[0]
    if rng.random() < 0.3:
        inner = max(8, round(size / rng.uniform(1.0, 1.6)))
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        canvas = np.empty_like(image)
        canvas[:] = np.median(border, axis=0).astype(np.uint8)
        offset = (size - inner) // 2
        canvas[offset : offset + inner, offset : offset + inner] = resize(image, inner)
        image = canvas
    if rng.random() < 0.5:
        image = resize(resize(image, max(8, round(size / rng.uniform(1.5, 3.5)))), size)
    return image


def _jitter_colors(tensor: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    tensor = F.adjust_brightness(tensor, 1 + rng.uniform(-strength, strength))
    tensor = F.adjust_contrast(tensor, 1 + rng.uniform(-strength, strength))
    tensor = F.adjust_saturation(tensor, 1 + rng.uniform(-strength, strength))
    tensor = F.adjust_hue(tensor, rng.uniform(-strength / 10, strength / 10))
    return tensor.clamp_(0.0, 1.0)
