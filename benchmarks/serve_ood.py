"""How well do the app's review flags reject images that are not blood cells?

Builds a small frozen-feature classifier (EfficientNet-Lite0 ImageNet features + a logistic
head, temperature-scaled on val) on a seeded, stratified, grouped split of
``../shared/data/pbc_dev``, then runs the same calibration as ``hematovision export``
(:func:`hematovision.export.calibrate.calibrate`): the OOD model is fitted on train, both
thresholds on val, and everything is measured on the held-out test split and on photos that
are not blood cells (scikit-image's sample images and crops of them). As a harder case it
also reports how often cells from another lab and stain (``../shared/data/bccd_wbc_crops``)
are flagged.

With ``--model RUN_DIR`` it evaluates a trained run instead (its own split), which is what
``hematovision export RUN_DIR`` writes to ``RUN_DIR/serving.json``.

Usage:
    python benchmarks/serve_ood.py [--per-class 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def cached(forward):
    """Memoise a (N, S, S, 3) → (logits, features) function per image, so calibration's passes reuse work."""
    memory: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = [hashlib.sha1(image.tobytes()).digest() for image in images]
        todo = [i for i, key in enumerate(keys) if key not in memory]
        if todo:
            logits, features = forward(images[todo])
            for j, i in enumerate(todo):
                memory[keys[i]] = (logits[j], features[j])
        return np.stack([memory[k][0] for k in keys]), np.stack([memory[k][1] for k in keys])

    return run


