"""Speed and memory of HematoVision on this machine, beside a VGG19 forward pass in the same run.

Measures, on random 224 px inputs (speed does not depend on content):
  * frozen feature extraction, images/s (EfficientNet-Lite0 pooled multi-stage features);
  * head fit, seconds (logistic regression on 3,600 x D features, the size of pbc_dev's train split);
  * fine-tuning, seconds per pbc_dev epoch at 128 px (3,589 images), from timed steps;
  * prediction, images/s through the saved frozen network (batch 32);
  * VGG19 forward (random init, the papers' backbone), images/s, as the baseline;
  * peak resident memory of `hematovision train` (frozen) and `hematovision predict` subprocesses,
    on a synthetic 120-image set or, with --data, on a real dataset (e.g. ../shared/data/pbc_dev).

Usage: python benchmarks/speed.py [--threads 2] [--data DIR] [--out benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def images_per_second(fn, batch: int, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.perf_counter() - start)


def vgg19_forward_rate(batch: int) -> float:
    """Images/s of a VGG19 forward pass (random init), the baseline; the model is freed on return."""
    from hematovision.models import create_model

    vgg = create_model("vgg19", num_classes=8, pretrained=False).eval().to(memory_format=torch.channels_last)
    x224 = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return images_per_second(lambda: vgg(x224), batch, repeats=2)


# Runs a command and prints its peak RSS (kB). It runs in a small process of its own because a
# forked child starts with its parent's peak RSS, and this benchmark's own process holds VGG19.
_MEASURE = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run a command; return (its own peak RSS in MB, wall seconds)."""
    start = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    code, max_rss_kb = map(int, output.stdout.split())
    if code != 0:
        raise subprocess.CalledProcessError(code, command)
    return max_rss_kb / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--data", type=Path,
                        help="measure peak memory on this class-folder dataset (default: 120 synthetic images)")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory part; other results in --out are kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results.update(measure_memory(args.data))
        write_results(results, args.out)
        return

    from hematovision.models import create_model
    from hematovision.models.frozen import FrozenClassifier
    from hematovision.train.features import FeatureExtractor
    from hematovision.train.frozen import fit_head

    results: dict = {"threads": args.threads, "torch": torch.__version__}
    batch = 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)

    results["vgg19_forward_images_per_s"] = vgg19_forward_rate(batch)

    extractor = FeatureExtractor("efficientnet_lite0", 224)
    results["feature_extraction_images_per_s"] = images_per_second(lambda: extractor.extract(images), batch)

    dim = extractor.module.num_features
    features = rng.normal(size=(3600, dim)).astype(np.float32)
    labels = np.arange(3600) % 8
    head = FrozenClassifier(extractor.module, dim, 8)
    start = time.perf_counter()
    fit_head(head, features, labels, features[:500], labels[:500], 8, head="logreg", c_grid=(0.05,))
    results["head_fit_seconds"] = time.perf_counter() - start

    model = create_model("efficientnet_lite0", num_classes=8, pretrained=True).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x128 = torch.randn(batch, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    target = torch.as_tensor(labels[:batch])

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x128), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_rate = images_per_second(step, batch, repeats=3)
    results["finetune_images_per_s_128px"] = train_rate
    results["finetune_seconds_per_pbc_epoch_128px"] = 3589 / train_rate

    with torch.inference_mode():
        head.eval().to(memory_format=torch.channels_last)
        from hematovision.data.transforms import Preprocessing, normalize

        prep = Preprocessing(224, (0.5,) * 3, (0.5,) * 3)
        results["predict_images_per_s"] = images_per_second(
            lambda: head(normalize(images, prep).contiguous(memory_format=torch.channels_last)), batch)

    for key in ("feature_extraction_images_per_s", "finetune_images_per_s_128px", "predict_images_per_s"):
        results[key.replace("_images_per_s", "_vs_vgg19_forward")] = results[key] / results["vgg19_forward_images_per_s"]

    results.update(measure_memory(args.data))
    write_results(results, args.out)


def measure_memory(data: Path | None) -> dict:
    """Peak memory and wall time of the real ``train`` (frozen) and ``predict`` commands."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic import make_dataset

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        name = data.name if data else "synthetic_120_images"
        data = data or make_dataset(Path(tmp) / "data", per_class=40, size=128)
        cli = [sys.executable, "-m", "hematovision"]
        rss, seconds = peak_rss_mb(cli + ["train", "--data", str(data), "--out", f"{tmp}/run", "--mode", "frozen"])
        results[f"train_frozen_peak_rss_mb_{name}"] = rss
        results[f"train_frozen_wall_seconds_{name}"] = seconds
        rss, seconds = peak_rss_mb(cli + ["predict", f"{tmp}/run", str(data), "--out", f"{tmp}/p.csv"])
        results[f"predict_peak_rss_mb_{name}"] = rss
        results[f"predict_wall_seconds_{name}"] = seconds
    return results


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:{width}}  {value:.2f}" if isinstance(value, float) else f"{key:{width}}  {value}")


if __name__ == "__main__":
    main()
