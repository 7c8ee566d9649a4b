"""Train one DCGAN per white-cell class, resumably, and sample synthetic cells from it.

A class run folder holds ``checkpoint.pt`` (everything needed to resume: both networks,
both optimisers, RNG states, loss history), ``samples/iter_NNNNNN.png`` grids of a fixed
set of latent vectors (so progress is visible), ``losses.csv``, and, when training ends,
``generator.safetensors`` + ``gan_card.json`` (what :func:`load_generator` reads).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hematovision._io import atomic_write, write_json, write_text
from hematovision.errors import HematoVisionError
from hematovision.gan.augment import diff_augment, parse_policy
from hematovision.gan.dcgan import Discriminator, Generator, init_weights
from hematovision.gan.projected import OneClass

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
GENERATOR_FILE = "generator.safetensors"
CARD_FILE = "gan_card.json"


@dataclass(frozen=True)
class GanConfig:
    """Settings of one class's DCGAN training (saved in its checkpoint and card).

    Attributes:
        size: image side in pixels (32, 64 or 128).
        latent_dim: length of the latent vector.
        width: DCGAN's ngf/ndf (channels of the outermost hidden layers).
        batch_size: real (and fake) images per step.
        iterations: discriminator+generator update pairs.
        lr: Adam learning rate of both networks.
        beta1: Adam's first-moment decay (0.5 in DCGAN, steadier than 0.9 for GANs).
        dropout: discriminator dropout. Off by default: with DiffAugment doing the
            regularising, dropout 0.3 (per channel or per element) left the generator nearly
            collapsed after 1,000 iterations (per-pixel spread across samples 0.03-0.04, against
            0.06 without dropout; eosinophil, docs/synthetic.md).
        real_label: target for real images; below 1 is one-sided label smoothing, which keeps
            the discriminator from growing over-confident on a few hundred cells.
        sample_every: save a sample grid every this many iterations.
        checkpoint_every: save a resumable checkpoint every this many iterations.
        seed: base seed; each class adds a hash of its name so classes differ but repeat.
        spectral_norm: discriminator with spectrally normalised convolutions, no batch norm.
            Off by default: with one discriminator step per generator step it stayed at
            chance (D(real) = D(fake) = 0.44) and gave the generator no signal.
        minibatch_std: discriminator sees the spread of each batch (against mode collapse).
        augment: DiffAugment operations applied to every image the discriminator sees,
            comma-separated from :data:`hematovision.gan.augment.POLICIES` ("" for none).
    """

    size: int = 64
    latent_dim: int = 100
    width: int = 32
    batch_size: int = 32
    iterations: int = 1500
    lr: float = 2e-4
    beta1: float = 0.5
    dropout: float = 0.0
    real_label: float = 0.9
    sample_every: int = 250
    checkpoint_every: int = 100
    seed: int = 0
    spectral_norm: bool = False
    minibatch_std: bool = True
    augment: str = "translation,cutout"

    @classmethod
    def from_dict(cls, data: dict) -> GanConfig:
        known = {f.name for f in fields(cls)}
        if "spectral_norm" not in data:
            # Saved before these options existed: the plain DCGAN.
            data = {**data, "spectral_norm": False, "minibatch_std": False, "augment": ""}
        return cls(**{key: value for key, value in data.items() if key in known})


def class_seed(seed: int, class_name: str) -> int:
    """A per-class seed that is stable across runs and Python versions."""
    return (seed + zlib.crc32(class_name.encode())) % (2**31)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float32 in [-1, 1], the generator's range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [-1, 1] → (N, S, S, 3) uint8."""
    scaled = tensor.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().numpy()


