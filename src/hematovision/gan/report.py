"""The five quality checks of per-class GANs against real held-out cells, as Markdown and plots.

Every check works in one feature space (the frozen ImageNet backbone of
:class:`hematovision.train.features.FeatureExtractor`) and at the GAN's resolution: real
images are resized to the GAN's size first, so a check measures what the GAN made, not the
gap between a 64-px and a 360-px picture.

1. a classifier trained on real training cells labels the synthetic ones;
2. a classifier trained only on synthetic cells labels the held-out real ones;
3. Fréchet distance synthetic→held-out beside real-train→held-out (the floor), same sizes;
4. memorisation: each synthetic cell's nearest real *training* cell, beside how near a
   genuinely new real cell (held-out) comes to the training set;
5. adding synthetic cells of the scarce classes to the training set: recall with and without.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hematovision._io import sha256_file, write_json, write_text
from hematovision.errors import HematoVisionError
from hematovision.gan import quality
from hematovision.gan.train import (
    CARD_FILE,
    CHECKPOINT,
    GanConfig,
    class_seed,
    find_class_runs,
    load_generator,
    sample_images,
    save_grid,
)
from hematovision.gan.train_projected import KIND, ProjectedGanConfig

log = logging.getLogger(__name__)

SCARCE_CLASSES = ("basophil", "lymphocyte", "monocyte")
FD_REPEATS = 10


def build_report(
    run_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    n_synthetic: int = 500,
    seed: int = 0,
    scarce_classes: tuple[str, ...] = SCARCE_CLASSES,
    extractor: Any | None = None,
    allow_unfinished: bool = False,
) -> Path:
    """Run the five checks and write ``report.md``, ``metrics.json`` and PNG figures into ``out_dir``.

    Args:
        run_dir: a ``hematovision gan train`` run folder (one sub-folder per class).
        split_csv: the split the GANs were trained with; ``train`` rows are the GANs' training
            images, ``test`` rows the held-out real images.
        out_dir: output folder.
        n_synthetic: synthetic images drawn per class.
        seed: sampling and resampling seed.
        scarce_classes: classes topped up with synthetic images in check 5.
        extractor: an object with ``extract(images (N, S, S, 3) uint8) -> (N, D)`` and a ``config``
            dict; default :class:`hematovision.train.features.FeatureExtractor` (EfficientNet-Lite0).
        allow_unfinished: report on the latest checkpoints of GANs still training (a preview).

    Returns:
        Path of ``report.md``.
    """
    from hematovision.data.folder import load_images
    from hematovision.data.splits import read_split_csv

    started = time.perf_counter()
    out_dir = Path(out_dir)
    runs = find_class_runs(run_dir)
    cards = {name: _card(path, allow_unfinished) for name, path in runs.items()}
    class_names = sorted(runs)
    size = int(next(iter(cards.values()))["config"]["size"])

    # Real features cover the whole split (cached once), then keep the classes that have a GAN.
    rows = read_split_csv(split_csv)
    real_train = load_images([s for s, part in rows if part == "train"], size, desc="real train")
    real_test = load_images([s for s, part in rows if part == "test"], size, desc="real held-out")
    index = {name: k for k, name in enumerate(class_names)}
    keep_train = np.array([s.label in index for s in real_train.samples], dtype=bool)
    keep_test = np.array([s.label in index for s in real_test.samples], dtype=bool)
    if not keep_train.any() or not keep_test.any():
        raise HematoVisionError(f"{split_csv} needs 'train' and 'test' rows for classes {class_names}")
    train_images = real_train.images[keep_train]
    train_names = [s.path.name for s, keep in zip(real_train.samples, keep_train) if keep]
    y_train = np.array([index[s.label] for s, keep in zip(real_train.samples, keep_train) if keep])
    y_test = np.array([index[s.label] for s, keep in zip(real_test.samples, keep_test) if keep])

    synthetic, y_syn = [], []
    for name in class_names:
        images = sample_images(load_generator(runs[name], name), n_synthetic, seed=class_seed(seed, name))
        synthetic.append(images)
        y_syn += [index[name]] * len(images)
    synthetic_images = np.concatenate(synthetic)
    y_syn = np.array(y_syn)

    if extractor is None:
        from hematovision.train.features import FeatureExtractor

        extractor = FeatureExtractor()
    # Real features depend only on the split and size; synthetic ones also on the generators.
    real_key = {"split": sha256_file(split_csv), "size": size}
    syn_key = {"n_synthetic": n_synthetic, "seed": seed, "size": size, "run_dir": str(Path(run_dir).resolve()),
               "generators": {n: cards[n]["iterations"] for n in class_names}}
    f_train = _features(out_dir, "real_train", real_train.images, real_key, extractor)[keep_train]
    f_test = _features(out_dir, "real_test", real_test.images, real_key, extractor)[keep_test]
    f_syn = _features(out_dir, "synthetic", synthetic_images, syn_key, extractor)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {
        "classes": class_names, "size": size, "n_synthetic_per_class": n_synthetic, "seed": seed,
        "split": str(split_csv), "feature_dim": int(f_train.shape[1]), "feature_config": json.loads(json.dumps(extractor.config)),
        "train_counts": _counts(y_train, class_names), "test_counts": _counts(y_test, class_names),
        "gan_kind": _kind(cards),
        "gan_training": {n: _training(cards[n], n) for n in class_names},
        # Through the config class so that runs saved before an option existed show its old value.
        "gan_config": _config(next(iter(cards.values()))),
    }

    # Check 1: real-trained probe labels the synthetic cells.
    probe_real = quality.fit_linear_probe(f_train, y_train, seed=seed)
    pred_syn = probe_real.predict(f_syn)
    pred_test_real = probe_real.predict(f_test)
    metrics["check1_real_to_synthetic"] = {
        "per_class": quality.summarise_recall(quality.per_class_recall(y_syn, pred_syn, len(class_names)), class_names),
        "overall": float(np.mean(pred_syn == y_syn)),
        "same_probe_on_heldout_real": quality.summarise_recall(
            quality.per_class_recall(y_test, pred_test_real, len(class_names)), class_names),
        "same_probe_on_heldout_real_overall": float(np.mean(pred_test_real == y_test)),
    }

    # Check 2: synthetic-only probe labels the held-out real cells.
    probe_syn = quality.fit_linear_probe(f_syn, y_syn, seed=seed)
    pred_test_syn = probe_syn.predict(f_test)
    metrics["check2_synthetic_to_real"] = {
        "accuracy": float(np.mean(pred_test_syn == y_test)),
        "balanced_accuracy": quality.balanced_accuracy(y_test, pred_test_syn, len(class_names)),
        "per_class": quality.summarise_recall(quality.per_class_recall(y_test, pred_test_syn, len(class_names)), class_names),
        "real_trained_accuracy": float(np.mean(pred_test_real == y_test)),
        "real_trained_balanced_accuracy": quality.balanced_accuracy(y_test, pred_test_real, len(class_names)),
    }

    # Check 3: Fréchet distances to each class's held-out cells, all candidate sets cut to its size.
    fd = {}
    for name in class_names:
        k = index[name]
        reference = f_test[y_test == k]
        m = len(reference)
        entry = {
            "n_reference": m,
            "real_train": quality.matched_frechet(reference, f_train[y_train == k], m, FD_REPEATS, seed).tolist(),
            "synthetic": quality.matched_frechet(reference, f_syn[y_syn == k], m, FD_REPEATS, seed).tolist(),
            "other_classes": {},
        }
        for other in class_names:
            if other != name and np.sum(y_train == index[other]) >= m:
                entry["other_classes"][other] = float(np.mean(
                    quality.matched_frechet(reference, f_train[y_train == index[other]], m, 3, seed)))
        fd[name] = entry
    metrics["check3_frechet"] = fd

    # Check 4: nearest real training cell of each synthetic cell, beside held-out real cells' nearest.
    memo, closest = {}, {}
    for name in class_names:
        k = index[name]
        train_idx = np.flatnonzero(y_train == k)
        syn_idx = np.flatnonzero(y_syn == k)
        nn_syn, d_syn = quality.nearest_neighbours(f_syn[syn_idx], f_train[train_idx])
        _, d_held = quality.nearest_neighbours(f_test[y_test == k], f_train[train_idx])
        d_train_loo = quality.leave_one_out_nearest(f_train[train_idx])
        p5 = float(np.percentile(d_held, 5))
        memo[name] = {
            "synthetic_median": float(np.median(d_syn)), "synthetic_min": float(d_syn.min()),
            "heldout_median": float(np.median(d_held)), "heldout_min": float(d_held.min()),
            "heldout_p5": p5, "train_leave_one_out_median": float(np.median(d_train_loo)),
            "synthetic_below_heldout_p5": float(np.mean(d_syn < p5)),
            "distances_synthetic": d_syn.tolist(), "distances_heldout": d_held.tolist(),
        }
        order = np.argsort(d_syn)[:6]
        closest[name] = [(synthetic_images[syn_idx[i]], train_images[train_idx[nn_syn[i]]], float(d_syn[i]),
                          train_names[train_idx[nn_syn[i]]]) for i in order]
    metrics["check4_memorisation"] = memo
    # Diversity: how different the synthetic cells of a class are from each other, against real cells.
    metrics["diversity"] = {
        name: {"synthetic": quality.mean_pairwise_distance(f_syn[y_syn == index[name]]),
               "real_train": quality.mean_pairwise_distance(f_train[y_train == index[name]])}
        for name in class_names
    }

    # Check 5: top the scarce classes up to the largest class with synthetic cells.
    scarce = [name for name in scarce_classes if name in index]
    largest = int(np.bincount(y_train).max())
    extra_x, extra_y, added = [], [], {}
    for name in scarce:
        k = index[name]
        need = min(largest - int(np.sum(y_train == k)), int(np.sum(y_syn == k)))
        added[name] = need
        extra_x.append(f_syn[y_syn == k][:need])
        extra_y += [k] * need
    probe_bal = quality.fit_linear_probe(f_train, y_train, class_weight="balanced", seed=seed)
    probe_aug = quality.fit_linear_probe(np.concatenate([f_train, *extra_x]), np.concatenate([y_train, extra_y]), seed=seed)
    predictions = {"real": pred_test_real, "real_balanced": probe_bal.predict(f_test),
                   "real_plus_synthetic": probe_aug.predict(f_test)}
    metrics["check5_augmentation"] = _augmentation_metrics(predictions, y_test, class_names, scarce, added, seed)

    metrics["report_seconds"] = round(time.perf_counter() - started, 1)
    _plots(out_dir, metrics, class_names, train_images, y_train, synthetic_images, y_syn, closest, seed)
    write_json(out_dir / "metrics.json", metrics)
    path = write_text(out_dir / "report.md", render_markdown(metrics))
    log.info("GAN quality report in %s (%.0f s)", out_dir, metrics["report_seconds"])
    return path


def _counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {name: int(np.sum(labels == k)) for k, name in enumerate(class_names)}


def _card(class_dir: Path, allow_unfinished: bool) -> dict:
    """A class's GAN card; for an unfinished run (if allowed) the same fields from its checkpoint."""
    import torch

    card_path = class_dir / CARD_FILE
    if card_path.exists():
        return json.loads(card_path.read_text())
    if not allow_unfinished:
        raise HematoVisionError(f"GAN training has not finished in {class_dir}; resume it first "
                                "(or preview with --allow-unfinished)")
    state = torch.load(class_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    return {"config": state["config"], "iterations": int(state["iteration"]), "train_seconds": float(state["seconds"]),
            "num_train_images": state.get("num_train_images"), "kind": state.get("kind", "dcgan")}


def _kind(cards: dict[str, dict]) -> str:
    """"projected" (one conditional generator for all classes) or "dcgan" (one per class)."""
    return str(next(iter(cards.values())).get("kind", "dcgan"))


def _training(card: dict, class_name: str) -> dict:
    """Iterations, training seconds and training images of one class's generator."""
    images = card["num_train_images"]
    return {"iterations": card["iterations"], "train_seconds": card["train_seconds"],
            "num_train_images": images[class_name] if isinstance(images, dict) else images}


def _config(card: dict) -> dict:
    if card.get("kind") == KIND:
        return asdict(ProjectedGanConfig.from_dict(card["config"]))
    return asdict(GanConfig.from_dict(card["config"]))


def _features(out_dir: Path, name: str, images: np.ndarray, key: dict, extractor: Any) -> np.ndarray:
    """Backbone features of one image set: (N, D), cached in ``out_dir/features_<name>.npz`` for re-runs."""
    # Compare through JSON so tuples and lists in the configs match.
    key = json.loads(json.dumps({**key, "count": len(images), "extractor": extractor.config}))
    cache = out_dir / f"features_{name}.npz"
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if json.loads(str(stored["key"])) == key:
            log.info("%s features loaded from %s", name, cache)
            return stored["features"]
    size = getattr(getattr(extractor, "prep", None), "image_size", None)
    if size and images.shape[1] != size:
        # The extractor takes arrays already at its input size: upsample the GAN-sized images.
        from hematovision.data.transforms import resize

        images = np.stack([resize(image, size) for image in images])
    features = extractor.extract(images, progress=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".features_{name}.tmp.npz"
    np.savez(tmp, key=json.dumps(key), features=features)
    tmp.replace(cache)
    return features


def _augmentation_metrics(predictions: dict[str, np.ndarray], y_test: np.ndarray, class_names: list[str],
                          scarce: list[str], added: dict[str, int], seed: int) -> dict:
    from sklearn.metrics import f1_score

    k = len(class_names)
    result: dict = {"synthetic_added": added, "variants": {}}
    for variant, pred in predictions.items():
        result["variants"][variant] = {
            "accuracy": float(np.mean(pred == y_test)),
            "balanced_accuracy": quality.balanced_accuracy(y_test, pred, k),
            "macro_f1": float(f1_score(y_test, pred, average="macro")),
            "recall": quality.summarise_recall(quality.per_class_recall(y_test, pred, k), class_names),
            "correct": {name: int(np.sum((pred == y_test) & (y_test == c))) for c, name in enumerate(class_names)},
        }
    result["delta_vs_real"] = {}
    for variant in ("real_balanced", "real_plus_synthetic"):
        result["delta_vs_real"][variant] = {
            name: quality.paired_bootstrap_recall_delta(y_test, predictions["real"], predictions[variant],
                                                        class_names.index(name), seed=seed)
            for name in class_names
        }
    return result


def _plots(out_dir: Path, metrics: dict, class_names: list[str], train_images: np.ndarray, y_train: np.ndarray,
           synthetic: np.ndarray, y_syn: np.ndarray, closest: dict, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Real (left) and synthetic (right) cells, one row per class.
    rng = np.random.default_rng(seed)
    tiles = []
    for k, _ in enumerate(class_names):
        members = np.flatnonzero(y_train == k)
        real_pick = rng.choice(members, min(6, len(members)), replace=False)
        syn_pick = np.flatnonzero(y_syn == k)[:6]
        tiles += [train_images[i] for i in real_pick] + [synthetic[i] for i in syn_pick]
    save_grid(np.stack(tiles), out_dir / "real_vs_synthetic.png", columns=12)

    fd = metrics["check3_frechet"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(class_names))
    for offset, key, label in ((-0.2, "real_train", "real train → held-out (floor)"), (0.2, "synthetic", "synthetic → held-out")):
        values = [np.mean(fd[n][key]) for n in class_names]
        errors = [np.std(fd[n][key]) for n in class_names]
        ax.bar(x + offset, values, 0.4, yerr=errors, label=label)
    others = [min(fd[n]["other_classes"].values()) if fd[n]["other_classes"] else np.nan for n in class_names]
    ax.scatter(x, others, marker="_", s=400, color="k", label="nearest other real class", zorder=3)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("Fréchet distance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "frechet.png", dpi=110)
    plt.close(fig)

    memo = metrics["check4_memorisation"]
    fig, axes = plt.subplots(1, len(class_names), figsize=(3 * len(class_names), 2.6), sharey=False)
    for ax, name in zip(np.atleast_1d(axes), class_names):
        bins = np.linspace(0, max(max(memo[name]["distances_synthetic"]), max(memo[name]["distances_heldout"])), 30)
        ax.hist(memo[name]["distances_heldout"], bins, alpha=0.6, density=True, label="held-out real")
        ax.hist(memo[name]["distances_synthetic"], bins, alpha=0.6, density=True, label="synthetic")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine distance to nearest train cell", fontsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "nearest_distances.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2 * len(class_names), 4, figsize=(4 * 0.95, 2 * len(class_names) * 1.0))
    for row, name in enumerate(class_names):
        for col in range(4):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            if col < len(closest[name]):
                syn, real, dist, _ = closest[name][col]
                top.imshow(syn)
                bottom.imshow(real)
                top.set_title(f"{dist:.3f}", fontsize=7)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * row, 0].set_ylabel(f"{name[:5]} syn", fontsize=7)
        axes[2 * row + 1, 0].set_ylabel("train", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(out_dir / "closest_pairs.png", dpi=80)
    plt.close(fig)

    aug = metrics["check5_augmentation"]["variants"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for offset, variant in zip((-0.27, 0.0, 0.27), aug):
        ax.bar(x + offset, [aug[variant]["recall"][n] for n in class_names], 0.27, label=variant.replace("_", " "))
    ax.set_xticks(x, class_names)
    ax.set_ylim(max(0.0, min(min(v["recall"].values()) for v in aug.values()) - 0.1), 1.0)
    ax.set_ylabel("recall on held-out real")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "augmentation_recall.png", dpi=110)
    plt.close(fig)


def _discriminator_text(config: dict) -> str:
    parts = ["spectral norm" if config["spectral_norm"] else "batch norm"]
    if config["minibatch_std"]:
        parts.append("minibatch std")
    parts.append(f"DiffAugment {config['augment']}" if config["augment"] else "no augmentation")
    return ", ".join(parts)


def _gan_text(metrics: dict) -> str:
    config = metrics["gan_config"]
    if metrics.get("gan_kind") == KIND:
        switches = [name for name, on in (("hierarchical z", config["hierarchical"]),
                                          ("minibatch std", config["minibatch_std"])) if on]
        weight = config.get("class_loss", 0.0)  # absent from runs trained before the option existed
        classifier = f"auxiliary classifier (weight {weight}), " if weight else ""
        return (f"one class-conditional generator (width {config['width']}, latent {config['latent_dim']}, "
                f"{', '.join(switches) or 'plain z'}), Projected-GAN discriminator on frozen EfficientNet-Lite"
                f"{config['variant']} stages, hinge loss, mode seeking {config['mode_seeking']}, "
                f"{classifier}batch "
                f"{config['batch_size']}, up to {config['iterations']} iterations (done: see table), Adam lr "
                f"{config['lr']}, EMA {config['ema']}, DiffAugment {config['augment'] or 'none'}")
    return (f"DCGAN width {config['width']}, latent {config['latent_dim']}, batch {config['batch_size']}, "
            f"up to {config['iterations']} iterations (done: see table), Adam lr {config['lr']}, β1 {config['beta1']}, "
            f"dropout {config['dropout']}, real label {config['real_label']}, "
            f"discriminator {_discriminator_text(config)}")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def render_markdown(metrics: dict) -> str:
    """The report as Markdown, from the ``metrics.json`` dictionary."""
    names = metrics["classes"]
    lines = [
        "### Setup",
        "",
        (f"- Split: `{Path(metrics['split']).name}`; GANs trained on the train part only; "
        "checks 2, 3 and 5 test on the held-out part."),
        (f"- Images at the GAN's resolution ({metrics['size']} px) for real and synthetic alike, then the frozen "
        f"backbone `{metrics['feature_config']['backbone']}` at {metrics['feature_config']['preprocessing']['image_size']} px "
        f"→ {metrics['feature_dim']}-d features."),
        f"- GAN: {_gan_text(metrics)}; {metrics['n_synthetic_per_class']} synthetic cells per class (seed {metrics['seed']}).",
        "",
        "| class | real train | real held-out | GAN iterations | GAN training time |",
        "|---|---:|---:|---:|---:|",
    ]
    shared = metrics.get("gan_kind") == KIND  # one generator for all classes: one training time
    total = 0.0
    for name in names:
        gan = metrics["gan_training"][name]
        total = gan["train_seconds"] if shared else total + gan["train_seconds"]
        time_text = "(shared)" if shared else f"{gan['train_seconds'] / 60:.1f} min"
        lines.append(f"| {name} | {metrics['train_counts'][name]} | {metrics['test_counts'][name]} | "
                     f"{gan['iterations']} | {time_text} |")
    lines += [(f"| **all** | {sum(metrics['train_counts'].values())} | {sum(metrics['test_counts'].values())} | | "
              f"**{total / 60:.1f} min** |"), ""]

    c1 = metrics["check1_real_to_synthetic"]
    lines += [
        "### 1. Real-trained classifier on synthetic cells",
        "",
        ("Logistic regression on real training features; the share of each class's synthetic cells it labels as "
        "that class, beside its recall on held-out real cells."),
        "",
        "| class | synthetic labelled as intended | held-out real recall (same classifier) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {_pct(c1['per_class'][n])} | {_pct(c1['same_probe_on_heldout_real'][n])} |" for n in names]
    lines += [f"| **all** | **{_pct(c1['overall'])}** | {_pct(c1['same_probe_on_heldout_real_overall'])} |", ""]

    c2 = metrics["check2_synthetic_to_real"]
    lines += [
        "### 2. Synthetic-trained classifier on held-out real cells",
        "",
        (f"Logistic regression on {metrics['n_synthetic_per_class']} synthetic cells per class only, tested on the "
        "held-out real cells, beside the same head trained on the real training cells."),
        "",
        "| trained on | accuracy | balanced accuracy | " + " | ".join(f"recall {n}" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
        f"| synthetic only | {_pct(c2['accuracy'])} | {_pct(c2['balanced_accuracy'])} | "
        + " | ".join(_pct(c2["per_class"][n]) for n in names) + " |",
        f"| real train | {_pct(c2['real_trained_accuracy'])} | {_pct(c2['real_trained_balanced_accuracy'])} | "
        + " | ".join(_pct(c1["same_probe_on_heldout_real"][n]) for n in names) + " |",
        "",
    ]

    fd = metrics["check3_frechet"]
    lines += [
        "### 3. Fréchet distance to held-out real cells",
        "",
        (f"Reference: each class's held-out real cells (m images). Each candidate set is cut to m images at random, "
        f"{FD_REPEATS} draws (mean ± sd). Floor: real training cells of the same class. For scale: the nearest "
        "*other* class's real cells."),
        "",
        "| class | m | real → held-out (floor) | synthetic → held-out | synthetic / floor | nearest other class |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for n in names:
        real, syn = np.array(fd[n]["real_train"]), np.array(fd[n]["synthetic"])
        other = min(fd[n]["other_classes"].items(), key=lambda item: item[1]) if fd[n]["other_classes"] else None
        other_text = f"{other[0]}: {other[1]:.1f}" if other else "–"
        lines.append(f"| {n} | {fd[n]['n_reference']} | {real.mean():.1f} ± {real.std():.1f} | "
                     f"{syn.mean():.1f} ± {syn.std():.1f} | {syn.mean() / real.mean():.2f} | {other_text} |")
    lines.append("")

    memo = metrics["check4_memorisation"]
    lines += [
        "### 4. Memorisation: nearest real training cell",
        "",
        ("Cosine distance in feature space from each synthetic cell to its nearest real training cell of the class, "
        "beside the same distance for held-out real cells (new real cells the GAN never saw). A GAN that copies "
        "its training set would put many synthetic cells below the held-out cells' 5th percentile."),
        "",
        ("| class | synthetic median | synthetic min | held-out median | held-out 5th pct | held-out min | "
        "synthetic below held-out 5th pct |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {memo[n]['synthetic_median']:.3f} | {memo[n]['synthetic_min']:.3f} | "
              f"{memo[n]['heldout_median']:.3f} | {memo[n]['heldout_p5']:.3f} | {memo[n]['heldout_min']:.3f} | "
              f"{_pct(memo[n]['synthetic_below_heldout_p5'])} |" for n in names]
    lines.append("")

    diversity = metrics.get("diversity")
    if diversity:
        lines += [
            "### Diversity: are the synthetic cells different from each other?",
            "",
            ("Mean cosine distance between all pairs of cells of a class, in the same feature space. A generator that "
            "has collapsed onto a few cells scores far below the real training cells."),
            "",
            "| class | synthetic | real train | synthetic / real |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {diversity[n]['synthetic']:.3f} | {diversity[n]['real_train']:.3f} | "
                  f"{diversity[n]['synthetic'] / diversity[n]['real_train']:.2f} |" for n in names]
        lines.append("")

    c5 = metrics["check5_augmentation"]
    variants = c5["variants"]
    lines += [
        "### 5. Does adding synthetic cells raise recall on the scarce classes?",
        "",
        "Same split, same head, same held-out test. *real*: real training cells; *real balanced*: the same with "
        "class weights inversely proportional to frequency (the free alternative); *real + synthetic*: real "
        "training cells plus synthetic cells of the scarce classes up to the largest class ("
        + ", ".join(f"+{count} {name}" for name, count in c5["synthetic_added"].items()) + ").",
        "",
        "| variant | accuracy | balanced accuracy | macro F1 | " + " | ".join(f"recall {n}" for n in names) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(names),
    ]
    for variant, values in variants.items():
        lines.append(f"| {variant.replace('_', ' ')} | {_pct(values['accuracy'])} | {_pct(values['balanced_accuracy'])} | "
                     f"{_pct(values['macro_f1'])} | " + " | ".join(_pct(values["recall"][n]) for n in names) + " |")
    lines += [
        "",
        ("Change in recall against *real*, with a 95% paired bootstrap interval over the held-out cells "
        "(intervals that include 0 are no evidence of a change):"),
        "",
        "| class | held-out | real balanced − real | real + synthetic − real |",
        "|---|---:|---:|---:|",
    ]
    for n in names:
        cells = []
        for variant in ("real_balanced", "real_plus_synthetic"):
            delta, low, high = c5["delta_vs_real"][variant][n]
            cells.append(f"{100 * delta:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]")
        lines.append(f"| {n} | {metrics['test_counts'][n]} | {cells[0]} | {cells[1]} |")
    lines.append("")
    return "\n".join(lines)
