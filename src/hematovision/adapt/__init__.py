"""``hematovision adapt``: fit a trained run to another lab's microscope, camera and stain.

* :mod:`~hematovision.adapt.cells`: the lab's cells (unlabelled folder or class folders), checked.
* :mod:`~hematovision.adapt.normalise`: label-free adaptation: a frozen run's feature
  standardisation or a fine-tuned run's batch-norm statistics re-estimated on the lab's cells
  (optionally entropy minimisation).
* :mod:`~hematovision.adapt.head`: few-shot adaptation: the final layer refitted on k labelled
  cells per class, pulled towards the source head, chosen, calibrated and thresholded by
  cross-validation on the lab's own cells.
* :mod:`~hematovision.adapt.command`: the command: the new run folder, its card and the guards.
"""
