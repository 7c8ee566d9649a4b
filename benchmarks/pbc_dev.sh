#!/usr/bin/env bash
# Accuracy benchmark on ../shared/data/pbc_dev (8 classes), seeded stratified 70/15/15 split (seed 0).
# Frozen: ~10 min on 2 quiet cores. Fine-tune at 128 px, 10 epochs: ~30 min on 2 quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-../shared/data/pbc_dev}
.venv/bin/hematovision train --data "$data" --out runs/pbc_frozen --mode frozen --seed 0
.venv/bin/hematovision train --data "$data" --out runs/pbc_finetune128 --mode finetune --image-size 128 --epochs 10 --seed 0
# Cross-dataset check: the PBC model on BCCD's real crops (another lab, scanner and stain; 5 classes).
.venv/bin/hematovision evaluate runs/pbc_finetune128 --data ../shared/data/bccd_wbc_crops --out runs/pbc_finetune128/eval_bccd_crops