def build_frozen_run(per_class: int, seed: int, threads: int) -> tuple[SimpleNamespace, Path, dict]:
    from sklearn.linear_model import LogisticRegression

    from hematovision.data.folder import label_indices, load_images, scan_image_folder
    from hematovision.data.splits import (
        content_groups,
        train_val_test_split,
        write_split_csv,
    )
    from hematovision.data.transforms import Preprocessing
    from hematovision.evaluate.metrics import softmax
    from hematovision.infer.runtime import torch_forward
    from hematovision.models import create_model, get_model_info
    from hematovision.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None or not (shared / "pbc_dev").is_dir():
        raise SystemExit("../shared/data/pbc_dev not present")
    folder = scan_image_folder(shared / "pbc_dev")
    rng = np.random.default_rng(seed)
    samples = []
    for name in folder.class_names:
        members = [s for s in folder.samples if s.label == name]
        samples += [members[i] for i in sorted(rng.choice(len(members), min(per_class, len(members)), replace=False))]
    parts = train_val_test_split([s.label for s in samples], content_groups(samples), seed=seed)
    run = Path(tempfile.mkdtemp(prefix="hv-ood-run-"))
    write_split_csv(run / "split.csv", samples, parts, content_groups(samples))

    info = get_model_info("efficientnet_lite0")
    prep = Preprocessing(info.input_size, info.mean, info.std)
    torch.set_num_threads(threads)
    model = create_model("efficientnet_lite0", len(folder.class_names), pretrained=True).eval()
    forward = cached(torch_forward(model, prep))
    by_part = {part: [s for s, p in zip(samples, parts) if p == part] for part in ("train", "val", "test")}
    loaded = {part: load_images(items, prep.image_size, desc=f"{part} images") for part, items in by_part.items()}
    from hematovision.export.calibrate import batched_forward

    outputs = {part: batched_forward(forward, data.images, desc=f"{part} features") for part, data in loaded.items()}
    labels = {part: label_indices(data.samples, folder.class_names) for part, data in loaded.items()}
    head = LogisticRegression(max_iter=3000, C=0.5).fit(outputs["train"][1], labels["train"])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.as_tensor(head.coef_, dtype=torch.float32))
        model.classifier.bias.copy_(torch.as_tensor(head.intercept_, dtype=torch.float32))
    val_logits = outputs["val"][1] @ head.coef_.T + head.intercept_
    # Temperature scaling on val (Guo et al. 2017): the T that minimises the negative log-likelihood.
    grid = np.exp(np.linspace(np.log(0.2), np.log(5), 60))
    nll = [-np.log(softmax(val_logits, t)[np.arange(len(val_logits)), labels["val"]] + 1e-12).mean() for t in grid]
    temperature = float(grid[int(np.argmin(nll))])
    predictor = SimpleNamespace(class_names=folder.class_names, prep=prep, model=model, temperature=temperature,
                                card={"backbone": "efficientnet_lite0", "mode": "frozen (benchmark)"})
    weight, bias = head.coef_.T.astype(np.float32), head.intercept_.astype(np.float32)

    def forward_fn(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The backbone is frozen, so cached features stay valid; the new head is applied to them.
        _, features = forward(images)
        return features @ weight + bias, features

    setup = {"data": f"pbc_dev, {per_class} per class, seeded grouped stratified split (seed {seed})",
             "split_sizes": {part: len(items) for part, items in by_part.items()}, "temperature": temperature}
    return SimpleNamespace(predictor=predictor, forward=forward_fn), run, setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="evaluate this trained run instead of building a frozen one")
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-accuracy", type=float, default=0.99)
    parser.add_argument("--ood-quantile", type=float, default=0.95)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from hematovision.data.folder import load_images
    from hematovision.export.calibrate import batched_forward, calibrate, read_run_split
    from hematovision.infer.runtime import torch_forward
    from hematovision.paths import shared_data_dir

    if args.model:
        from hematovision.infer.predictor import Predictor

        torch.set_num_threads(args.threads)
        predictor = Predictor.from_run_dir(args.model)
        run, forward = Path(args.model), cached(torch_forward(predictor.model.eval(), predictor.prep))
        setup = {"data": f"the run's own split ({args.model})"}
    else:
        built, run, setup = build_frozen_run(args.per_class, args.seed, args.threads)
        predictor, forward = built.predictor, built.forward
    policy = calibrate(forward, predictor.class_names, predictor.prep, read_run_split(run),
                       predictor.temperature, args.target_accuracy, args.ood_quantile)
    result = {"setup": setup, **policy.describe()}

    shared = shared_data_dir()
    other_lab = shared / "bccd_wbc_crops" if shared else None
    if other_lab is not None and other_lab.is_dir():
        from hematovision.data.folder import scan_image_folder

        crops = load_images(scan_image_folder(other_lab).samples, predictor.prep.image_size, desc="bccd crops").images
        _, features = batched_forward(forward, crops, desc="bccd features")
        scores = policy.ood_scores(features)
        result["other_lab_cells"] = {"source": "bccd_wbc_crops (another lab, stain and camera)",
                                     "count": len(crops),
                                     "flagged_ood": float((scores > policy.ood_threshold).mean())}

    evaluation = result["evaluation"]
    photos = evaluation["non_cell_photos"]
    print(f"\n{setup['data']}; review policy: confidence < {policy.confidence_threshold:.3f} "
          f"or OOD score > {policy.ood_threshold:.2f}\n")
    print("| held-out set | images | flagged for review | note |")
    print("|---|---:|---:|---|")
    print(f"| {evaluation['split']} cells | {evaluation['split'].split('(')[1].split()[0]} | "
          f"{100 * evaluation['flagged']:.1f}% | accuracy {100 * evaluation['accuracy']:.1f}% overall, "
          f"{100 * evaluation['accuracy_unflagged']:.1f}% unflagged; {100 * evaluation['errors_caught']:.0f}% of "
          f"errors flagged; {100 * evaluation['flagged_low_confidence']:.1f}% low confidence, "
          f"{100 * evaluation['flagged_ood']:.1f}% OOD |")
    print(f"| non-cell photos | {photos['count']} | {100 * photos['flagged']:.1f}% | "
          f"{100 * photos['flagged_ood']:.1f}% by the OOD score alone |")
    if "other_lab_cells" in result:
        other = result["other_lab_cells"]
        print(f"| cells from another lab (BCCD) | {other['count']} | — | {100 * other['flagged_ood']:.1f}% flagged "
              f"by the OOD score |")
    print(f"\nAUROC, test cells vs non-cell photos: Mahalanobis {photos['auroc_mahalanobis']:.3f}, "
          f"energy {photos['auroc_energy']:.3f}, max-softmax {photos['auroc_max_softmax']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
