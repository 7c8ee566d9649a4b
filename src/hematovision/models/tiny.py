"""A tiny CNN for fast tests of everything that takes a model."""

from __future__ import annotations

from torch import Tensor, nn

from hematovision.models.registry import register_model


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head; exposes ``features`` for Grad-CAM."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return logits


@register_model(family="test", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
def tiny_cnn(num_classes: int, pretrained: bool = False, width: int = 8) -> nn.Module:
    """Tiny two-layer CNN for tests (no pretrained weights)."""
    if pretrained:
        from hematovision.models.registry import PretrainedUnavailableError

        raise PretrainedUnavailableError("tiny_cnn has no pretrained weights")
    return TinyCNN(num_classes, width)
