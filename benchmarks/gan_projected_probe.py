"""Sweep harness of the class-conditional projected GAN (``hematovision gan train --arch projected``):
one variant per call, trained by gan.train_projected on pbc_dev's five WBC classes at 64 px and
checked every N iterations (issue 15).

The generator and discriminator are gan.projected's. Here each anti-collapse switch is off unless
given (in the product they are on): ``--z-blocks`` (BigGAN's hierarchical latent: a slice of z, with
the class embedding, sets every block's batch-norm gain and bias), ``--mode-seeking W`` (Mao et al.
2019: two latents of the same class must give images as different as the latents are) and
``--minibatch-std`` (each head sees the spread of its batch).

Checked every ``--eval-every`` iterations on 500 cells per class, in two feature spaces:
- frozen ImageNet Lite0 (the space of docs/synthetic.md's checks): check 1, a real-trained linear
  probe labels the synthetic cells; check 2, a synthetic-trained probe on the held-out real cells;
  check 3, the Frechet distance to the held-out cells over the real-vs-real floor, per class;
- a W-Net trained from scratch on the real 64-px training cells (no ImageNet; the W-Net paper's own
  check), at the end only: the same checks 1 and 2.
Plus the spread (per-pixel std across 64 samples of a class; real cells 0.10).

Results (docs/synthetic.md, "A class-conditional Projected GAN"): mode seeking ends the collapse;
all three switches, 5,000 iterations, 78.6 min on 2 CPU cores: check 1 50.2% (W-Net 64.6%), check 2
0.55 (W-Net 0.63), Frechet distance 3.4-5.9x the floor.

    python benchmarks/gan_pbc.py --out runs/gan_pbc64 --step split   # OUT/split.csv (the doc's split)
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --out runs/gan_probe_D \\
        --z-blocks --mode-seeking 1 --minibatch-std --iterations 5000 --eval-every 2500 --device cpu
    # cells as arrays, for a machine without the data (then --arrays instead of --split):
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --save-arrays cells64.npz.xz
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hematovision.data.classes import WBC5
from hematovision.gan.projected import ConditionalGenerator
from hematovision.gan.train import images_to_tensor, random_dihedral, tensor_to_images
from hematovision.gan.train_projected import ProjectedGanConfig, load_projected, train_projected_gan


@torch.no_grad()
def synthetic_cells(generator: ConditionalGenerator, device, per_class: int = 500,
                    seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` uint8 cells of each class, and their labels."""
    source = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(len(WBC5)):
        z = torch.randn(per_class, generator.latent_dim, generator=source).to(device)
        drawn = torch.cat([generator(part, torch.full((len(part),), k, device=device)) for part in z.split(250)])
        images.append(tensor_to_images(drawn.cpu()))
        labels += [k] * per_class
    return np.concatenate(images), np.array(labels)


@torch.inference_mode()
def lite0_features(extractor, images: np.ndarray, device) -> np.ndarray:
    """The checks' frozen Lite0 features (FeatureExtractor's preprocessing), on ``device``."""
    from hematovision.data.transforms import normalize, resize

    module = extractor.module.to(device)
    size = extractor.prep.image_size
    out = []
    for start in range(0, len(images), 250):
        batch = np.stack([resize(image, size) for image in images[start: start + 250]])
        out.append(module(normalize(batch, extractor.prep).to(device)).float().cpu().numpy())
    return np.concatenate(out)


