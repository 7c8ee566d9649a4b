"""Canonical white-cell class names, whatever a dataset's folders call them."""

from __future__ import annotations

import re

# Folder spellings seen in PBC, the Kaggle BCCD sets, BloodMNIST and Zheng et al.
_ALIASES = {
    "neutrophil": "neutrophil", "neutrophils": "neutrophil", "neu": "neutrophil",
    "sne": "neutrophil", "bne": "neutrophil", "segmented_neutrophil": "neutrophil",
    "eosinophil": "eosinophil", "eosinophils": "eosinophil", "eos": "eosinophil", "eo": "eosinophil",
    "basophil": "basophil", "basophils": "basophil", "bas": "basophil", "ba": "basophil",
    "lymphocyte": "lymphocyte", "lymphocytes": "lymphocyte", "lym": "lymphocyte", "ly": "lymphocyte",
    "monocyte": "monocyte", "monocytes": "monocyte", "mon": "monocyte", "mo": "monocyte",
    "ig": "ig", "immature_granulocyte": "ig", "immature_granulocytes": "ig",
    "immature_granulocytes_(myelocytes,_metamyelocytes_and_promyelocytes)": "ig",
    "erythroblast": "erythroblast", "erythroblasts": "erythroblast", "erb": "erythroblast",
    "platelet": "platelet", "platelets": "platelet", "thrombocyte": "platelet", "plt": "platelet",
}

# BloodMNIST's label order (MedMNIST v2 'info' for bloodmnist).
BLOODMNIST_CLASSES = (
    "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
)

# Zheng et al. 2018, Dataset 1 ("Class Labels of Dataset 1.csv", columns "image ID", "class label"):
# the source README's codes. data/sources.py applies them only to a table with those two columns.
ZHENG_CODES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}

# The five white-cell types of a manual differential count.
WBC5 = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

DISPLAY_NAMES = {
    "ig": "immature granulocyte",
}


def normalize_class_name(name: str) -> str:
    """Map a folder or label spelling to a canonical lower-case class name.

    >>> normalize_class_name("NEUTROPHIL"), normalize_class_name("Immature Granulocytes")
    ('neutrophil', 'ig')

    Unknown names are lower-cased with spaces and dashes turned into underscores.
    """
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _ALIASES.get(key, key)


def display_name(name: str) -> str:
    """A human-readable class name for reports."""
    return DISPLAY_NAMES.get(name, name)
