#!/usr/bin/env bash
# The papers' dataset (Kaggle dataset2-master): train on TRAIN, report TEST and TEST_SIMPLE separately.
# Validation is carved from TRAIN grouped by source frame (provenance_sift.csv), so augmented
# copies of one cell never sit on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${DATA:-../shared/data/bccd_wbc4_aug}
.venv/bin/hematovision train --train-dir "$root/TRAIN" --out runs/bccd4_frozen --mode frozen \
    --group-csv "$root/provenance_sift.csv" --seed 0
for split in TEST TEST_SIMPLE; do
    .venv/bin/hematovision evaluate runs/bccd4_frozen --data "$root/$split" --out "runs/bccd4_frozen/eval_$split"
done