def random_dihedral(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply an independent random flip/90° rotation to each image of (N, 3, S, S).

    A cell has no "up", so the 8 orientations of a real cell are real cells too: this
    multiplies the few hundred training images by eight without inventing content.
    """
    codes = rng.integers(0, 8, size=len(batch))
    out = torch.empty_like(batch)
    for code in range(8):
        mask = torch.from_numpy(codes == code).to(batch.device)
        if mask.any():
            part = batch[mask]
            if code >= 4:
                part = part.flip(-1)
            out[mask] = torch.rot90(part, code % 4, dims=(-2, -1))
    return out


def save_grid(images: np.ndarray, path: str | Path, columns: int = 8) -> Path:
    """Save (N, S, S, 3) uint8 images as one PNG grid with 2-px white gutters."""
    from PIL import Image

    count, side = len(images), images.shape[1]
    rows = -(-count // columns)
    gap = 2
    canvas = np.full((rows * (side + gap) + gap, columns * (side + gap) + gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        top, left = gap + row * (side + gap), gap + col * (side + gap)
        canvas[top : top + side, left : left + side] = image
    return atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG", optimize=True))


def write_losses(out_dir: Path, history: list[list[float]]) -> None:
    """``losses.csv``: each iteration's discriminator and generator losses and mean discriminator outputs."""
    lines = ["iteration,loss_d,loss_g,d_real,d_fake"]
    lines += [f"{i + 1},{h[0]:.5f},{h[1]:.5f},{h[2]:.4f},{h[3]:.4f}" for i, h in enumerate(history)]
    write_text(out_dir / "losses.csv", "\n".join(lines) + "\n")


def build_models(config: GanConfig) -> tuple[Generator, Discriminator]:
    """A freshly initialised generator/discriminator pair for ``config``."""
    generator = Generator(config.size, config.latent_dim, config.width)
    discriminator = Discriminator(config.size, config.width, config.dropout, config.spectral_norm,
                                  config.minibatch_std)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


def train_step(
    generator: Generator,
    discriminator: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    real_label: float = 0.9,
    augment: tuple[str, ...] = (),
) -> dict[str, float]:
    """One DCGAN update: the discriminator on real vs fake, then the generator.

    The generator uses the non-saturating loss (maximise log D(G(z))) as in DCGAN.

    Args:
        real: (N, 3, S, S) real images in [-1, 1].
        real_label: discriminator target for real images.
        augment: DiffAugment operations applied to real and fake images alike.

    Returns:
        ``loss_d``, ``loss_g``, and the mean discriminator probabilities ``d_real``, ``d_fake``.
    """
    bce = nn.BCEWithLogitsLoss()
    n = real.shape[0]
    generator.train()
    discriminator.train()
    z = torch.randn(n, generator.latent_dim)
    fake = generator(z)

    logits_real = discriminator(diff_augment(real, augment))
    logits_fake = discriminator(diff_augment(fake.detach(), augment))
    loss_d = bce(logits_real, torch.full((n,), real_label)) + bce(logits_fake, torch.zeros(n))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    loss_g = bce(discriminator(diff_augment(fake, augment)), torch.ones(n))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": torch.sigmoid(logits_real.detach()).mean().item(),
        "d_fake": torch.sigmoid(logits_fake.detach()).mean().item(),
    }


