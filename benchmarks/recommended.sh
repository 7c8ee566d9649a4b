#!/usr/bin/env bash
# The recommended model for images from other labs, trained from ../shared/data into OUT_DIR.
#   bash benchmarks/recommended.sh OUT_DIR
# Frozen EfficientNet-Lite0 features on every labelled lab here (PBC, BCCD crops, Zheng dataset 1),
# the five white-cell classes, scale normalisation (each white cell resampled to 0.38 of the input,
# PBC's own median), Reinhard stain normalisation to the training labs, per-lab standardisation
# (each lab's features standardised on its own class-balanced statistics; `evaluate` standardises a
# new lab's folder on its own cells when the lab-shift score warns) and the morphology expert (each
# cell's measured nucleus share, lobes, hues and graininess: a small head fused with the network's
# on another lab's cells), plus the network `adapt --data` fine-tunes a new lab's cells from: the
# backbone's last stages fine-tuned on the training cells (--few-shot-start, ~12 min), so few-shot
# adaptation starts from white-cell features rather than ImageNet's. Then, for a new lab:
#   hematovision evaluate OUT_DIR --data LAB                       # zero-shot
#   hematovision adapt OUT_DIR --data K_CELLS --out ADAPTED        # k labelled cells per class
#   hematovision evaluate ADAPTED --data REST_OF_LAB
# See docs/labs.md for what it reaches (and misses).
set -euo pipefail
out=${1:?usage: bash benchmarks/recommended.sh OUT_DIR}
cd "$(dirname "$0")/.."
bash scripts/venv.sh
data=${SHARED_DATA:-../shared/data}
for lab in pbc_dev bccd_wbc_crops wbc_seg_zheng/dataset1; do
    [ -d "$data/$lab" ] || { echo "recommended.sh: $data/$lab is missing; it needs the labelled labs of ../shared/data" >&2; exit 2; }
done
export OMP_WAIT_POLICY=PASSIVE
start=$(date +%s)
.venv/bin/hematovision train --data "$data/pbc_dev" --data "$data/bccd_wbc_crops" --data "$data/wbc_seg_zheng/dataset1" \
    --classes basophil,eosinophil,lymphocyte,monocyte,neutrophil --mode frozen --cell-scale 0.38 --stain-norm reinhard \
    --lab-standardise --morphology --few-shot-start --seed 0 --out "$out"
# The review policy (confidence and out-of-distribution thresholds, calibrated on the validation
# split): `evaluate` reports what it flags, and `adapt` recalibrates it on a new lab's cells.
.venv/bin/hematovision export "$out" --format none
echo "recommended model in $out ($(( ($(date +%s) - start) / 60 )) min); report: $out/report.md"
