"""DCGAN networks and training: shapes, one step learns, seeded sampling, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hematovision.errors import HematoVisionError
from hematovision.gan.dcgan import Discriminator, Generator, MinibatchStd
from hematovision.gan.train import (
    GanConfig,
    build_models,
    find_class_runs,
    images_to_tensor,
    load_generator,
    random_dihedral,
    sample_images,
    tensor_to_images,
    train_class_gan,
    train_step,
)


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("stabilised", [False, True])
def test_generator_and_discriminator_shapes(size: int, stabilised: bool) -> None:
    generator = Generator(size=size, latent_dim=16, width=4)
    discriminator = Discriminator(size=size, width=4, spectral_norm=stabilised, minibatch_std=stabilised)
    images = generator(torch.randn(3, 16))
    assert images.shape == (3, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh range
    assert discriminator(images).shape == (3,)
    has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())
    assert has_batch_norm != stabilised


def test_spectral_norm_keeps_each_convolution_at_unit_gain() -> None:
    torch.manual_seed(0)
    _, discriminator = build_models(GanConfig(size=32, latent_dim=8, width=4, spectral_norm=True))
    for _ in range(30):  # each training-mode forward runs one power-iteration step
        discriminator(torch.randn(2, 3, 32, 32))
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        weight = conv.weight.detach().flatten(1)
        assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, abs=0.05)


def test_minibatch_std_channel_measures_the_batch_spread() -> None:
    same = torch.ones(4, 2, 3, 3)
    assert torch.allclose(MinibatchStd()(same)[:, 2], torch.full((4, 3, 3), 1e-4))
    two = torch.stack([torch.zeros(2, 3, 3), torch.full((2, 3, 3), 2.0)])  # std 1 everywhere
    out = MinibatchStd()(two)
    assert out.shape == (2, 3, 3, 3)
    assert torch.allclose(out[:, 2], torch.ones(2, 3, 3), atol=1e-6)


def test_configs_saved_before_the_stabilised_discriminator_load_as_plain_dcgan() -> None:
    legacy = GanConfig.from_dict({"size": 64, "width": 32, "iterations": 1500})
    assert (legacy.spectral_norm, legacy.minibatch_std, legacy.augment) == (False, False, "")
    current = GanConfig()
    assert GanConfig.from_dict(current.__dict__) == current


def test_unsupported_size_is_refused() -> None:
    with pytest.raises(ValueError, match="image size"):
        Generator(size=48)


def test_one_training_step_changes_both_networks() -> None:
    torch.manual_seed(0)
    generator, discriminator = build_models(GanConfig(size=32, latent_dim=8, width=4))
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    stats = train_step(generator, discriminator, opt_g, opt_d, torch.rand(4, 3, 32, 32) * 2 - 1)
    assert all(np.isfinite(value) for value in stats.values())
    assert all(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters()))


def test_sampling_is_seeded_and_independent_of_batch_size() -> None:
    torch.manual_seed(1)
    generator = Generator(size=32, latent_dim=8, width=4)
    first = sample_images(generator, 6, seed=3)
    assert first.shape == (6, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, sample_images(generator, 6, seed=3, batch_size=4))
    assert not np.array_equal(first, sample_images(generator, 6, seed=4))


def test_image_tensor_round_trip_and_dihedral() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    tensor = images_to_tensor(images)
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(tensor_to_images(tensor), images)
    turned = random_dihedral(tensor, np.random.default_rng(0))
    # Flips and rotations move pixels but never change the values of an image.
    for original, moved in zip(tensor, turned):
        assert torch.equal(original.flatten().sort().values, moved.flatten().sort().values)


def _tiny_images(n: int = 10, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size, 3), 230, np.uint8)
    for image in images:
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = (120, 60, 160)
    return images


def test_training_writes_a_run_and_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    torch.set_num_threads(1)
    images = _tiny_images()
    config = GanConfig(size=32, latent_dim=8, width=4, batch_size=4, iterations=4, sample_every=2, checkpoint_every=2)
    straight = train_class_gan(images, tmp_path / "straight", config, "basophil", progress=False)
    assert straight["iterations"] == 4
    for name in ("checkpoint.pt", "generator.safetensors", "gan_card.json", "losses.csv", "samples/iter_000004.png"):
        assert (tmp_path / "straight" / name).exists(), name

    half = GanConfig(**{**config.__dict__, "iterations": 2})
    train_class_gan(images, tmp_path / "resumed", half, "basophil", progress=False)
    with pytest.raises(HematoVisionError, match="--resume"):
        train_class_gan(images, tmp_path / "resumed", config, "basophil", progress=False)
    resumed = train_class_gan(images, tmp_path / "resumed", config, "basophil", resume=True, progress=False)
    assert resumed["iterations"] == 4
    a, b = load_generator(tmp_path / "straight"), load_generator(tmp_path / "resumed")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6), name
    assert find_class_runs(tmp_path / "straight") == {"basophil": tmp_path / "straight"}


def test_training_refuses_images_of_the_wrong_size(tmp_path) -> None:
    with pytest.raises(HematoVisionError, match="shape"):
        train_class_gan(_tiny_images(size=32), tmp_path, GanConfig(size=64), "monocyte", progress=False)


def test_time_budget_stops_early_and_resume_finishes(tmp_path) -> None:
    torch.set_num_threads(1)
    config = GanConfig(size=32, latent_dim=8, width=4, batch_size=4, iterations=3, checkpoint_every=100)
    card = train_class_gan(_tiny_images(), tmp_path, config, "monocyte", progress=False, max_minutes=0.0)
    # A zero budget still finishes (and checkpoints) the iteration in progress.
    assert card["iterations"] == 1 and card["stopped_early"]
    card = train_class_gan(_tiny_images(), tmp_path, config, "monocyte", resume=True, progress=False)
    assert card["iterations"] == 3 and not card["stopped_early"]


def test_resume_keeps_the_discriminator_the_run_started_with(tmp_path) -> None:
    torch.set_num_threads(1)
    plain = GanConfig(size=32, latent_dim=8, width=4, batch_size=4, iterations=2, spectral_norm=False,
                      minibatch_std=False, augment="")
    train_class_gan(_tiny_images(), tmp_path, plain, "monocyte", progress=False)
    longer = GanConfig(size=32, latent_dim=8, width=4, batch_size=4, iterations=3, spectral_norm=True)
    card = train_class_gan(_tiny_images(), tmp_path, longer, "monocyte", resume=True, progress=False)
    assert card["iterations"] == 3
    assert (card["config"]["spectral_norm"], card["config"]["minibatch_std"], card["config"]["augment"]) == (False, False, "")
