"""BloodMNIST (MedMNIST v2/+, CC BY 4.0): the PBC images resized, with official splits.

``fetch_bloodmnist`` downloads the ``.npz`` from Zenodo (MD5 checked, progress bar) and
``export_bloodmnist`` writes it as ``ROOT/<split>/<class>/*.png`` so it loads like any
class-folder dataset. Nothing here runs unless asked; tests use small local ``.npz`` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np

from hematovision.data.classes import BLOODMNIST_CLASSES
from hematovision.errors import DatasetError
from hematovision.paths import hematovision_home

log = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
# MD5 of each release file, as published in MedMNIST's INFO table.
BLOODMNIST_MD5 = {
    28: "7053d0359d879ad8a5505303e11de1dc",
    64: "2b94928a2ae4916078ca51e05b6b800b",
    128: "adace1e0ed228fccda1f39692059dd4c",
    224: "b718ff6835fcbdb22ba9eacccd7b2601",
}
BLOODMNIST_COUNTS = {"train": 11959, "val": 1712, "test": 3421}


def bloodmnist_filename(size: int) -> str:
    return "bloodmnist.npz" if size == 28 else f"bloodmnist_{size}.npz"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_bloodmnist(size: int = 224, root: str | Path | None = None, force: bool = False) -> Path:
    """Download BloodMNIST at ``size`` px into ``root`` (default ``$HEMATOVISION_HOME/bloodmnist``).

    An existing file with the right MD5 is reused. The download goes to a ``.part`` file that
    is renamed only after its checksum matches.

    Raises:
        DatasetError: unknown size, network failure or checksum mismatch.
    """
    from tqdm.auto import tqdm

    if size not in BLOODMNIST_MD5:
        raise DatasetError(f"BloodMNIST comes in sizes {sorted(BLOODMNIST_MD5)}, not {size}")
    folder = Path(root) if root else hematovision_home() / "bloodmnist"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / bloodmnist_filename(size)
    expected = BLOODMNIST_MD5[size]
    if target.exists() and not force:
        if _md5(target) == expected:
            log.info("BloodMNIST already downloaded: %s", target)
            return target
        log.warning("%s has the wrong checksum; downloading again", target)
    url = f"{ZENODO_RECORD}/{target.name}?download=1"
    partial = target.with_suffix(".npz.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DatasetError(
            f"could not download {url} ({error}). Download it by hand and place it at {target}"
        ) from error
    actual = _md5(partial)
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"{url}: MD5 {actual} does not match the published {expected}; try again")
    os.replace(partial, target)
    return target


def load_bloodmnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a BloodMNIST ``.npz``: split → (images (N, S, S, 3) uint8, labels (N,) int)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"BloodMNIST file not found: {path}; run 'hematovision data fetch bloodmnist'")
    with np.load(path) as data:
        missing = [f"{split}_{kind}" for split in BLOODMNIST_COUNTS for kind in ("images", "labels")
                   if f"{split}_{kind}" not in data]
        if missing:
            raise DatasetError(f"{path} is not a MedMNIST file: arrays {missing} are missing")
        result = {}
        for split in BLOODMNIST_COUNTS:
            images = data[f"{split}_images"]
            if images.ndim == 3:
                images = np.repeat(images[..., None], 3, axis=3)
            result[split] = (images.astype(np.uint8), data[f"{split}_labels"].reshape(-1).astype(np.int64))
    return result


def export_bloodmnist(npz_path: str | Path, out_dir: str | Path) -> Path:
    """Write a BloodMNIST ``.npz`` as ``out_dir/<split>/<class>/<split>_<index>.png`` (skips files already there)."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(out_dir)
    for split, (images, labels) in load_bloodmnist(npz_path).items():
        for index, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels), desc=f"export {split}", unit="img")):
            target = out / split / BLOODMNIST_CLASSES[label] / f"{split}_{index:05d}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp.png")
                Image.fromarray(image).save(tmp)
                tmp.replace(target)
    return out