def train_class_gan(
    images: np.ndarray,
    out_dir: str | Path,
    config: GanConfig,
    class_name: str,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict:
    """Train (or resume) the DCGAN of one class and write its run folder.

    Args:
        images: (N, S, S, 3) uint8 training images of the class, already at ``config.size``.
        out_dir: the class run folder.
        config: training settings; on resume, ``iterations`` may be raised to train longer.
        class_name: canonical class name (recorded, and part of the seed).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show a tqdm bar.
        max_minutes: stop after this many minutes of training in this call, before
            ``config.iterations`` if need be; the card then says ``stopped_early`` and a later
            call with ``resume`` continues. An interrupt (Ctrl-C) also saves a checkpoint first.

    Returns:
        The GAN card: class, config, iterations done, training seconds, image count, last losses.

    Raises:
        HematoVisionError: no images, wrong image size, or an existing run without ``resume``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if images.ndim != 4 or images.shape[1:] != (config.size, config.size, 3):
        raise HematoVisionError(
            f"{class_name}: expected images of shape (N, {config.size}, {config.size}, 3), got {images.shape}"
        )
    if len(images) == 0:
        raise HematoVisionError(f"{class_name}: no training images")
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise HematoVisionError(f"{out_dir} already holds a GAN checkpoint; pass --resume to continue or pick another --out")

    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if checkpoint_path.exists() else None
    if state is not None:
        saved = GanConfig.from_dict(state["config"])
        if (saved.size, saved.latent_dim, saved.width) != (config.size, config.latent_dim, config.width):
            raise HematoVisionError(
                f"{out_dir}: checkpoint was trained with size/latent/width "
                f"{saved.size}/{saved.latent_dim}/{saved.width}, not {config.size}/{config.latent_dim}/{config.width}"
            )
        # A resumed run keeps the discriminator and augmentation it was started with.
        config = replace(config, spectral_norm=saved.spectral_norm, minibatch_std=saved.minibatch_std,
                         augment=saved.augment)

    seed = class_seed(config.seed, class_name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator, discriminator = build_models(config)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    # Fixed latent vectors for the progress grids, independent of the training RNG.
    fixed_z = torch.randn(64, config.latent_dim, generator=torch.Generator().manual_seed(seed))
    start, elapsed, history = 0, 0.0, []

    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        start, elapsed, history = int(state["iteration"]), float(state["seconds"]), list(state["history"])
        log.info("%s: resuming at iteration %d of %d", class_name, start, config.iterations)

    data = images_to_tensor(images)
    augment = parse_policy(config.augment)
    batch_size = min(config.batch_size, len(data))

    def save_checkpoint(iteration: int) -> None:
        state = {
            "config": asdict(config), "class_name": class_name, "iteration": iteration, "seconds": elapsed,
            "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state, "history": history,
            "num_train_images": len(images),
        }
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))
        write_losses(out_dir, history)

    bar = tqdm(range(start, config.iterations), desc=f"GAN {class_name}", unit="it", disable=not progress,
               initial=start, total=config.iterations)
    call_started = time.perf_counter()
    tick = call_started
    done = start
    try:
        for iteration in bar:
            # Each batch is a fresh random subset (no repeats within it) in a random orientation.
            index = rng.choice(len(data), size=batch_size, replace=False)
            real = random_dihedral(data[index], rng)
            stats = train_step(generator, discriminator, opt_g, opt_d, real, config.real_label, augment)
            history.append([stats["loss_d"], stats["loss_g"], stats["d_real"], stats["d_fake"]])
            bar.set_postfix(loss_d=f"{stats['loss_d']:.2f}", loss_g=f"{stats['loss_g']:.2f}",
                            d_real=f"{stats['d_real']:.2f}")
            done = iteration + 1
            now = time.perf_counter()
            elapsed += now - tick
            tick = now
            out_of_time = max_minutes is not None and now - call_started >= 60 * max_minutes
            if done % config.sample_every == 0 or done == config.iterations or out_of_time:
                save_grid(generate(generator, fixed_z), out_dir / "samples" / f"iter_{done:06d}.png")
            if done % config.checkpoint_every == 0 or done == config.iterations or out_of_time:
                save_checkpoint(done)
                tick = time.perf_counter()  # checkpoint writing is not training time
            if out_of_time:
                log.info("%s: time budget of %.1f min reached at iteration %d", class_name, max_minutes, done)
                break
    except KeyboardInterrupt:
        # Keep the finished iterations: the next call with resume continues from here.
        if len(history) == done and done > start:
            save_checkpoint(done)
        raise
    finally:
        bar.close()

    from safetensors.torch import save_file

    atomic_write(out_dir / GENERATOR_FILE, lambda tmp: save_file(generator.state_dict(), str(tmp)))
    last = np.mean(history[-50:], axis=0) if history else [float("nan")] * 4
    card = {
        "class_name": class_name,
        "config": asdict(config),
        "iterations": len(history),
        "stopped_early": len(history) < config.iterations,
        "train_seconds": round(elapsed, 1),
        "seconds_per_iteration": round(elapsed / max(1, len(history)), 3),
        "num_train_images": len(images),
        "torch_threads": torch.get_num_threads(),
        "last50_mean": dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), map(float, last))),
    }
    write_json(out_dir / CARD_FILE, card)
    return card


@torch.no_grad()
def generate(generator: Generator | OneClass, z: torch.Tensor) -> np.ndarray:
    """Images for latent vectors ``z`` (N, latent_dim) with the generator in eval mode: (N, S, S, 3) uint8.

    Eval mode makes batch norm use its running statistics, so an image depends only on
    its own latent vector, not on the batch it was drawn with.
    """
    was_training = generator.training
    generator.eval()
    images = tensor_to_images(generator(z))
    generator.train(was_training)
    return images


def sample_images(generator: Generator | OneClass, n: int, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Draw ``n`` images, reproducibly for a given ``seed``: (n, S, S, 3) uint8."""
    source = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.latent_dim, generator=source)
    parts = [generate(generator, z[start : start + batch_size]) for start in range(0, n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, generator.size, generator.size, 3), np.uint8)