def spread(images: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per class: per-pixel std (pixels in [0, 1]) across its first 64 images, averaged over pixels."""
    return [float((images[labels == k][:64] / 255.0).std(0).mean()) for k in range(len(WBC5))]


def lite0_checks(data, synthetic, y_syn) -> dict:
    """Checks 1-3 of docs/synthetic.md in the frozen Lite0 space (3 draws of the Frechet distance)."""
    from hematovision.gan.quality import balanced_accuracy, fit_linear_probe, matched_frechet

    f_syn = lite0_features(data["extractor"], synthetic, data["device"])
    f_train, f_test, y_train, y_test = data["f_train"], data["f_test"], data["y_train"], data["y_test"]
    labelled = data["probe"].predict(f_syn)
    recognised = [float((labelled[y_syn == k] == k).mean()) for k in range(len(WBC5))]
    ratios = []
    for k in range(len(WBC5)):
        reference = f_test[y_test == k]
        m = len(reference)
        floor = matched_frechet(reference, f_train[y_train == k], m, 3, 0).mean()
        ratios.append(float(matched_frechet(reference, f_syn[y_syn == k], m, 3, 0).mean() / floor))
    return {"check1": float(np.mean(recognised)), "check1_per_class": dict(zip(WBC5, recognised)),
            "check2_balanced_accuracy": balanced_accuracy(y_test, fit_linear_probe(f_syn, y_syn).predict(f_test), len(WBC5)),
            "check3_fd_over_floor": dict(zip(WBC5, ratios))}


def train_wnet(images: np.ndarray, labels: np.ndarray, device, epochs: int, seed: int = 0) -> nn.Module:
    """A W-Net (models.papers) trained from scratch on 64-px cells, dihedral augmentation, Adam."""
    from hematovision.models.papers import WNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = WNet(len(WBC5), input_size=64, dropout=0.3).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = images_to_tensor(images), torch.from_numpy(labels)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(x)).split(64):
            logits = net(random_dihedral(x[batch].to(device), rng))
            loss = F.cross_entropy(logits, y[batch].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def wnet_predict(net: nn.Module, images: np.ndarray, device) -> np.ndarray:
    x = images_to_tensor(images)
    return torch.cat([net(part.to(device)).argmax(1).cpu() for part in x.split(500)]).numpy()


def wnet_checks(data, synthetic, y_syn) -> dict:
    """Checks 1 and 2 with a from-scratch W-Net instead of ImageNet features."""
    from hematovision.gan.quality import balanced_accuracy

    device = data["device"]
    if "wnet" not in data:
        data["wnet"] = train_wnet(data["x_train"], data["y_train"], device, data["wnet_epochs"])
        data["wnet_real_test"] = balanced_accuracy(data["y_test"], wnet_predict(data["wnet"], data["x_test"], device), len(WBC5))
    labelled = wnet_predict(data["wnet"], synthetic, device)
    recognised = [float((labelled[y_syn == k] == k).mean()) for k in range(len(WBC5))]
    synthetic_net = train_wnet(synthetic, y_syn, device, data["wnet_epochs"])
    synthetic_trained = wnet_predict(synthetic_net, data["x_test"], device)
    return {"wnet_real_trained_on_real_test": data["wnet_real_test"], "wnet_check1": float(np.mean(recognised)),
            "wnet_check1_per_class": dict(zip(WBC5, recognised)),
            "wnet_check2_balanced_accuracy": balanced_accuracy(data["y_test"], synthetic_trained, len(WBC5))}


def load_cells(args) -> dict:
    """64-px train and held-out cells with labels, from the split CSV or from ``--arrays``."""
    if args.arrays:
        raw = args.arrays.read_bytes()
        stored = np.load(io.BytesIO(lzma.decompress(raw) if args.arrays.suffix == ".xz" else raw))
        return {key: stored[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    from hematovision.data.folder import load_images
    from hematovision.data.splits import read_split_csv

    rows = read_split_csv(args.split)
    cells = {}
    for part, name in (("train", "train"), ("test", "test")):
        loaded = load_images([s for s, p in rows if p == part], 64, desc=part)
        cells[f"x_{name}"] = loaded.images
        cells[f"y_{name}"] = np.array([list(WBC5).index(s.label) for s in loaded.samples])
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="split CSV with train and test rows (benchmarks/gan_pbc.py)")
    source.add_argument("--arrays", type=Path, help="the cells as written by --save-arrays")
    parser.add_argument("--save-arrays", type=Path, help="write the 64-px cells of --split to this .npz and stop")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=0, help="check the EMA generator every N iterations")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", type=int, default=1, help="EfficientNet-Lite variant of the discriminator")
    parser.add_argument("--ema", type=float, default=0.99, help="decay of the generator's weight average")
    parser.add_argument("--z-blocks", action="store_true", help="a slice of z into every generator block")
    parser.add_argument("--mode-seeking", type=float, default=0.0, help="weight of the mode-seeking term")
    parser.add_argument("--minibatch-std", action="store_true", help="minibatch std channel in each head")
    parser.add_argument("--class-loss", type=float, default=0.0,
                        help="weight of the auxiliary classifier's loss on generated cells (AC-GAN; 0: off)")
    parser.add_argument("--width", type=int, default=32, help="generator channels: 8w at 4-8 px down to w at 64 px")
    parser.add_argument("--no-wnet", action="store_true", help="skip the W-Net checks at the end")
    parser.add_argument("--wnet-epochs", type=int, default=40, help="epochs of each W-Net of the checks")
    parser.add_argument("--time-only", action="store_true", help="train and report the speed, no checks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cells = load_cells(args)
    if args.save_arrays:  # .npz, or .npz.xz (smaller, to carry to another machine)
        buffer = io.BytesIO()
        np.savez(buffer, **cells)
        packed = lzma.compress(buffer.getvalue(), preset=9) if args.save_arrays.suffix == ".xz" else buffer.getvalue()
        args.save_arrays.write_bytes(packed)
        return
    if args.out is None:
        parser.error("--out is needed to train")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = ProjectedGanConfig(width=args.width, batch_size=args.batch, iterations=args.iterations, ema=args.ema,
                                variant=args.variant, minibatch_std=args.minibatch_std, mode_seeking=args.mode_seeking,
                                class_loss=args.class_loss,
                                hierarchical=args.z_blocks, seed=args.seed, sample_every=500, checkpoint_every=500)
    images_by_class = {name: cells["x_train"][cells["y_train"] == k] for k, name in enumerate(WBC5)}

    def train_to(iterations: int) -> dict:
        """The package's trainer (gan.train_projected), resumed up to ``iterations``."""
        return train_projected_gan(images_by_class, args.out / "gan", replace(config, iterations=iterations),
                                   resume=True, device=device)

    if args.time_only:
        card = train_to(args.iterations)
        print(json.dumps({"iterations": card["iterations"], "seconds_per_iteration": card["seconds_per_iteration"]}))
        return

    from PIL import Image

    from hematovision.gan.quality import fit_linear_probe
    from hematovision.train.features import FeatureExtractor

    extractor = FeatureExtractor()
    data = {"device": device, "extractor": extractor, "wnet_epochs": args.wnet_epochs,
            "x_train": cells["x_train"], "x_test": cells["x_test"], "y_train": cells["y_train"], "y_test": cells["y_test"],
            "f_train": lite0_features(extractor, cells["x_train"], device),
            "f_test": lite0_features(extractor, cells["x_test"], device)}
    data["probe"] = fit_linear_probe(data["f_train"], data["y_train"])
    results = []
    stops = list(range(args.eval_every, args.iterations, args.eval_every)) if args.eval_every else []
    for stop in [*stops, args.iterations]:
        card = train_to(stop)
        generator, _ = load_projected(args.out / "gan")
        synthetic, y_syn = synthetic_cells(generator.to(device), device)
        result = {"iterations": card["iterations"], "train_seconds": card["train_seconds"], "spread": spread(synthetic, y_syn),
                  **lite0_checks(data, synthetic, y_syn)}
        if stop == args.iterations and not args.no_wnet:
            result.update(wnet_checks(data, synthetic, y_syn))
        results.append(result)
        print(json.dumps(result), flush=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        rows_of_ten = [np.concatenate(list(synthetic[k * 500: k * 500 + 10]), 1) for k in range(len(WBC5))]
        Image.fromarray(np.concatenate(rows_of_ten, 0)).save(args.out / f"grid_{card['iterations']}.png")


if __name__ == "__main__":
    main()
