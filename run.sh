#!/usr/bin/env bash
# Main job: get a real dataset, train the default model (EfficientNet-Lite0, frozen ImageNet
# features + logistic-regression head), evaluate it on the held-out split and write the report.
#   pbc_dev from ../shared/data when present (offline); otherwise BloodMNIST is downloaded.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/venv.sh
out=${OUT:-runs/main}
data=${DATA:-}
if [ -z "$data" ]; then
    if [ -d ../shared/data/pbc_dev ]; then
        data=../shared/data/pbc_dev
    else
        export_dir=${HEMATOVISION_HOME:-$HOME/.cache/hematovision}/bloodmnist_128
        .venv/bin/hematovision data fetch bloodmnist --size 128 --export "$export_dir"
        data=$export_dir
    fi
fi
echo "dataset: $data"
.venv/bin/hematovision train --data "$data" --out "$out" --mode frozen --seed 0
echo
echo "== $out/report.md =="
cat "$out/report.md"
