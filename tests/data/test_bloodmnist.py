from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from hematovision.data import bloodmnist
from hematovision.data.folder import scan_image_folder
from hematovision.errors import DatasetError


def _write_npz(path: Path, per_split: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (per_split, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(per_split) % 8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path.read_bytes()


def test_load_and_export_official_splits(tmp_path: Path) -> None:
    npz = tmp_path / "bloodmnist.npz"
    _write_npz(npz)
    data = bloodmnist.load_bloodmnist(npz)
    assert data["train"][0].shape == (4, 28, 28, 3) and data["test"][1].tolist() == [0, 1, 2, 3]
    folder = scan_image_folder(bloodmnist.export_bloodmnist(npz, tmp_path / "export"))
    assert folder.split_names == ["test", "train", "val"]
    assert {s.label for s in folder.samples} == {"basophil", "eosinophil", "erythroblast", "ig"}


def test_not_a_medmnist_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="not a MedMNIST file"):
        bloodmnist.load_bloodmnist(tmp_path / "other.npz")


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_fetch_verifies_the_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _write_npz(tmp_path / "source.npz")
    requested = []

    def fake_urlopen(url: str, timeout: float):
        requested.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(bloodmnist.urllib.request, "urlopen", fake_urlopen)
    # Published checksum differs from our fake payload: the download is refused and nothing is left behind.
    with pytest.raises(DatasetError, match="does not match"):
        bloodmnist.fetch_bloodmnist(64, tmp_path / "dl")
    assert not list((tmp_path / "dl").iterdir())
    assert requested == ["https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1"]

    monkeypatch.setitem(bloodmnist.BLOODMNIST_MD5, 64, hashlib.md5(payload).hexdigest())
    path = bloodmnist.fetch_bloodmnist(64, tmp_path / "dl")
    assert path.read_bytes() == payload
    bloodmnist.fetch_bloodmnist(64, tmp_path / "dl")  # cached: no second download
    assert len(requested) == 2


def test_fetch_network_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(bloodmnist.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="Download it by hand"):
        bloodmnist.fetch_bloodmnist(28, tmp_path)


def test_unknown_size() -> None:
    with pytest.raises(DatasetError, match="sizes"):
        bloodmnist.fetch_bloodmnist(100)
