"""One class-conditional generator for every white-cell class, judged by a Projected-GAN discriminator.

The per-class DCGANs of :mod:`hematovision.gan.dcgan` each learn from a few hundred cells and from
scratch. Here one generator draws every class (what the classes share, background red cells,
staining, cell outline, is learned from all of them), and the discriminator does not learn its
features at all: it judges images through the frozen early stages of an ImageNet EfficientNet-Lite
(Sauer et al. 2021, "Projected GANs converge faster"), with small trainable heads on four scales.
Its task is learnable from a few hundred images because the features already exist.

Pieces, and why each is there (docs/synthetic.md measures them):

* **Generator**: a BigGAN-style stack (nearest upsampling and 3x3 convolutions with a skip, batch
  norm whose gain and bias come from the class), 4 -> 64 px. The latent vector is cut into slices,
  one for the 4x4 seed and one for every block, each block conditioned on [class embedding, its
  slice] (BigGAN's hierarchical latent): without it the class decided everything and each class's
  cells were near copies of one another.
* **Discriminator**: the frozen Lite stem and stages 0-4 (32, 16, 8 and 4-px maps at 64-px input),
  a fixed random 1x1 channel mixing per scale (Projected GAN's cross-channel mixing), then per scale
  spectrally normalised strided convolutions, an optional minibatch standard-deviation channel, and
  a projection head (Miyato & Koyama 2018): an unconditional logit plus <class embedding, features>.
* **Mode seeking** (Mao et al. 2019, MSGAN): the generator is also penalised when two latent vectors
  of one class give similar images (:func:`mode_seeking_term`).
* **An auxiliary classifier** (optional, AC-GAN, Odena et al. 2017): a small head on the same frozen
  maps learns the class of *real* cells, and the generator is penalised when its cells are not
  classified as asked (:class:`FeatureClassifier`). The projection term alone let a neutrophil with
  a round nucleus pass as a neutrophil.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALES = (32, 16, 8, 4)  # sides of the feature maps the heads judge, at a 64-px input
TAPS = (0, 1, 2, 4)  # the EfficientNet-Lite stages whose outputs have those sides


class CondBatchNorm(nn.Module):
    """Batch norm whose gain and bias are linear in a conditioning vector (starting as plain batch norm)."""

    def __init__(self, channels: int, cond: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = nn.Linear(cond, channels), nn.Linear(cond, channels)
        for layer in (self.gain, self.bias):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.bn(x) * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class Block(nn.Module):
    """Upsample x2, two conditioned 3x3 convolutions, and a 1x1 skip."""

    def __init__(self, c_in: int, c_out: int, cond: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn1 = CondBatchNorm(c_out, cond)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.bn2 = CondBatchNorm(c_out, cond)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.relu(self.bn1(self.conv1(x), cond))
        h = F.relu(self.bn2(self.conv2(h), cond))
        return h + self.skip(x)


class ConditionalGenerator(nn.Module):
    """(z, class) -> a 64-px image in [-1, 1].

    Args:
        classes: number of classes.
        latent_dim: length of z.
        width: channels at 64 px; 8x at the 4x4 seed.
        embed_dim: length of the class embedding.
        hierarchical: cut z into a slice for the seed and one per block (see the module's docstring).
    """

    def __init__(self, classes: int, latent_dim: int = 128, width: int = 32, embed_dim: int = 64,
                 hierarchical: bool = True) -> None:
        super().__init__()
        self.classes, self.latent_dim, self.hierarchical, self.size = classes, latent_dim, hierarchical, 64
        channels = [8 * width, 8 * width, 4 * width, 2 * width, width]  # 4 -> 8 -> 16 -> 32 -> 64 px
        blocks = len(channels) - 1
        self.slice = latent_dim // (blocks + 1) if hierarchical else 0
        self.seed_dim = latent_dim - self.slice * blocks
        self.embed = nn.Embedding(classes, embed_dim)
        self.fc = nn.Linear(self.seed_dim + embed_dim, channels[0] * 16)
        self.blocks = nn.ModuleList(Block(a, b, embed_dim + self.slice) for a, b in zip(channels[:-1], channels[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(), nn.Conv2d(channels[-1], 3, 3, 1, 1), nn.Tanh())
        self.seed_channels = channels[0]

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        embedded = self.embed(labels)
        slices = z[:, self.seed_dim:].split(self.slice, 1) if self.hierarchical else [z[:, :0]] * len(self.blocks)
        h = self.fc(torch.cat([z[:, : self.seed_dim], embedded], 1)).view(len(z), self.seed_channels, 4, 4)
        for block, part in zip(self.blocks, slices):
            h = block(h, torch.cat([embedded, part], 1))
        out: Tensor = self.out(h)
        return out


class OneClass(nn.Module):
    """One class of a :class:`ConditionalGenerator`, used like a per-class DCGAN generator: ``z -> image``."""

    def __init__(self, generator: ConditionalGenerator, class_index: int) -> None:
        super().__init__()
        self.generator, self.class_index = generator, class_index
        self.latent_dim, self.size = generator.latent_dim, generator.size

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z, torch.full((len(z),), self.class_index, dtype=torch.long, device=z.device))


class FeaturePyramid(nn.Module):
    """Frozen EfficientNet-Lite stem and stages 0-4; four maps, each mixed to ``mix`` channels by a fixed random 1x1."""

    def __init__(self, variant: int = 1, mix: int = 64, pretrained: bool = True) -> None:
        super().__init__()
        from hematovision.models.backbones import build_efficientnet_lite

        net = build_efficientnet_lite(variant, 1000, pretrained=pretrained).eval()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.stages = net.blocks[: TAPS[-1] + 1]  # later stages are never run
        channels = [[m for m in net.blocks[i][-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels for i in TAPS]
        self.mix = nn.ModuleList(nn.Conv2d(c, mix, 1, bias=False) for c in channels)
        for layer in self.mix:
            nn.init.kaiming_normal_(layer.weight)
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> FeaturePyramid:
        return super().train(False)  # frozen: batch norm keeps ImageNet's statistics

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images in [-1, 1] (EfficientNet-Lite's own normalisation is mean 0.5, std 0.5) -> four maps."""
        h = self.stem(x)
        maps = []
        for index, stage in enumerate(self.stages):
            h = stage(h)
            if index in TAPS:
                maps.append(self.mix[TAPS.index(index)](h))
        return maps


def minibatch_std(h: Tensor, group: int = 4) -> Tensor:
    """Append the mean standard deviation over groups of ``group`` images as one channel (Karras et al. 2018)."""
    n, c, height, width = h.shape
    g = min(group, n)
    while n % g:
        g -= 1
    std = h.view(g, n // g, c, height, width).std(0, unbiased=False).mean(dim=(1, 2, 3))
    return torch.cat([h, std.repeat(g)[:, None, None, None].expand(n, 1, height, width)], 1)


class ScaleHead(nn.Module):
    """The trainable discriminator of one feature scale, with projection conditioning."""

    def __init__(self, channels: int, side: int, classes: int, width: int = 64, mbstd: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        while side > 4:
            layers += [nn.utils.spectral_norm(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2)]
            channels, side = width, side // 2
        self.body = nn.Sequential(*layers)
        self.mbstd = mbstd
        self.last = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(channels + int(mbstd), width, 3, 1, 1)), nn.LeakyReLU(0.2))
        self.linear = nn.utils.spectral_norm(nn.Linear(width, 1))
        self.embed = nn.utils.spectral_norm(nn.Embedding(classes, width))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = self.body(x)
        h = self.last(minibatch_std(h) if self.mbstd else h).sum(dim=(2, 3))
        logits: Tensor = self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(1)
        return logits


class FeatureClassifier(nn.Module):
    """Class logits from the frozen maps: per scale a 3x3 convolution and global average pooling, then one linear layer.

    Not spectrally normalised: it is not a critic whose slope the generator follows, but a judge of
    class that should be as right as it can be on real cells. Each map is first normalised per image
    (one group): the deeper frozen maps have standard deviations of 10 and more, and with Adam's
    per-weight steps such inputs made the class logits jump by whole units per step.
    """

    def __init__(self, classes: int, channels: int = 64, width: int = 64) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(1, channels, affine=False), nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2))
            for _ in SCALES
        )
        self.linear = nn.Linear(width * len(SCALES), classes)

    def forward(self, maps: list[Tensor]) -> Tensor:
        logits: Tensor = self.linear(torch.cat([conv(m).mean(dim=(2, 3)) for conv, m in zip(self.convs, maps)], 1))
        return logits


