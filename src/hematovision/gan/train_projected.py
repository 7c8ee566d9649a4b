"""Train the class-conditional Projected GAN (:mod:`hematovision.gan.projected`), resumably.

One run folder holds every class: ``checkpoint.pt`` (both networks, the generator's weight average,
both optimisers, RNG states, loss history), ``samples/iter_NNNNNN.png`` grids (one row per class, a
fixed set of latent vectors), ``losses.csv``, and when training ends ``generator.safetensors`` (the
weight average, which is what samples are drawn from) and ``gan_card.json`` with ``"kind":
"projected"`` and the class list. ``gan sample`` and ``gan report`` read such a folder like a folder
of per-class DCGANs (:func:`hematovision.gan.train.find_class_runs`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hematovision._io import atomic_write, write_json
from hematovision.errors import HematoVisionError
from hematovision.gan.augment import diff_augment, parse_policy
from hematovision.gan.projected import ConditionalGenerator, ProjectedDiscriminator, mode_seeking_term
from hematovision.gan.train import (
    CARD_FILE,
    CHECKPOINT,
    GENERATOR_FILE,
    images_to_tensor,
    random_dihedral,
    save_grid,
    tensor_to_images,
    write_losses,
)

log = logging.getLogger(__name__)

KIND = "projected"
# The auxiliary classifier learns faster than the critic: at the critic's rate it labelled 37 % of
# held-out real cells right (balanced) after 400 steps, at 5x 62 % (a one-off check on the split).
CLASSIFIER_LR_FACTOR = 5.0


@dataclass(frozen=True)
class ProjectedGanConfig:
    """Settings of a class-conditional Projected-GAN training (saved in its checkpoint and card).

    Attributes:
        size: image side in pixels (64 only: the discriminator's scales are set for it).
        latent_dim: length of z.
        width: generator channels at 64 px (8x at the 4x4 seed).
        batch_size: real (and fake) images per step; the classes take turns within a batch, so it
            should be at least twice the number of classes (mode seeking pairs images of one class).
        iterations: discriminator+generator update pairs.
        lr: Adam learning rate of both networks (betas 0.0 and 0.99, as in BigGAN/StyleGAN).
        ema: decay of the generator's weight average, from which samples are drawn.
        variant: EfficientNet-Lite variant of the frozen discriminator features (1: Projected GAN's).
        minibatch_std: each discriminator head sees the spread of its batch.
        mode_seeking: weight of the mode-seeking term (0: off).
        class_loss: weight of the auxiliary classifier's cross-entropy on generated cells (0: no classifier).
        hierarchical: a slice of z into every generator block.
        augment: DiffAugment operations for every image the discriminator sees.
        sample_every: save a sample grid every this many iterations.
        checkpoint_every: save a resumable checkpoint every this many iterations.
        seed: seed of the weights, batches and augmentation.
    """

    size: int = 64
    latent_dim: int = 128
    width: int = 32
    batch_size: int = 32
    iterations: int = 5000
    lr: float = 2e-4
    ema: float = 0.99
    variant: int = 1
    minibatch_std: bool = True
    mode_seeking: float = 1.0
    class_loss: float = 0.0
    hierarchical: bool = True
    augment: str = "translation,cutout"
    sample_every: int = 250
    checkpoint_every: int = 100
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> ProjectedGanConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def check(self, classes: int) -> None:
        """Refuse settings training would only fail on, in one line (HematoVisionError)."""
        if self.size != 64:
            raise HematoVisionError(f"the projected GAN draws 64-px cells; got --size {self.size}")
        if self.class_loss < 0:
            raise HematoVisionError(f"--class-loss must be 0 or more; got {self.class_loss}")
        if self.batch_size < 2 * classes:
            raise HematoVisionError(f"--batch-size must be at least twice the number of classes ({2 * classes})")
        try:
            parse_policy(self.augment)
        except ValueError as error:
            raise HematoVisionError(str(error)) from None


def build_generator(config: ProjectedGanConfig, classes: int) -> ConditionalGenerator:
    return ConditionalGenerator(classes, config.latent_dim, config.width, hierarchical=config.hierarchical)


def train_projected_gan(
    images_by_class: dict[str, np.ndarray],
    out_dir: str | Path,
    config: ProjectedGanConfig,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    discriminator: ProjectedDiscriminator | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train (or resume) one conditional generator for every class and write its run folder.

    Args:
        images_by_class: class name -> (N, 64, 64, 3) uint8 training images.
        out_dir: the run folder.
        config: training settings; on resume, ``iterations`` may be raised to train longer.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show a progress bar (rate and ETA).
        max_minutes: stop after this many minutes of training in this call; the card then says
            ``stopped_early`` and a later call with ``resume`` continues. Ctrl-C also saves first.
        discriminator: a ready discriminator (tests pass one without ImageNet weights).
        device: where the networks train (a GPU where one is lent). Every random draw stays on the
            CPU generator, which the checkpoint saves, so a resumed run repeats the same batches.

    Returns:
        The GAN card.

    Raises:
        HematoVisionError: wrong image shapes, a class without images, an existing run without
            ``resume``, or a checkpoint of other classes or another architecture.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    class_names = sorted(images_by_class)
    config.check(len(class_names))
    for name in class_names:
        shape = images_by_class[name].shape
        if len(shape) != 4 or shape[1:] != (config.size, config.size, 3) or shape[0] == 0:
            raise HematoVisionError(f"{name}: expected images of shape (N>0, {config.size}, {config.size}, 3), got {shape}")
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise HematoVisionError(f"{out_dir} already holds a GAN checkpoint; pass --resume to continue or pick another --out")
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if checkpoint_path.exists() else None
    if state is not None:
        if state.get("kind") != KIND or state["classes"] != class_names:
            raise HematoVisionError(f"{out_dir}: its checkpoint is not a projected GAN of classes {class_names}")
        saved = ProjectedGanConfig.from_dict(state["config"])
        # The networks and their training rules stay those the run was started with.
        config = ProjectedGanConfig(**{**asdict(saved), "iterations": config.iterations,
                                       "sample_every": config.sample_every, "checkpoint_every": config.checkpoint_every})

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(device)
    generator = build_generator(config, len(class_names)).to(device)
    generator_ema = copy.deepcopy(generator).eval()
    discriminator = (discriminator or ProjectedDiscriminator(len(class_names), config.variant, config.minibatch_std,
                                                             classifier=config.class_loss > 0)).to(device)
    if (discriminator.classifier is not None) != (config.class_loss > 0):
        raise ValueError("the discriminator must have a classifier exactly when config.class_loss > 0")
    opt_g = torch.optim.Adam(generator.parameters(), config.lr, betas=(0.0, 0.99))
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    groups: list[dict] = [{"params": trainable}]
    if discriminator.classifier is not None:
        # A second group only with a classifier: a run without one keeps the single group its
        # checkpoints were saved with, so runs started before the classifier existed still resume.
        classifier = {id(p) for p in discriminator.classifier.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in classifier]},
                  {"params": list(discriminator.classifier.parameters()), "lr": CLASSIFIER_LR_FACTOR * config.lr}]
    opt_d = torch.optim.Adam(groups, config.lr, betas=(0.0, 0.99))
    # Fixed latent vectors for the progress grids (8 per class), independent of the training RNG.
    fixed_z = torch.randn(8 * len(class_names), config.latent_dim, generator=torch.Generator().manual_seed(config.seed))
    fixed_z = fixed_z.to(device)
    fixed_y = torch.arange(len(class_names)).repeat_interleave(8).to(device)
    start, elapsed, history = 0, 0.0, []
    if state is not None:
        for module, key in ((generator, "generator"), (generator_ema, "generator_ema"), (discriminator, "discriminator"),
                            (opt_g, "opt_g"), (opt_d, "opt_d")):
            module.load_state_dict(state[key])  # optimiser states follow their parameters' device
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        start, elapsed, history = int(state["iteration"]), float(state["seconds"]), list(state["history"])
        log.info("resuming the projected GAN at iteration %d of %d", start, config.iterations)

    data = [images_to_tensor(images_by_class[name]).to(device) for name in class_names]
    augment = parse_policy(config.augment)

    def save_checkpoint(iteration: int) -> None:
        saved = {"kind": KIND, "classes": class_names, "config": asdict(config), "iteration": iteration,
                 "seconds": elapsed, "generator": generator.state_dict(), "generator_ema": generator_ema.state_dict(),
                 "discriminator": discriminator.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                 "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state, "history": history,
                 "num_train_images": {name: len(images_by_class[name]) for name in class_names}}
        atomic_write(checkpoint_path, lambda tmp: torch.save(saved, tmp))
        write_losses(out_dir, history)  # d_real, d_fake: mean hinge logits here, not probabilities

    # The classes take turns within every batch, in real and generated images alike.
    labels = (torch.arange(config.batch_size) % len(class_names)).to(device)
    bar = tqdm(range(start, config.iterations), desc="projected GAN", unit="it", disable=not progress,
               initial=start, total=config.iterations)
    call_started = tick = time.perf_counter()
    done = start
    try:
        for iteration in bar:
            real = torch.stack([data[k][rng.integers(len(data[k]))] for k in labels.tolist()])
            real = random_dihedral(real, rng)  # a cell has no "up": its 8 orientations are real cells too
            z = torch.randn(config.batch_size, config.latent_dim).to(device)
            fake = generator(z, labels)
            d_real, class_real = discriminator.judge(diff_augment(real, augment), labels)
            d_fake = discriminator(diff_augment(fake.detach(), augment), labels)
            loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()  # hinge loss
            if class_real is not None:  # the classifier learns from real cells only
                loss_d = loss_d + F.cross_entropy(class_real, labels)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_gen, class_gen = discriminator.judge(diff_augment(fake, augment), labels)
            loss_g = -d_gen.mean()
            if class_gen is not None:
                loss_g = loss_g + config.class_loss * F.cross_entropy(class_gen, labels)
            if config.mode_seeking:
                loss_g = loss_g + config.mode_seeking * mode_seeking_term(fake, z, len(class_names))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            with torch.no_grad():
                for averaged, current in zip(generator_ema.parameters(), generator.parameters()):
                    averaged.lerp_(current, 1 - config.ema)
                for averaged, current in zip(generator_ema.buffers(), generator.buffers()):
                    averaged.copy_(current)
            history.append([loss_d.item(), loss_g.item(), d_real.mean().item(), d_fake.mean().item()])
            bar.set_postfix(loss_d=f"{history[-1][0]:.2f}", loss_g=f"{history[-1][1]:.2f}")
            done = iteration + 1
            now = time.perf_counter()
            elapsed += now - tick
            tick = now
            out_of_time = max_minutes is not None and now - call_started >= 60 * max_minutes
            if done % config.sample_every == 0 or done == config.iterations or out_of_time:
                with torch.no_grad():
                    grid = generator_ema(fixed_z, fixed_y)
                save_grid(tensor_to_images(grid), out_dir / "samples" / f"iter_{done:06d}.png", columns=8)
            if done % config.checkpoint_every == 0 or done == config.iterations or out_of_time:
                save_checkpoint(done)
                tick = time.perf_counter()  # writing checkpoints is not training time
            if out_of_time:
                log.info("time budget of %.1f min reached at iteration %d", max_minutes, done)
                break
    except KeyboardInterrupt:
        if len(history) == done and done > start:
            save_checkpoint(done)
        raise
    finally:
        bar.close()

    from safetensors.torch import save_file

    weights = {key: value.cpu() for key, value in generator_ema.state_dict().items()}
    atomic_write(out_dir / GENERATOR_FILE, lambda tmp: save_file(weights, str(tmp)))
    last = np.mean(history[-50:], axis=0) if history else [0.0] * 4
    card = {
        "kind": KIND, "classes": class_names, "config": asdict(config), "iterations": len(history),
        "stopped_early": len(history) < config.iterations, "train_seconds": round(elapsed, 1),
        "seconds_per_iteration": round(elapsed / max(1, len(history)), 3),
        "num_train_images": {name: len(images_by_class[name]) for name in class_names},
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "last50_mean": dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), map(float, last))),
    }
    write_json(out_dir / CARD_FILE, card)
    return card


def projected_classes(run_dir: Path) -> list[str] | None:
    """The classes of a projected-GAN run folder (finished or not); ``None`` for any other folder."""
    import json

    card = run_dir / CARD_FILE
    if card.exists():
        data = json.loads(card.read_text())
    elif (run_dir / CHECKPOINT).exists():
        # Memory-mapped: only the small entries are read, not the networks' and optimisers' tensors.
        # find_class_runs and load_generator ask this of every run folder, DCGAN checkpoints included.
        data = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    else:
        return None
    return list(data["classes"]) if data.get("kind") == KIND else None


def load_projected(run_dir: str | Path) -> tuple[ConditionalGenerator, dict]:
    """The weight-averaged generator of a projected run and its card (from the checkpoint if unfinished)."""
    import json

    run_dir = Path(run_dir)
    card_path, weights_path = run_dir / CARD_FILE, run_dir / GENERATOR_FILE
    if card_path.exists() and weights_path.exists():
        from safetensors.torch import load_file

        card, weights = json.loads(card_path.read_text()), load_file(str(weights_path))
    elif (run_dir / CHECKPOINT).exists():
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
        card = {"kind": KIND, "classes": state["classes"], "config": state["config"], "iterations": int(state["iteration"]),
                "train_seconds": float(state["seconds"]), "num_train_images": state["num_train_images"]}
        weights = state["generator_ema"]
        log.warning("%s: training has not finished; sampling from the checkpoint at iteration %d", run_dir, card["iterations"])
    else:
        raise HematoVisionError(f"{run_dir} holds no trained GAN ({GENERATOR_FILE} or {CHECKPOINT})")
    generator = build_generator(ProjectedGanConfig.from_dict(card["config"]), len(card["classes"]))
    try:
        generator.load_state_dict(weights)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise HematoVisionError(f"{run_dir}: the generator's weights do not fit its card ({first_line})") from None
    return generator.eval(), card
