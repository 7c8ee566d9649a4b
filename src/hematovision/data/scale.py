"""Scale normalisation: find the white cell in a crop and resample it to a canonical diameter.

Another lab's microscope and camera show a white cell at another size in pixels (BCCD's cells are
about 3x larger than PBC's). Like cellpose's size model, the image is rescaled so that the cell
has one diameter, as a fraction of the network's input, before the network sees it.
"""

from __future__ import annotations

import numpy as np


def rescale_to_cell(image: np.ndarray, cell_scale: float) -> np.ndarray:
    """Crop or pad ``image`` around its white cell so the cell's diameter is ``cell_scale`` of the side.

    Not implemented yet: returns the image unchanged.
    """
    raise NotImplementedError("scale normalisation is being implemented (issue 12)")
