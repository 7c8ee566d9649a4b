#!/usr/bin/env bash
# Accuracy benchmark on ../shared/data/pbc_dev (8 classes), seeded stratified 70/15/15 split (seed 0).
# Times on 2 quiet cores: frozen Lite0 ~5 min, frozen Lite0+Lite2 ~8 min, fine-tuning ~40 min per run.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-../shared/data/pbc_dev}
hv=.venv/bin/hematovision
$hv train --data "$data" --out runs/pbc_frozen --mode frozen --seed 0
$hv train --data "$data" --out runs/pbc_frozen2 --mode frozen --backbone efficientnet_lite0+efficientnet_lite2 --seed 0
$hv train --data "$data" --out runs/pbc_ft128_e24 --mode finetune --image-size 128 --epochs 24 --patience 8 --seed 0
# Test-time views: chosen on the validation split, then applied once to the test split.
for views in 4 8; do
    $hv evaluate runs/pbc_ft128_e24 --split val --tta $views --out runs/pbc_ft128_e24/eval_val_tta$views
done
$hv evaluate runs/pbc_ft128_e24 --split test --tta 8 --out runs/pbc_ft128_e24/eval_test_tta8
# The same recipe with augmentation for other labs and scanners.
$hv train --data "$data" --out runs/pbc_ft128_strong --mode finetune --image-size 128 --epochs 24 --patience 8 --strong-augment --seed 0
# Cross-dataset check: PBC models on BCCD's real crops (another lab, scanner and stain; 5 classes).
for run in pbc_frozen pbc_ft128_e24 pbc_ft128_strong; do
    $hv evaluate runs/$run --data ../shared/data/bccd_wbc_crops --out runs/$run/eval_bccd_crops
done
