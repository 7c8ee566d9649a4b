"""A probe, not the product's generator: one class-conditional GAN for pbc_dev's five WBC classes at
64 px, with a Projected-GAN discriminator on frozen ImageNet EfficientNet-Lite stages (issue 15).

What it is: a generator with class-conditional batch norm (upsample + 3x3 convolutions, EMA of its
weights); a discriminator made of small spectrally normalised heads with projection conditioning on
four scales of a frozen EfficientNet-Lite (random fixed 1x1 channel mixing first), hinge loss,
DiffAugment-style translation and cutout, a random flip/rotation of every real cell. Then checks 1
and 2 of docs/synthetic.md (a real-trained linear probe on Lite0 features labels the synthetic
cells; a synthetic-trained probe on the held-out real cells) on 500 cells per class.

Measured on 2 cores (2026-12-04), the split of docs/synthetic.md, Lite1 discriminator, batch 32,
0.6 s per iteration, 14 min = 1,363 iterations: check 1 60.3% (EMA 0.99; basophil 100%, eosinophil
99%, lymphocyte 96%, monocyte 0%, neutrophil 6%), check 2 balanced accuracy 0.29 (raw generator:
41.7% and 0.37). The cells look like cells but each class's samples are nearly identical: the
generator ignores z (mode collapse), which is what to fix next (z into every block, as BigGAN does;
a diversity term; a minibatch-std feature in the heads). With EMA 0.999 the same 14 min gave
13.7%: the average still held the early, blank generator. Note that the checks use ImageNet
features too; a generator trained against them must also be checked in another feature space.

    python benchmarks/gan_pbc.py --out runs/gan_pbc64 --step split   # OUT/split.csv (the doc's split)
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --out runs/gan_probe --minutes 14
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --out runs/gan_probe --eval-only --raw
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hematovision.data.classes import WBC5
from hematovision.data.folder import load_images
from hematovision.data.splits import read_split_csv
from hematovision.gan.train import images_to_tensor, tensor_to_images
from hematovision.models.backbones import build_efficientnet_lite


class CondBN(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(classes, channels)
        self.beta = nn.Embedding(classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class Block(nn.Module):
    def __init__(self, c_in, c_out, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn1 = CondBN(c_out, classes)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.bn2 = CondBN(c_out, classes)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.relu(self.bn1(self.conv1(x), y))
        h = F.relu(self.bn2(self.conv2(h), y))
        return h + self.skip(x)


class Generator(nn.Module):
    def __init__(self, classes=5, latent=128, width=32):
        super().__init__()
        self.latent = latent
        chans = [8 * width, 8 * width, 4 * width, 2 * width, width]  # 4 -> 8 -> 16 -> 32 -> 64
        self.embed = nn.Embedding(classes, latent)
        self.fc = nn.Linear(2 * latent, chans[0] * 16)
        self.blocks = nn.ModuleList(Block(a, b, classes) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], 3, 3, 1, 1), nn.Tanh())
        self.c0 = chans[0]

    def forward(self, z, y):
        h = self.fc(torch.cat([z, self.embed(y)], 1)).view(len(z), self.c0, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return self.out(h)


class FeaturePyramid(nn.Module):
    """Frozen Lite1 stages; returns 4 maps (random 1x1 channel mixing on top, fixed)."""

    def __init__(self, variant=1, mix=64):
        super().__init__()
        net = build_efficientnet_lite(variant, 1000, pretrained=True).eval()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.stages = net.blocks
        self.taps = (0, 1, 2, 4)  # at 64 px input: 32, 16, 8, 4 px maps; later stages are not run
        self.stages = net.blocks[: self.taps[-1] + 1]
        chans = [[m for m in net.blocks[i][-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels for i in self.taps]
        self.mix = nn.ModuleList(nn.Conv2d(c, mix, 1, bias=False) for c in chans)
        for m in self.mix:
            nn.init.kaiming_normal_(m.weight)
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):  # x in [-1, 1] (Lite's own normalisation: mean 0.5, std 0.5)
        h = self.stem(x)
        maps = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i in self.taps:
                maps.append(self.mix[self.taps.index(i)](h))
        return maps


class ScaleD(nn.Module):
    """One discriminator per feature scale, projection conditioning."""

    def __init__(self, c, side, classes, width=64):
        super().__init__()
        layers = []
        ch = c
        while side > 4:
            layers += [nn.utils.spectral_norm(nn.Conv2d(ch, width, 4, 2, 1)), nn.LeakyReLU(0.2)]
            ch, side = width, side // 2
        layers += [nn.utils.spectral_norm(nn.Conv2d(ch, width, 3, 1, 1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.linear = nn.utils.spectral_norm(nn.Linear(width, 1))
        self.embed = nn.utils.spectral_norm(nn.Embedding(classes, width))

    def forward(self, x, y):
        h = self.body(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


class Discriminator(nn.Module):
    def __init__(self, classes=5, variant=1):
        super().__init__()
        self.features = FeaturePyramid(variant)
        sides = (32, 16, 8, 4)
        self.heads = nn.ModuleList(ScaleD(64, s, classes) for s in sides)

    def forward(self, x, y):
        return sum(head(m, y) for head, m in zip(self.heads, self.features(x)))


def augment(images: torch.Tensor) -> torch.Tensor:
    """Differentiable translation (up to 1/8 of the side, reflected) and a cutout of half the side."""
    n, _, side, _ = images.shape
    shift = side // 8
    dx, dy = torch.randint(-shift, shift + 1, (n,)), torch.randint(-shift, shift + 1, (n,))
    padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")
    moved = torch.stack([padded[i, :, shift + dy[i]: shift + dy[i] + side, shift + dx[i]: shift + dx[i] + side]
                         for i in range(n)])
    cx, cy = torch.randint(0, side, (n,)), torch.randint(0, side, (n,))
    rows, cols = torch.arange(side)[None, :, None], torch.arange(side)[None, None, :]
    inside = ((rows - cy[:, None, None]).abs() < side // 4) & ((cols - cx[:, None, None]).abs() < side // 4)
    return moved * (~inside)[:, None].float()


def random_orientation(images: torch.Tensor) -> torch.Tensor:
    """One random flip/90-degree rotation for the batch (a cell has no up)."""
    turned = torch.rot90(images, int(torch.randint(0, 4, ())), (2, 3))
    return turned.flip(3) if torch.rand(()) < 0.5 else turned


def train(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, out: Path) -> tuple[Generator, Generator, int]:
    """Train (or continue from OUT/ckpt.pt) for ``args.minutes``; returns (generator, its EMA, iterations)."""
    by_class = [torch.nonzero(labels == k).squeeze(1) for k in range(len(WBC5))]
    generator, discriminator = Generator(len(WBC5)), Discriminator(len(WBC5), variant=args.variant)
    generator_ema = copy.deepcopy(generator).eval()
    opt_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad], 2e-4, betas=(0.0, 0.99))
    checkpoint = out / "ckpt.pt"
    iteration = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        for module, key in ((generator, "G"), (discriminator, "D"), (generator_ema, "G_ema"), (opt_g, "opt_g"),
                            (opt_d, "opt_d")):
            module.load_state_dict(state[key])
        iteration = state["it"]
    start, first = time.perf_counter(), iteration
    while not args.eval_only and time.perf_counter() - start < args.minutes * 60:
        # Every class equally often, in real and generated batches alike.
        y = torch.arange(args.batch) % len(WBC5)
        index = torch.stack([by_class[k][torch.randint(len(by_class[k]), ())] for k in y.tolist()])
        real = random_orientation(images[index])
        fake = generator(torch.randn(args.batch, generator.latent), y)
        d_real = discriminator(augment(real), y)
        d_fake = discriminator(augment(fake.detach()), y)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -discriminator(augment(fake), y).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            for averaged, current in zip(generator_ema.parameters(), generator.parameters()):
                averaged.lerp_(current, 1 - args.ema)
            for averaged, current in zip(generator_ema.buffers(), generator.buffers()):
                averaged.copy_(current)
        iteration += 1
        if iteration % 50 == 0:
            elapsed = time.perf_counter() - start
            print(f"it {iteration} {elapsed:.0f}s {elapsed / (iteration - first):.2f}s/it D {loss_d.item():.3f} "
                  f"G {loss_g.item():.3f} D(real) {d_real.mean().item():.2f} D(fake) {d_fake.mean().item():.2f}",
                  flush=True)
    torch.save({"G": generator.state_dict(), "D": discriminator.state_dict(), "G_ema": generator_ema.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "it": iteration}, checkpoint)
    return generator, generator_ema, iteration


@torch.no_grad()
def synthetic_cells(generator: Generator, per_class: int = 500, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` uint8 cells of each class, and their labels."""
    source = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(len(WBC5)):
        z = torch.randn(per_class, generator.latent, generator=source)
        drawn = generator(z, torch.full((per_class,), k))
        images.append(tensor_to_images(drawn))
        labels += [k] * per_class
    return np.concatenate(images), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", required=True, help="split CSV with train and test rows (benchmarks/gan_pbc.py)")
    parser.add_argument("--minutes", type=float, default=14.0, help="training time in this call (resumes)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", type=int, default=1, help="EfficientNet-Lite variant of the discriminator")
    parser.add_argument("--ema", type=float, default=0.99, help="decay of the generator's weight average")
    parser.add_argument("--eval-only", action="store_true", help="no training: check the saved generator")
    parser.add_argument("--raw", action="store_true", help="check the generator itself, not its average")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = read_split_csv(args.split)
    classes = list(WBC5)
    real_train = load_images([s for s, part in rows if part == "train"], 64, desc="train")
    images = images_to_tensor(real_train.images)
    labels = torch.tensor([classes.index(s.label) for s in real_train.samples])
    generator, generator_ema, iteration = train(args, images, labels, args.out)

    from PIL import Image

    from hematovision.gan.quality import balanced_accuracy, fit_linear_probe
    from hematovision.train.features import FeatureExtractor

    synthetic, y_syn = synthetic_cells(generator.eval() if args.raw else generator_ema)
    tag = f"{iteration}{'_raw' if args.raw else ''}"
    rows_of_ten = [np.concatenate(list(synthetic[k * 500: k * 500 + 10]), 1) for k in range(len(classes))]
    Image.fromarray(np.concatenate(rows_of_ten, 0)).save(args.out / f"grid_{tag}.png")
    real_test = load_images([s for s, part in rows if part == "test"], 64, desc="test")
    y_train, y_test = labels.numpy(), np.array([classes.index(s.label) for s in real_test.samples])
    extractor = FeatureExtractor()
    cache = args.out / "real_features.npz"
    if cache.exists():
        stored = np.load(cache)
        f_train, f_test = stored["train"], stored["test"]
    else:
        f_train, f_test = extractor.extract(real_train.images), extractor.extract(real_test.images)
        np.savez(cache, train=f_train, test=f_test)
    f_syn = extractor.extract(synthetic)
    labelled = fit_linear_probe(f_train, y_train).predict(f_syn)
    recognised = [float((labelled[y_syn == k] == k).mean()) for k in range(len(classes))]
    synthetic_only = balanced_accuracy(y_test, fit_linear_probe(f_syn, y_syn).predict(f_test), len(classes))
    result = {"iterations": iteration, "generator": "raw" if args.raw else f"EMA {args.ema}",
              "check1_per_class": dict(zip(classes, recognised)), "check1": float(np.mean(recognised)),
              "check2_balanced_accuracy": float(synthetic_only)}
    print(json.dumps(result), flush=True)
    (args.out / f"result_{tag}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
