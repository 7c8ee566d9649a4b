"""Segmentation and counting: EK-means and U-Net masks, whole-field WBC finding, cell counts.

Modules (imported on use, so the CLI stays fast):

* :mod:`~hematovision.segment.masks` — image/mask datasets, mask quantisation, held-out split;
* :mod:`~hematovision.segment.fcm`, :mod:`~hematovision.segment.kmeans`,
  :mod:`~hematovision.segment.ekmeans` — fuzzy c-means, k-means and EK-means segmentation;
* :mod:`~hematovision.segment.unet` — a small U-Net, its training loop and run folders;
* :mod:`~hematovision.segment.metrics` — Dice, IoU, pixel accuracy;
* :mod:`~hematovision.segment.field` — finding and counting cells in a whole smear field;
* :mod:`~hematovision.segment.nuclei` — the white-cell finder that adapts to each lab's tint, stain and magnification;
* :mod:`~hematovision.segment.detection` — scoring a finder against YOLO boxes (F1, exact counts);
* :mod:`~hematovision.segment.crops` — crop-first datasets (each frame's white cell);
* :mod:`~hematovision.segment.differential` — the differential count report;
* :mod:`~hematovision.segment.files` — segmenting image files (``hematovision segment``);
* :mod:`~hematovision.segment.training` — a U-Net from a mask dataset (``hematovision segment train``);
* :mod:`~hematovision.segment.count` — counting a sample's fields (``hematovision count``).
"""
