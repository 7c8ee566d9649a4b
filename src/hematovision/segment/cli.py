"""``hematovision segment`` (masks, U-Net training) and ``hematovision count`` (whole-field counts).

``segment`` has two forms on one parser, told apart by the first word::

    hematovision segment IMG1 IMG2 ... --method ekmeans|unet [--model UNET_RUN] --out DIR
    hematovision segment train --data DIR --out UNET_RUN [--mode 3class|binary] [--epochs N]

(argparse cannot put optional sub-actions beside free positional arguments, so ``train`` as
the first word selects training; a file literally named ``train`` can be given as ``./train``.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hematovision.errors import HematoVisionError

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``segment`` and ``count``."""
    segment = subparsers.add_parser(
        "segment",
        help="segment white cells into nucleus/cytoplasm (EK-means or U-Net), or train a U-Net",
        description=(
            "Two forms, told apart by the first word:\n\n"
            "  hematovision segment IMAGES... --method ekmeans|unet [--model UNET_RUN] --out DIR\n"
            "      writes <stem>_mask.png (0 background, 1 cytoplasm, 2 nucleus), <stem>_overlay.png, features.csv\n"
            "  hematovision segment train --data DIR --out UNET_RUN [--mode 3class|binary] [--epochs N]\n"
            "      trains a U-Net on a seeded split and reports Dice on the held-out images"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument("images", nargs="+", help="image files or folders, or the word 'train'")
    segment.add_argument("--out", type=Path, required=True, help="output folder (masks) or U-Net run folder (train)")
    masks = segment.add_argument_group("segmenting images")
    masks.add_argument("--method", choices=["ekmeans", "unet"], default="ekmeans", help="segmentation method")
    masks.add_argument("--model", type=Path, help="U-Net run folder (for --method unet)")
    masks.add_argument("--clusters", type=int, default=3, choices=[3, 4], help="EK-means colour clusters")
    masks.add_argument("--seed", type=int, default=0, help="random seed (EK-means FCM start; U-Net training)")
    train = segment.add_argument_group("training a U-Net (segment train ...)")
    train.add_argument("--data", type=Path, help="images/ + masks/ folder (Zheng layout) or a BCCD folder")
    train.add_argument("--mode", choices=["3class", "binary"], default="3class", help="nucleus/cytoplasm/background or cell/background")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--image-size", type=int, default=128, help="square input side (divisible by 16)")
    train.add_argument("--width", type=int, default=8, help="channels of the first U-Net block")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held-out images (seeded split)")
    train.add_argument("--val-fraction", type=float, default=0.1, help="images for choosing the best epoch")
    train.add_argument("--crop-to-cell", action="store_true", help="crop around the labelled cell (always on for BCCD)")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    segment.set_defaults(func=run_segment)

    count = subparsers.add_parser(
        "count", help="find, classify and count white cells (and count red cells and platelets) in smear fields"
    )
    count.add_argument("images", nargs="+", type=Path, help="field images or folders of them (one sample)")
    count.add_argument("--model", type=Path, help="classifier run folder; without it cells are counted, not typed")
    count.add_argument("--out", type=Path, required=True, help="output folder")
    count.add_argument("--rbc-diameter", type=float, default=100.0, help="red-cell diameter in pixels (BCCD 640x480: 100)")
    count.add_argument("--review-below", type=float, default=0.6, help="list cells whose top probability is below this")
    count.set_defaults(func=run_count)


def run_segment(args: argparse.Namespace) -> int:
    """Dispatch ``segment train ...`` or ``segment IMAGES ...``."""
    if args.images[0] == "train":
        if len(args.images) > 1:
            raise HematoVisionError(f"'segment train' takes no positional arguments, got {args.images[1:]}")
        return run_segment_train(args)
    return run_segment_images(args)


def run_segment_images(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from PIL import Image

    from hematovision._io import atomic_write
    from hematovision.data.images import ImageLoadError, load_rgb
    from hematovision.predict import collect_image_paths
    from hematovision.segment.ekmeans import segment_ekmeans
    from hematovision.segment.outputs import (
        overlay_labels,
        save_label_png,
        shape_features,
    )

    paths = collect_image_paths(args.images)
    if not paths:
        raise HematoVisionError("no image files given")
    if args.method == "unet":
        if args.model is None:
            raise HematoVisionError("--method unet needs --model UNET_RUN (train one with: hematovision segment train)")
        from hematovision.segment.unet import load_unet, predict_labels

        model, config = load_unet(args.model)

        def segment(image: np.ndarray) -> np.ndarray:
            return predict_labels(model, image, config)
    else:
        def segment(image: np.ndarray) -> np.ndarray:
            return segment_ekmeans(image, n_clusters=args.clusters, seed=args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], 0
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            print(f"skipped: {error}")
            rows.append({"image": str(path), "status": f"unreadable: {error}"})
            failures += 1
            continue
        labels = segment(image)
        stem = path.stem
        save_label_png(labels, args.out / f"{stem}_mask.png")
        overlay = overlay_labels(image, labels)
        atomic_write(args.out / f"{stem}_overlay.png", lambda tmp, o=overlay: Image.fromarray(o).save(tmp, format="PNG"))
        features = shape_features(labels)
        status = "ok" if features["cell_area"] else "no white cell found"
        print(f"{path.name}: {status}" + (f" (nucleus {features['nucleus_area']} px, cell {features['cell_area']} px)" if features["cell_area"] else ""))
        rows.append({"image": str(path), "status": status, "width": image.shape[1], "height": image.shape[0], **features})
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(args.out / "features.csv", write)
    print(f"wrote masks, overlays and features.csv for {len(rows) - failures} image(s) to {args.out}")
    return 0 if failures < len(paths) else 2


def run_segment_train(args: argparse.Namespace) -> int:
    from hematovision._io import write_json
    from hematovision.segment.masks import (
        BCCD_LEVELS,
        find_seg_samples,
        read_near_duplicates,
        split_seg_samples,
    )
    from hematovision.segment.metrics import evaluate_segmenter
    from hematovision.segment.unet import (
        UNetConfig,
        load_unet,
        predict_labels,
        train_unet,
    )

    if args.data is None:
        raise HematoVisionError("'segment train' needs --data DIR (images/ + masks/, or a BCCD folder)")
    samples = find_seg_samples(args.data)
    crop = args.crop_to_cell or samples[0].levels == BCCD_LEVELS
    # BCCD has near-duplicate frames (the same cells, shifted); they stay on one side of the split.
    split = split_seg_samples(samples, args.test_fraction, args.val_fraction, args.seed, read_near_duplicates(args.data))
    print(f"{len(samples)} image/mask pairs: {len(split['train'])} train, {len(split['val'])} val, "
          f"{len(split['test'])} test (seed {args.seed})" + (", cropped around the labelled cell" if crop else ""))
    config = UNetConfig(
        mode=args.mode, image_size=args.image_size, base_width=args.width, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, crop_to_cell=crop, threads=args.threads,
    )
    split_info = {name: [s.name for s in items] for name, items in split.items()}
    split_info["data"] = str(args.data)
    history = train_unet(split["train"], split["val"], args.out, config, split_info)
    model, config = load_unet(args.out)
    if split["test"]:
        # With crops, the crop comes from the ground truth as in training: segmentation given a detection.
        rows, summary = evaluate_segmenter(
            split["test"], lambda image: predict_labels(model, image, config), crop_to_cell=crop,
            binary=config.mode == "binary",
        )
        write_json(args.out / "test_metrics.json", {"split": "test", "images": len(rows), "summary": summary, "per_image": rows})
        keys = ["cell_dice", "cell_iou", "pixel_accuracy"] if args.mode == "binary" else [
            "nucleus_dice", "nucleus_iou", "cell_dice", "cell_iou", "pixel_accuracy"]
        print("held-out test: " + ", ".join(f"{k} {summary[k]['mean']:.4f}" for k in keys))
    print(f"best validation Dice {history['best_val_dice']:.4f} at epoch {history['best_epoch']}; run folder {args.out}")
    return 0


def run_count(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from PIL import Image

    from hematovision._io import atomic_write, write_json
    from hematovision.data.images import ImageLoadError, load_rgb
    from hematovision.predict import collect_image_paths
    from hematovision.segment.differential import CellRecord, write_differential
    from hematovision.segment.field import (
        WHITE_CELL_TYPES,
        FieldParams,
        analyze_field,
        crop_square,
        draw_field,
    )

    paths = collect_image_paths(args.images)
    if not paths:
        raise HematoVisionError("no image files given")
    if args.rbc_diameter <= 0:
        raise HematoVisionError(f"--rbc-diameter must be positive, got {args.rbc_diameter}")
    classifier = None
    if args.model is not None:
        from hematovision.infer.predictor import Predictor
        from hematovision.run import CARD_FILE

        if not (args.model / CARD_FILE).is_file():
            raise HematoVisionError(f"{args.model} is not a classifier run folder (no {CARD_FILE})")
        classifier = Predictor.from_run_dir(args.model)
    params = FieldParams(rbc_diameter=args.rbc_diameter)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, cells, empty = [], [], []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            print(f"skipped: {error}")
            rows.append({"image": str(path), "wbc": "", "rbc": "", "platelet": "", "types": "", "note": f"unreadable: {error}"})
            continue
        result = analyze_field(image, params, classifier)
        overlay = draw_field(image, result)
        atomic_write(args.out / f"{path.stem}_boxes.png", lambda tmp, o=overlay: Image.fromarray(o).save(tmp, format="PNG"))
        print(f"{path.name}: {result.message}")
        if not result.white_cells:
            empty.append(str(path))
        for index, cell in enumerate(result.white_cells, start=1):
            if cell.cell_type is None:
                continue
            ranked = sorted(cell.probabilities.items(), key=lambda item: -item[1])
            second = ranked[1] if len(ranked) > 1 else ("", 0.0)
            cells.append(CellRecord(
                image=str(path), index=index, box=cell.box.as_list(), cell_type=cell.cell_type,
                probability=float(cell.probability or 0.0), thumbnail=crop_square(image, cell.box),
                second_type=second[0], second_probability=float(second[1]),
            ))
        rows.append({
            "image": str(path), **result.counts,
            "types": ";".join(c.cell_type or "" for c in result.white_cells),
            "note": "" if result.white_cells else "no white cell found",
        })

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "wbc", "rbc", "platelet", "types", "note"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(args.out / "counts.csv", write)
    counted = [r for r in rows if r["wbc"] != ""]
    totals = {kind: int(np.sum([r[kind] for r in counted])) for kind in ("wbc", "rbc", "platelet")}
    summary = {"images": len(paths), "readable": len(counted), "totals": totals, "classified": len(cells)}
    if classifier is not None:
        types = [name for name in classifier.class_names if name in WHITE_CELL_TYPES] or list(classifier.class_names)
        write_differential(
            cells, types, args.out, title=f"Differential count ({len(counted)} images)",
            review_below=args.review_below, images_without_cells=empty,
        )
        print(f"differential of {len(cells)} white cells: {args.out / 'differential.md'}")
    else:
        print("no --model given: white cells were counted but not typed (no differential)")
    write_json(args.out / "summary.json", summary)
    print(f"totals over {len(counted)} image(s): {totals['wbc']} white cells, {totals['rbc']} red cells, {totals['platelet']} platelets")
    return 0 if counted else 2
