"""The one training loop, its optimizer/loss factory and the one feature cache, at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hematovision.bench.recipes import Recipe
from hematovision.train.features import FeatureStore
from hematovision.train.finetune import FINETUNE_LOSSES
from hematovision.train.loop import evaluate, predict, train_one_epoch
from hematovision.train.optim import make_loss, make_optimizer, warmup_cosine_factor

pytestmark = pytest.mark.usefixtures("one_thread")

FINETUNE_OPTIMIZER = dict(sgd_nesterov=True, rmsprop_alpha=0.99, rmsprop_eps=1e-8, fused=False)


def test_each_callers_optimizer_numbers_are_kept() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    adamw = make_optimizer(params, "adamw", lr=1e-3, weight_decay=0.02, **FINETUNE_OPTIMIZER)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.02
    sgd = make_optimizer(params, "sgd", lr=0.1, weight_decay=0.0, **FINETUNE_OPTIMIZER)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    rmsprop = make_optimizer(params, "rmsprop", lr=0.1, weight_decay=0.0, **FINETUNE_OPTIMIZER)
    assert (rmsprop.defaults["alpha"], rmsprop.defaults["eps"]) == (0.99, 1e-8)
    # The papers' recipes: AdamW decay 0.05 and the fused kernel, plain momentum SGD, Keras' RMSprop.
    bench_adamw = Recipe(optimizer="adamw").make_optimizer(params)
    assert bench_adamw.defaults["weight_decay"] == 0.05 and bench_adamw.defaults["fused"]
    assert Recipe(optimizer="adam").make_optimizer(params).defaults["weight_decay"] == 0.0
    assert not Recipe(optimizer="sgd").make_optimizer(params).defaults["nesterov"]
    keras = Recipe(optimizer="rmsprop").make_optimizer(params).defaults
    assert (keras["alpha"], keras["eps"]) == (0.9, 1e-7)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(params, "lion", lr=0.1, weight_decay=0.0, **FINETUNE_OPTIMIZER)


def test_the_two_hinge_losses_keep_their_names_and_meanings() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.8], [0.0, 3.0, -1.0]])
    target = torch.tensor([0, 2])
    # Sample 0: violations 0.5 (class 1) and 0.8 (class 2); sample 1: 5.0 (class 1) and 0.0 (class 0 gives 2.0).
    crammer_singer = make_loss(FINETUNE_LOSSES["hinge"])(logits, target)
    assert crammer_singer.item() == pytest.approx((0.8 + 5.0) / 2)  # the largest violation only
    weston_watkins = Recipe(loss="hinge").make_loss()(logits, target)
    assert weston_watkins.item() == pytest.approx(((0.5 + 0.8) / 3 + (2.0 + 5.0) / 3) / 2)  # every violation / K
    weight = torch.tensor([1.0, 1.0, 3.0])
    weighted = make_loss("crammer_singer_hinge", class_weight=weight)(logits, target)
    assert weighted.item() == pytest.approx((0.8 + 3 * 5.0) / 4)


def test_warmup_cosine_factor() -> None:
    assert [warmup_cosine_factor(step, 2, 6) for step in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine_factor(2, 2, 6) == pytest.approx(1.0)
    assert warmup_cosine_factor(6, 2, 6) == pytest.approx(0.01)


def test_train_one_epoch_keeps_frozen_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    model = nn.Sequential(frozen, nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    before = frozen[1].running_mean.clone()
    batches = [(torch.randn(4, 3, 6, 6) + 5, torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), "adam", lr=1e-2,
                               weight_decay=0.0, **FINETUNE_OPTIMIZER)
    stats = train_one_epoch(model, batches, make_loss("cross_entropy"), optimizer)
    assert torch.equal(frozen[1].running_mean, before) and stats["samples"] == 12 and np.isfinite(stats["loss"])
    scores = evaluate(model, batches)
    assert set(scores) == {"loss", "accuracy", "balanced_accuracy"}
    assert predict(model, (inputs for inputs, _ in batches)).shape == (12, 2)


def test_feature_store_is_keyed_by_file_content(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store")
    keys = ["a", "b", "a"]
    assert store.missing(keys) == [0, 1]  # a repeated file is computed once
    store.add(["a", "b"], np.array([[1.0], [2.0]], np.float32), seconds=2.0)
    again = FeatureStore(tmp_path / "store")
    assert again.missing(["b", "c"]) == [1] and again.seconds_per_row == 1.0
    np.testing.assert_array_equal(again.get(keys), [[1.0], [2.0], [1.0]])


def test_feature_store_written_with_path_keys_is_rekeyed(tmp_path: Path) -> None:
    import hashlib

    image, gone = tmp_path / "x.png", tmp_path / "gone.png"
    image.write_bytes(b"pixels")
    stat = image.stat()
    folder = tmp_path / "old"
    folder.mkdir()
    np.save(folder / "rows.npy", np.array([[7.0], [8.0]], np.float16))
    (folder / "index.json").write_text(json.dumps({f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}": 1,
                                                   f"{gone}|3|4": 0}))
    (folder / "meta.json").write_text(json.dumps({"seconds_per_row": 0.5, "shape": [2, 1]}))
    store = FeatureStore(folder)
    digest = hashlib.sha256(b"pixels").hexdigest()
    assert store.index == {digest: 1} and store.get([digest]).tolist() == [[8.0]]
    assert json.loads((folder / "meta.json").read_text())["keys"] == "sha256"
