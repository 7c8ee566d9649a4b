"""Stain robustness: stain normalisation to a reference and stain augmentation.

Not implemented yet (issue 12).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalize_stain(image: np.ndarray, reference: dict[str, Any]) -> np.ndarray:
    """Map ``image``'s stain onto the reference's."""
    raise NotImplementedError("stain normalisation is being implemented (issue 12)")
