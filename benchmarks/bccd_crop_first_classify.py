"""Benchmark: crop-first classification of ``bccd_wbc4_aug`` and the white cell's type in ``count``.

1. The classifier is trained on crop-first ``bccd_wbc4_aug`` TRAIN crops (``bccd_crop_first.py``),
   after removing every crop whose source frame (``provenance_sift.csv``) is one of the held-out
   CBC ``test`` frames of ``bccd/`` or a near-duplicate of one (``near_duplicate_pairs_sift.csv``);
   crops whose source is not known with confidence are removed too, so no held-out frame leaks in.
2. ``bccd_wbc4_aug`` TEST: every frame counts. A frame where no white cell was found is an error
   (predicted "no white cell found"), so the score is that of the whole crop-first path.
3. ``count``: the whole-field pipeline (the path of ``hematovision count``) runs on the 60 held-out
   BCCD frames with that classifier (``segmentation_bccd.py --model``); its agreement with
   ``labels.csv`` is the score.

    python benchmarks/bccd_crop_first_classify.py --crops runs/bccd_crops/crops --out runs/bccd_typing \
        --train-args "--mode finetune --image-size 128 --epochs 8 --patience 3 --seed 0"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("HEMATOVISION_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def held_out_frames(bccd: Path) -> set[str]:
    """The CBC test frames and every frame SIFT says is a near-duplicate of one."""
    test = {line.strip() + ".jpg" for line in (bccd / "ImageSets" / "CBC" / "test.txt").read_text().split()
            if line.strip()}
    with open(bccd / "near_duplicate_pairs_sift.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["image_a"] in test or row["image_b"] in test:
                test |= {row["image_a"], row["image_b"]}
    return test


def link_training_crops(crops: Path, provenance: Path, held_out: set[str], out: Path) -> tuple[int, int]:
    """Symlink the TRAIN crops that cannot come from a held-out frame; returns (kept, dropped)."""
    kept = dropped = 0
    with open(provenance, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] != "TRAIN":
                continue
            source = crops / "TRAIN" / row["class"] / row["file"]
            if not source.is_file():
                continue  # no white cell found in that frame
            if row["confident"] != "1" or row["source_original"] in held_out:
                dropped += 1
                continue
            target = out / row["class"] / row["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source.resolve())
            kept += 1
    return kept, dropped


def score_test(run: Path, crops: Path, wbc4: Path, out: Path, tta: int | None) -> dict:
    """Predict the TEST crops, then score every TEST frame (no crop = wrong) with scikit-learn."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    exe = Path(sys.executable).parent / "hematovision"
    predictions = out / f"test_predictions{'_tta' + str(tta) if tta else ''}.csv"
    subprocess.run([str(exe), "predict", str(run), str(crops / "TEST"), "--out", str(predictions),
                    *(["--tta", str(tta)] if tta else [])], check=True)
    with open(predictions, newline="") as handle:
        predicted = {(Path(r["file"]).parent.name, Path(r["file"]).name): r["label"] for r in csv.DictReader(handle)}
    truth, guess = [], []
    for folder in sorted(p for p in (wbc4 / "TEST").iterdir() if p.is_dir()):
        for image in sorted(folder.iterdir()):
            truth.append(folder.name.lower())
            guess.append(predicted.get((folder.name, image.name), "no white cell found"))
    classes = sorted(set(truth))
    return {"frames": len(truth), "no_white_cell_found": guess.count("no white cell found"),
            "views": tta or "the run's", "accuracy": accuracy_score(truth, guess),
            "balanced_accuracy": balanced_accuracy_score(truth, guess),
            "macro_f1": f1_score(truth, guess, labels=classes, average="macro")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=Path, required=True, help="crops folder of bccd_crop_first.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bccd", type=Path, default=SHARED / "bccd")
    parser.add_argument("--wbc4", type=Path, default=SHARED / "bccd_wbc4_aug")
    parser.add_argument("--train-args", default="--mode frozen --seed 0",
                        help="extra arguments for hematovision train")
    parser.add_argument("--test-tta", type=int, nargs="*", default=[8],
                        help="also score TEST with these test-time views (default 8)")
    args = parser.parse_args()

    held_out = held_out_frames(args.bccd)
    train_dir = args.out / "train_crops"
    kept, dropped = link_training_crops(args.crops, args.wbc4 / "provenance_sift.csv", held_out, train_dir)
    print(f"held-out frames (test + near-duplicates): {len(held_out)}; training crops kept {kept}, "
          f"dropped {dropped} (held-out or unknown source)", flush=True)
    run = args.out / "model"
    exe = Path(sys.executable).parent / "hematovision"
    if not (run / "model_card.json").is_file():
        subprocess.run([str(exe), "train", "--train-dir", str(train_dir), "--out", str(run),
                        "--group-csv", str(args.wbc4 / "provenance_sift.csv"), *args.train_args.split()],
                       check=True)
    results = {"training_crops": {"kept": kept, "dropped": dropped},
               "test": [score_test(run, args.crops, args.wbc4, args.out, tta) for tta in (None, *args.test_tta)]}
    for row in results["test"]:
        print(f"bccd_wbc4_aug TEST ({row['frames']} frames, {row['no_white_cell_found']} without a crop counted "
              f"wrong), views {row['views']}: accuracy {row['accuracy']:.4f}, balanced {row['balanced_accuracy']:.4f}, "
              f"macro-F1 {row['macro_f1']:.4f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    subprocess.run([sys.executable, str(HERE / "segmentation_bccd.py"), "--bccd", str(args.bccd),
                    "--out", str(args.out / "field"), "--split", "test", "--model", str(run), "--threads", "2"],
                   check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