class ProjectedDiscriminator(nn.Module):
    """Sum of the four scale heads' logits on the frozen feature pyramid (and, optionally, class logits)."""

    def __init__(self, classes: int, variant: int = 1, mbstd: bool = True, pretrained: bool = True,
                 classifier: bool = False) -> None:
        super().__init__()
        self.features = FeaturePyramid(variant, pretrained=pretrained)
        self.heads = nn.ModuleList(ScaleHead(64, side, classes, mbstd=mbstd) for side in SCALES)
        self.classifier = FeatureClassifier(classes) if classifier else None

    def judge(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Real-or-fake logits and, with a classifier, class logits, from one pass through the frozen features."""
        maps = self.features(x)
        logits: Tensor = sum(head(m, labels) for head, m in zip(self.heads, maps))  # type: ignore[assignment]
        return logits, self.classifier(maps) if self.classifier is not None else None

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.judge(x, labels)[0]


def mode_seeking_term(fake: Tensor, z: Tensor, classes: int) -> Tensor:
    """MSGAN's 1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over pairs of cells of one class in the batch.

    Training batches cycle through the classes, so image i and image i + ``classes`` share a class:
    the pairs come free, with no extra generator pass. Lower means more varied images.
    """
    first, second = slice(0, len(z) - classes), slice(classes, len(z))
    ratio = (fake[first] - fake[second]).abs().mean() / (z[first] - z[second]).abs().mean()
    return 1 / (ratio + 1e-5)