def load_generator(class_dir: str | Path, class_name: str | None = None) -> Generator | OneClass:
    """The trained generator of a class run folder (from its final weights, else its checkpoint): ``z -> image``.

    For a projected-GAN run folder (one generator for all classes) ``class_name`` picks the class.
    """
    import json

    from hematovision.gan.train_projected import load_projected, projected_classes

    class_dir = Path(class_dir)
    classes = projected_classes(class_dir)
    if classes is not None:
        if class_name not in classes:
            raise HematoVisionError(f"{class_dir}: the projected GAN draws {classes}, not {class_name!r}")
        generator, _ = load_projected(class_dir)
        return OneClass(generator, classes.index(class_name)).eval()
    card_path, weights_path, checkpoint_path = class_dir / CARD_FILE, class_dir / GENERATOR_FILE, class_dir / CHECKPOINT
    if card_path.exists() and weights_path.exists():
        from safetensors.torch import load_file

        config = GanConfig.from_dict(json.loads(card_path.read_text())["config"])
        state = load_file(str(weights_path))
    elif checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        config, state = GanConfig.from_dict(checkpoint["config"]), checkpoint["generator"]
        log.warning("%s: training has not finished; sampling from the checkpoint at iteration %d",
                    class_dir, checkpoint["iteration"])
    else:
        raise HematoVisionError(f"{class_dir} holds no trained GAN ({GENERATOR_FILE} or {CHECKPOINT})")
    generator = Generator(config.size, config.latent_dim, config.width)
    generator.load_state_dict(state)
    return generator.eval()


def find_class_runs(run_dir: str | Path) -> dict[str, Path]:
    """Class name → class run folder, for a run made by ``hematovision gan train``.

    A run folder is either one class's folder or a parent holding one folder per class.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HematoVisionError(f"GAN run folder not found: {run_dir}")

    def is_class_run(path: Path) -> bool:
        return any((path / name).exists() for name in (GENERATOR_FILE, CHECKPOINT))

    if is_class_run(run_dir):
        from hematovision.gan.train_projected import projected_classes

        classes = projected_classes(run_dir)  # one generator for all classes
        return {name: run_dir for name in classes} if classes is not None else {_class_of(run_dir): run_dir}
    runs = {_class_of(path): path for path in sorted(run_dir.iterdir()) if path.is_dir() and is_class_run(path)}
    if not runs:
        raise HematoVisionError(f"{run_dir} holds no GAN runs (no {GENERATOR_FILE} or {CHECKPOINT} in it or its sub-folders)")
    return runs


def _class_of(class_dir: Path) -> str:
    import json

    card = class_dir / CARD_FILE
    if card.exists():
        return str(json.loads(card.read_text())["class_name"])
    return class_dir.name


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")
    path.chmod(0o644)  # a dataset for others to read; the temporary file starts private


def write_samples(run_dir: str | Path, n: int, out_dir: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    """Write ``n`` PNGs per class into ``out_dir/<class>/``, a folder any dataset loader reads.

    Each class draws from its own seed (``seed`` + a hash of the class name), so adding a
    class never changes another's images.
    """
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {}
    for class_name, class_dir in find_class_runs(run_dir).items():
        generator = load_generator(class_dir, class_name)
        images = sample_images(generator, n, seed=class_seed(seed, class_name))
        paths = []
        for index, image in enumerate(images):
            path = out_dir / class_name / f"synthetic_{class_name}_{index:05d}.png"
            atomic_write(path, lambda tmp, image=image: _save_png(image, tmp))
            paths.append(path)
        written[class_name] = paths
        log.info("wrote %d synthetic %s images to %s", len(paths), class_name, out_dir / class_name)
    return written
