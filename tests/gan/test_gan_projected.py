"""The class-conditional projected GAN: its pieces, resumable training, sampling and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hematovision.cli import main
from hematovision.data.folder import scan_image_folder
from hematovision.errors import HematoVisionError
from hematovision.gan.projected import (
    ConditionalGenerator,
    OneClass,
    ProjectedDiscriminator,
    minibatch_std,
    mode_seeking_term,
)
from hematovision.gan.train import find_class_runs, load_generator, sample_images, write_samples
from hematovision.gan.train_projected import ProjectedGanConfig, load_projected, train_projected_gan

COLOURS = {"basophil": (70, 30, 120), "neutrophil": (170, 90, 170)}


def _cells(colour: tuple[int, int, int], n: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size, 3), 228, np.uint8)
    for image in images:
        r = rng.uniform(10, 18)
        image[(yy - 32) ** 2 + (xx - 32) ** 2 < r**2] = colour
    return images


def _images() -> dict[str, np.ndarray]:
    return {name: _cells(colour, seed=k) for k, (name, colour) in enumerate(COLOURS.items())}


def _tiny_config(**changes) -> ProjectedGanConfig:
    settings = {"latent_dim": 10, "width": 4, "batch_size": 4, "iterations": 4, "sample_every": 2, "checkpoint_every": 2}
    return ProjectedGanConfig(**{**settings, **changes})


def _discriminator(classifier: bool = False) -> ProjectedDiscriminator:
    torch.manual_seed(0)  # untrained features: the tests check the mechanics, not ImageNet
    return ProjectedDiscriminator(len(COLOURS), pretrained=False, classifier=classifier)


def test_generator_draws_each_class_and_every_block_reads_its_slice_of_z() -> None:
    torch.manual_seed(0)
    generator = ConditionalGenerator(3, latent_dim=20, width=4).eval()
    z, labels = torch.randn(2, 20), torch.tensor([0, 2])
    out = generator(z, labels)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    with torch.no_grad():  # give the (zero-initialised) conditioning weights something to pass on
        for block in generator.blocks:
            block.bn2.bias.weight.normal_()
    last_slice = z.clone()
    last_slice[:, -generator.slice:] += 1  # only the 64-px block reads these
    assert not torch.allclose(generator(z, labels), generator(last_slice, labels))
    one = OneClass(generator, 2)
    assert torch.allclose(one(z), generator(z, torch.tensor([2, 2])))
    assert (one.latent_dim, one.size) == (20, 64)


def test_mode_seeking_term_is_high_for_look_alikes() -> None:
    z = torch.randn(8, 10)
    same = torch.zeros(8, 3, 8, 8)
    varied = torch.randn(8, 3, 8, 8)
    assert mode_seeking_term(same, z, 2) > 100 * mode_seeking_term(varied, z, 2)


def test_minibatch_std_adds_one_channel_that_is_zero_for_identical_images() -> None:
    h = torch.ones(8, 5, 4, 4)
    out = minibatch_std(h)
    assert out.shape == (8, 6, 4, 4) and out[:, -1].abs().max() == 0
    assert minibatch_std(torch.randn(6, 5, 4, 4)).shape == (6, 6, 4, 4)  # 6 is not a multiple of 4


def test_training_resumes_exactly_and_writes_a_run_folder(tmp_path) -> None:
    torch.set_num_threads(1)
    straight = train_projected_gan(_images(), tmp_path / "straight", _tiny_config(), progress=False,
                                   discriminator=_discriminator())
    assert straight["iterations"] == 4 and straight["classes"] == ["basophil", "neutrophil"]
    assert straight["num_train_images"] == {"basophil": 6, "neutrophil": 6}
    train_projected_gan(_images(), tmp_path / "resumed", _tiny_config(iterations=2), progress=False,
                        discriminator=_discriminator())
    resumed = train_projected_gan(_images(), tmp_path / "resumed", _tiny_config(), resume=True, progress=False,
                                  discriminator=_discriminator())
    assert resumed["iterations"] == 4
    a, _ = load_projected(tmp_path / "straight")
    b, _ = load_projected(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "straight" / "samples" / "iter_000004.png").exists()
    assert len((tmp_path / "straight" / "losses.csv").read_text().splitlines()) == 5


def test_auxiliary_classifier_learns_the_classes_and_its_run_resumes(tmp_path) -> None:
    torch.set_num_threads(1)
    discriminator = _discriminator(classifier=True)
    images = _images()
    x = torch.cat([torch.from_numpy(images[name]).permute(0, 3, 1, 2).float() / 127.5 - 1 for name in COLOURS])
    y = torch.arange(len(COLOURS)).repeat_interleave(6)
    logits, classes = discriminator.judge(x, y)
    assert logits.shape == (12,) and classes is not None and classes.shape == (12, len(COLOURS))
    assert discriminator(x, y).shape == (12,) and _discriminator().judge(x, y)[1] is None
    optimiser = torch.optim.Adam(discriminator.classifier.parameters(), 1e-2)
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(discriminator.judge(x, y)[1], y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert (discriminator.judge(x, y)[1].argmax(1) == y).all()

    config = _tiny_config(class_loss=0.5)
    train_projected_gan(images, tmp_path / "run", _tiny_config(class_loss=0.5, iterations=2), progress=False,
                        discriminator=_discriminator(classifier=True))
    card = train_projected_gan(images, tmp_path / "run", config, resume=True, progress=False,
                               discriminator=_discriminator(classifier=True))
    assert card["iterations"] == 4 and card["config"]["class_loss"] == 0.5
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["discriminator"]
    assert any(key.startswith("classifier.") for key in saved)
    # One optimiser group without a classifier, as in checkpoints saved before the option existed.
    train_projected_gan(images, tmp_path / "plain", _tiny_config(iterations=1), progress=False,
                        discriminator=_discriminator())
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    assert len(plain["opt_d"]["param_groups"]) == 1
    assert len(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["opt_d"]["param_groups"]) == 2
    with pytest.raises(ValueError, match="classifier exactly when"):
        train_projected_gan(images, tmp_path / "other", config, progress=False, discriminator=_discriminator())
    with pytest.raises(HematoVisionError, match="--class-loss"):
        train_projected_gan(images, tmp_path / "other", _tiny_config(class_loss=-1), progress=False)


def test_training_refuses_what_it_cannot_do(tmp_path) -> None:
    with pytest.raises(HematoVisionError, match="twice the number of classes"):
        train_projected_gan(_images(), tmp_path, _tiny_config(batch_size=2), progress=False)
    with pytest.raises(HematoVisionError, match="64-px"):
        train_projected_gan(_images(), tmp_path, _tiny_config(size=32), progress=False)
    with pytest.raises(HematoVisionError, match="shape"):
        train_projected_gan({"basophil": _cells(COLOURS["basophil"], size=32), "neutrophil": _cells((1, 2, 3))}, tmp_path,
                            _tiny_config(), progress=False, discriminator=_discriminator())
    train_projected_gan(_images(), tmp_path / "run", _tiny_config(iterations=1), progress=False, discriminator=_discriminator())
    with pytest.raises(HematoVisionError, match="--resume"):
        train_projected_gan(_images(), tmp_path / "run", _tiny_config(), progress=False, discriminator=_discriminator())
    other = {"basophil": _cells((1, 2, 3)), "monocyte": _cells((4, 5, 6))}
    with pytest.raises(HematoVisionError, match="not a projected GAN of classes"):
        train_projected_gan(other, tmp_path / "run", _tiny_config(), resume=True, progress=False,
                            discriminator=_discriminator())


def test_sample_and_report_read_one_generator_for_all_classes(tmp_path) -> None:
    torch.set_num_threads(1)
    train_projected_gan(_images(), tmp_path / "run", _tiny_config(iterations=2), progress=False,
                        discriminator=_discriminator())
    runs = find_class_runs(tmp_path / "run")
    assert runs == {"basophil": tmp_path / "run", "neutrophil": tmp_path / "run"}
    drawn = sample_images(load_generator(runs["neutrophil"], "neutrophil"), 3, seed=1)
    assert drawn.shape == (3, 64, 64, 3) and drawn.dtype == np.uint8
    assert np.array_equal(drawn, sample_images(load_generator(runs["neutrophil"], "neutrophil"), 3, seed=1))
    with pytest.raises(HematoVisionError, match="not 'monocyte'"):
        load_generator(tmp_path / "run", "monocyte")
    written = write_samples(tmp_path / "run", 2, tmp_path / "synthetic")
    assert {name: len(paths) for name, paths in written.items()} == {"basophil": 2, "neutrophil": 2}
    assert scan_image_folder(tmp_path / "synthetic").class_names == ["basophil", "neutrophil"]


def test_cli_trains_and_samples_a_projected_run(tmp_path, capsys) -> None:
    for name, colour in COLOURS.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for i, image in enumerate(_cells(colour, n=4, size=80)):
            Image.fromarray(image).save(tmp_path / "data" / name / f"{i}.png")
    train = ["gan", "train", "--arch", "projected", "--data", str(tmp_path / "data"), "--all", "--iterations", "2",
             "--width", "4", "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert main([*train, "--out", str(tmp_path / "run")]) == 0
    card = json.loads((tmp_path / "run" / "gan_card.json").read_text())
    assert card["kind"] == "projected" and card["iterations"] == 2 and card["config"]["mode_seeking"] == 1.0
    assert main(["gan", "sample", str(tmp_path / "run"), "--n", "2", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s" / "neutrophil").glob("*.png"))) == 2
    capsys.readouterr()
    assert main([*train, "--out", str(tmp_path / "x"), "--batch-size", "2"]) == 2
    assert "twice the number of classes" in capsys.readouterr().err
    assert main([*train, "--out", str(tmp_path / "x"), "--spectral-norm"]) == 2
    assert "DCGAN options" in capsys.readouterr().err
    single = [a for a in train if a != "--all"]
    assert main([*single, "--class", "basophil", "--out", str(tmp_path / "x")]) == 2
    assert "use --all" in capsys.readouterr().err
