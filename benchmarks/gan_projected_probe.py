"""A probe, not the product's generator: one class-conditional GAN for pbc_dev's five WBC classes at
64 px, with a Projected-GAN discriminator on frozen ImageNet EfficientNet-Lite stages (issue 15).

What it is: a generator with class-conditional batch norm (upsample + 3x3 convolutions, EMA of its
weights); a discriminator made of small spectrally normalised heads with projection conditioning on
four scales of a frozen EfficientNet-Lite (random fixed 1x1 channel mixing first), hinge loss, the
project's DiffAugment (translation, cutout) and an independent random flip/rotation of every real
cell (gan.augment, gan.train). Against mode collapse (the first probe's generator ignored z), three
switches: ``--z-blocks`` (BigGAN's hierarchical latent: a slice of z, with a shared class embedding,
sets every block's batch-norm gain and bias), ``--mode-seeking W`` (Mao et al. 2019: two latents of
the same class must give images as different as the latents are) and ``--minibatch-std`` (each head
sees the spread of its batch).

Checked every ``--eval-every`` iterations on 500 cells per class, in two feature spaces:
- frozen ImageNet Lite0 (the space of docs/synthetic.md's checks): check 1, a real-trained linear
  probe labels the synthetic cells; check 2, a synthetic-trained probe on the held-out real cells;
  check 3, the Frechet distance to the held-out cells over the real-vs-real floor, per class;
- a W-Net trained from scratch on the real 64-px training cells (no ImageNet; the W-Net paper's own
  check), at the end only: the same checks 1 and 2.
Plus the spread (per-pixel std across 64 samples of a class; real cells 0.10).

The first probe (2026-12-04, 2 cores, Lite1, batch 32, 0.6 s/it, 1,363 iterations in 14 min, no
switch on): check 1 60.3% (EMA 0.99; basophil 100%, eosinophil 99%, lymphocyte 96%, monocyte 0%,
neutrophil 6%), check 2 0.29: each class's cells nearly identical. Results of the switches:
docs/synthetic.md.

    python benchmarks/gan_pbc.py --out runs/gan_pbc64 --step split   # OUT/split.csv (the doc's split)
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --out runs/gan_probe \\
        --z-blocks --mode-seeking 1 --iterations 6000 --eval-every 2000
    # cells as arrays, for a machine without the data (then --arrays instead of --split):
    python benchmarks/gan_projected_probe.py --split runs/gan_pbc64/split.csv --save-arrays cells64.npz
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import lzma
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hematovision.data.classes import WBC5
from hematovision.gan.augment import diff_augment
from hematovision.gan.train import images_to_tensor, random_dihedral, tensor_to_images
from hematovision.models.backbones import build_efficientnet_lite

AUGMENT = ("translation", "cutout")


class CondBN(nn.Module):
    """Batch norm whose gain and bias come from a conditioning vector (class embedding [+ z slice])."""

    def __init__(self, channels: int, cond: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = nn.Linear(cond, channels), nn.Linear(cond, channels)
        for layer in (self.gain, self.bias):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        return self.bn(x) * (1 + self.gain(c))[:, :, None, None] + self.bias(c)[:, :, None, None]


class Block(nn.Module):
    def __init__(self, c_in, c_out, cond):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn1 = CondBN(c_out, cond)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.bn2 = CondBN(c_out, cond)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, c):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.relu(self.bn1(self.conv1(x), c))
        h = F.relu(self.bn2(self.conv2(h), c))
        return h + self.skip(x)


class Generator(nn.Module):
    """z (+ class) -> 64-px image. With ``z_blocks`` z is cut into one slice for the 4x4 seed and one
    per block, each block conditioned on [class embedding, its slice] (BigGAN)."""

    def __init__(self, classes=5, latent=128, width=32, embed=64, z_blocks=False):
        super().__init__()
        self.latent, self.z_blocks = latent, z_blocks
        chans = [8 * width, 8 * width, 4 * width, 2 * width, width]  # 4 -> 8 -> 16 -> 32 -> 64
        self.slice = latent // len(chans) if z_blocks else 0
        self.embed = nn.Embedding(classes, embed)
        first = latent - self.slice * (len(chans) - 1)
        self.fc = nn.Linear(first + embed, chans[0] * 16)
        self.blocks = nn.ModuleList(Block(a, b, embed + self.slice) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], 3, 3, 1, 1), nn.Tanh())
        self.c0 = chans[0]

    def forward(self, z, y):
        e = self.embed(y)
        cut = z.shape[1] - self.slice * len(self.blocks)
        slices = z[:, cut:].split(self.slice, 1) if self.z_blocks else [z[:, :0]] * len(self.blocks)
        h = self.fc(torch.cat([z[:, :cut], e], 1)).view(len(z), self.c0, 4, 4)
        for block, part in zip(self.blocks, slices):
            h = block(h, torch.cat([e, part], 1))
        return self.out(h)


class FeaturePyramid(nn.Module):
    """Frozen Lite stages; returns 4 maps (random 1x1 channel mixing on top, fixed)."""

    def __init__(self, variant=1, mix=64):
        super().__init__()
        net = build_efficientnet_lite(variant, 1000, pretrained=True).eval()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
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


def minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the mean standard deviation over groups of ``group`` images as one channel (Karras 2018)."""
    n, c, height, width = h.shape
    g = min(group, n)
    while n % g:
        g -= 1
    std = h.view(g, n // g, c, height, width).std(0, unbiased=False).mean(dim=(1, 2, 3))
    return torch.cat([h, std.repeat(g)[:, None, None, None].expand(n, 1, height, width)], 1)


class ScaleD(nn.Module):
    """One discriminator per feature scale, projection conditioning."""

    def __init__(self, c, side, classes, width=64, mbstd=False):
        super().__init__()
        layers = []
        ch = c
        while side > 4:
            layers += [nn.utils.spectral_norm(nn.Conv2d(ch, width, 4, 2, 1)), nn.LeakyReLU(0.2)]
            ch, side = width, side // 2
        self.body = nn.Sequential(*layers)
        self.mbstd = mbstd
        self.last = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(ch + int(mbstd), width, 3, 1, 1)), nn.LeakyReLU(0.2))
        self.linear = nn.utils.spectral_norm(nn.Linear(width, 1))
        self.embed = nn.utils.spectral_norm(nn.Embedding(classes, width))

    def forward(self, x, y):
        h = self.body(x)
        h = self.last(minibatch_std(h) if self.mbstd else h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


class Discriminator(nn.Module):
    def __init__(self, classes=5, variant=1, mbstd=False):
        super().__init__()
        self.features = FeaturePyramid(variant)
        sides = (32, 16, 8, 4)
        self.heads = nn.ModuleList(ScaleD(64, s, classes, mbstd=mbstd) for s in sides)

    def forward(self, x, y):
        return sum(head(m, y) for head, m in zip(self.heads, self.features(x)))


def mode_seeking_term(fake: torch.Tensor, z: torch.Tensor, classes: int) -> torch.Tensor:
    """MSGAN's 1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over pairs of the batch's cells of one class.

    The batch's classes repeat every ``classes`` images, so image i and image i + ``classes`` share a
    class: the pairs come free, with no extra generator pass. Lower is more diverse.
    """
    a, b = slice(0, len(z) - classes), slice(classes, len(z))
    ratio = (fake[a] - fake[b]).abs().mean() / (z[a] - z[b]).abs().mean()
    return 1 / (ratio + 1e-5)


def train_until(args, state, images, labels, device, stop: int) -> None:
    """Continue training ``state`` (networks, optimisers, iteration) up to iteration ``stop``."""
    generator, discriminator, generator_ema = state["G"], state["D"], state["G_ema"]
    opt_g, opt_d = state["opt_g"], state["opt_d"]
    by_class = [torch.nonzero(labels == k).squeeze(1) for k in range(len(WBC5))]
    rng = state["rng"]
    start, first = time.perf_counter(), state["it"]
    while state["it"] < stop:
        # Every class equally often, in real and generated batches alike.
        y = (torch.arange(args.batch) % len(WBC5)).to(device)
        index = torch.stack([by_class[k][torch.randint(len(by_class[k]), ())] for k in y.tolist()])
        real = random_dihedral(images[index].to(device), rng)
        z = torch.randn(args.batch, generator.latent, device=device)
        fake = generator(z, y)
        d_real = discriminator(diff_augment(real, AUGMENT), y)
        d_fake = discriminator(diff_augment(fake.detach(), AUGMENT), y)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -discriminator(diff_augment(fake, AUGMENT), y).mean()
        if args.mode_seeking:
            loss_g = loss_g + args.mode_seeking * mode_seeking_term(fake, z, len(WBC5))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            for averaged, current in zip(generator_ema.parameters(), generator.parameters()):
                averaged.lerp_(current, 1 - args.ema)
            for averaged, current in zip(generator_ema.buffers(), generator.buffers()):
                averaged.copy_(current)
        state["it"] += 1
        if state["it"] % 100 == 0:
            elapsed = time.perf_counter() - start
            rate = elapsed / (state["it"] - first)
            print(f"it {state['it']} {elapsed:.0f}s {rate:.3f}s/it eta {rate * (stop - state['it']) / 60:.1f} min "
                  f"D {loss_d.item():.3f} G {loss_g.item():.3f} D(real) {d_real.mean().item():.2f} "
                  f"D(fake) {d_fake.mean().item():.2f}", flush=True)
    state["seconds"] += time.perf_counter() - start


@torch.no_grad()
def synthetic_cells(generator: Generator, device, per_class: int = 500, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` uint8 cells of each class, and their labels."""
    source = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(len(WBC5)):
        z = torch.randn(per_class, generator.latent, generator=source).to(device)
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
    torch.manual_seed(args.seed)
    images = images_to_tensor(cells["x_train"])
    labels = torch.from_numpy(cells["y_train"])
    generator = Generator(len(WBC5), width=args.width, z_blocks=args.z_blocks).to(device)
    discriminator = Discriminator(len(WBC5), variant=args.variant, mbstd=args.minibatch_std).to(device)
    state = {"G": generator, "D": discriminator, "G_ema": copy.deepcopy(generator).eval(), "it": 0, "seconds": 0.0,
             "opt_g": torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.0, 0.99)),
             "opt_d": torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad], 2e-4, betas=(0.0, 0.99)),
             "rng": np.random.default_rng(args.seed)}

    if args.time_only:
        train_until(args, state, images, labels, device, args.iterations)
        print(json.dumps({"iterations": state["it"], "seconds_per_iteration": state["seconds"] / state["it"]}))
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
        train_until(args, state, images, labels, device, stop)
        synthetic, y_syn = synthetic_cells(state["G_ema"], device)
        result = {"iterations": state["it"], "train_seconds": round(state["seconds"], 1), "spread": spread(synthetic, y_syn),
                  **lite0_checks(data, synthetic, y_syn)}
        if stop == args.iterations and not args.no_wnet:
            result.update(wnet_checks(data, synthetic, y_syn))
        results.append(result)
        print(json.dumps(result), flush=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        rows_of_ten = [np.concatenate(list(synthetic[k * 500: k * 500 + 10]), 1) for k in range(len(WBC5))]
        Image.fromarray(np.concatenate(rows_of_ten, 0)).save(args.out / f"grid_{state['it']}.png")
    torch.save({"G_ema": state["G_ema"].state_dict(), "it": state["it"]}, args.out / "generator_ema.pt")


if __name__ == "__main__":
    main()
