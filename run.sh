#!/usr/bin/env bash
# Main job: get a real dataset, train the default model (frozen ImageNet features of
# EfficientNet-Lite0 and -Lite2 + a small MLP head: the best in-lab model that trains in minutes on
# a CPU), evaluate it on the held-out split and write the report. For another lab's images see
# benchmarks/recommended.sh and docs/labs.md.
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
.venv/bin/hematovision train --data "$data" --out "$out" --mode frozen \
    --backbone efficientnet_lite0+efficientnet_lite2 --head mlp --seed 0
echo
echo "== $out/report.md =="
cat "$out/report.md"
