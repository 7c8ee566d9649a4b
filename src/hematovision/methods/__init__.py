"""The published methods HematoVision reproduces: augmentations, pre-processing, benchmark.

``AUGMENTATIONS`` maps the transform names a recipe can ask for (``checkerboard``,
``rot_flip``, ``balance``) to their functions.
"""

from hematovision.methods.augment import AUGMENTATIONS, random_dihedral
from hematovision.methods.balance import balanced_indices
from hematovision.methods.checkerboard import checkerboard_augment, checkerboard_pair
from hematovision.methods.intensity import normalize_intensity

__all__ = ["AUGMENTATIONS", "balanced_indices", "checkerboard_augment", "checkerboard_pair",
           "normalize_intensity", "random_dihedral"]
