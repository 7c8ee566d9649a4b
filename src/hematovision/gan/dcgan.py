"""DCGAN generator and discriminator (Radford et al. 2016), sized for 64 or 128 px cells.

The generator maps a latent vector through transposed convolutions (each doubling the
side, batch norm, ReLU) to a ``tanh`` RGB image in [-1, 1]. The discriminator mirrors it
with strided convolutions, LeakyReLU and dropout, and ends in one logit per image. The
W-Net paper trains one such pair per white-cell class; ``width`` sets the channel count
of the widest layers (DCGAN's ``ngf``/``ndf``: 64 in the original, less for a CPU).

Trained on a few hundred cells, the plain DCGAN collapses: every latent vector gives nearly
the same cell (docs/synthetic.md measures it). The discriminator therefore has a minibatch
standard-deviation channel (Karras et al. 2018), with which it can see that a batch of fakes
lacks the variety of a batch of real cells. Spectral normalisation of its convolutions
instead of batch norm (Miyato et al. 2018) is an option, off by default (see GanConfig).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

SIZES = (32, 64, 128)


def _check_size(size: int) -> int:
    if size not in SIZES:
        raise ValueError(f"image size must be one of {SIZES}, got {size}")
    # Number of resolution doublings between the 4x4 seed and the output.
    return int(math.log2(size)) - 2


def _channels(size: int, width: int, max_multiplier: int = 8) -> list[int]:
    # Channels from the 4x4 end to the full-resolution end, halving each doubling as in
    # DCGAN (8w, 4w, 2w, w at 64 px); capped so 128 px does not add a 16w layer.
    levels = _check_size(size)
    return [width * min(2 ** (levels - 1 - i), max_multiplier) for i in range(levels)]


class Generator(nn.Module):
    """Latent vector to image.

    Args:
        size: output side in pixels (32, 64 or 128).
        latent_dim: length of the latent vector ``z``.
        width: channels of the last hidden layer; earlier layers have 2x, 4x, 8x this.
    """

    def __init__(self, size: int = 64, latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        self.size, self.latent_dim, self.width = size, latent_dim, width
        channels = _channels(size, width)
        # A 4x4 transposed convolution on a 1x1 input is DCGAN's "project and reshape".
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) or (N, latent_dim, 1, 1) → (N, 3, size, size) in [-1, 1]."""
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class MinibatchStd(nn.Module):
    """Append one channel: the feature standard deviation across the batch, averaged.

    A collapsed generator makes batches with almost no spread, so this channel lets the
    discriminator reject them as a whole.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = torch.sqrt(x.var(dim=0, unbiased=False) + 1e-8).mean()
        return torch.cat([x, spread.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


class Discriminator(nn.Module):
    """Image to one real-vs-fake logit.

    Args:
        size: input side in pixels (32, 64 or 128).
        width: channels of the first layer; later layers have 2x, 4x, 8x this.
        dropout: dropout probability after each hidden block (regularises a
            discriminator that would otherwise memorise a few hundred real cells).
        spectral_norm: spectrally normalise every convolution and drop batch norm.
        minibatch_std: add the :class:`MinibatchStd` channel before the last convolution.
    """

    def __init__(self, size: int = 64, width: int = 64, dropout: float = 0.3, spectral_norm: bool = False,
                 minibatch_std: bool = False) -> None:
        super().__init__()
        self.size, self.width = size, width
        channels = _channels(size, width)[::-1]

        def conv(c_in: int, c_out: int, stride: int, padding: int) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, 4, stride, padding, bias=spectral_norm)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        # No batch norm on the first layer, as in DCGAN.
        layers: list[nn.Module] = [conv(3, channels[0], 2, 1), nn.LeakyReLU(0.2, True)]
        if dropout:
            layers.append(nn.Dropout2d(dropout))
        for c_in, c_out in pairwise(channels):
            layers.append(conv(c_in, c_out, 2, 1))
            if not spectral_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
            if dropout:
                layers.append(nn.Dropout2d(dropout))
        if minibatch_std:
            layers.append(MinibatchStd())
        layers.append(conv(channels[-1] + int(minibatch_std), 1, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) in [-1, 1] → (N,) logits."""
        return self.net(images).flatten()


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        # A spectrally normalised weight is computed from its stored original: initialise that.
        parametrized = nn.utils.parametrize.is_parametrized(module, "weight")
        nn.init.normal_(module.parametrizations.weight.original if parametrized else module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
