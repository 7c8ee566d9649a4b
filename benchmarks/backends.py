"""Every inference backend of a run in ONE process on the same images: speed, and accuracy against fp32.

Usage:
    nice python benchmarks/backends.py RUN_DIR [--batch-sizes 8,32] [--rounds 5] [--json OUT]

Measured, for the run (the recommended model is a frozen EfficientNet-Lite0 at 224 px):

* **images/s** of PyTorch (``Predictor``, what ``predict --backend torch`` runs), ONNX Runtime fp32
  (``model.onnx``), ONNX Runtime INT8 (``model.int8.onnx`` when fresh, else quantised here with the
  default recipe on the same 200 seeded training images as ``export --int8``), OpenVINO at the CPU
  plugin's default precision (bf16 on AVX512-BF16/AMX CPUs: what ``auto`` runs) and OpenVINO in
  strict f32, at each batch size. Each round times every backend back to back on the same decoded
  batch (normalisation included, decoding not), so load changes on a shared machine hit all of them;
  medians over rounds, and per-round speed-ups against ONNX Runtime fp32.
* a **VGG19 forward pass** (torchvision ``vgg19(weights=None)``: random weights, since the papers'
  ImageNet weights are hub-only and this machine is offline; speed only) at 224 px, the issue's
  baseline, in the same process.
* **accuracy** of every backend on the run's test split (``--test-limit`` for a quick look) and its
  change and agreement against ONNX Runtime fp32.

The issue's targets are printed with the numbers: batched predict >= 150 images/s for the recommended
model and >= 40x the VGG19 forward pass; a reduced-precision backend by default only if it loses
<= 0.5 points and is >= 1.5x ONNX Runtime fp32. Threads: ``--threads`` (default 2) for every backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hematovision.threads import configure

configure()  # the CLI's thread environment (before torch loads), so the numbers are what users get

import numpy as np  # noqa: E402
import torch  # noqa: E402

Forward = Callable[[np.ndarray], object]


def rate(forward: Forward, batch: np.ndarray, images: int) -> float:
    """Images/s of ``forward`` on ``batch``, over at least ``images`` images (after one warm-up call)."""
    forward(batch)
    done, start = 0, time.perf_counter()
    while done < images:
        forward(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def vgg19_rate(batch_size: int, images: int, threads: int) -> float:
    """Images/s of a torchvision VGG19 forward pass, random weights, 224 px (speed only)."""
    from torchvision.models import vgg19

    torch.set_num_threads(threads)
    model = vgg19(weights=None).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return rate(lambda _: model(x), np.zeros(batch_size), images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch-sizes", default="8,32", help="comma-separated (default 8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size (default 5)")
    parser.add_argument("--images-per-round", type=int, default=96,
                        help="images per backend per round (at least one batch; default 96)")
    parser.add_argument("--vgg-images", type=int, default=32, help="images timed for VGG19 per batch size (default 32)")
    parser.add_argument("--test-limit", type=int, help="score only the first N test images (quick runs)")
    parser.add_argument("--calibration", type=int, default=200, help="training images for INT8 calibration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from hematovision.data.folder import label_indices, load_images
    from hematovision.export.calibrate import read_run_split
    from hematovision.export.openvino_ir import export_openvino
    from hematovision.export.quantize import quantize_int8
    from hematovision.infer.backend import stale_exports
    from hematovision.infer.exported import onnx_forward, onnx_session, openvino_forward, openvino_model, openvino_precision
    from hematovision.infer.predictor import Predictor
    from hematovision.run import INT8_FILE, ONNX_FILE

    torch.set_num_threads(args.threads)
    run = args.run_dir
    predictor = Predictor.from_run_dir(run, backend="torch")
    prep, views = predictor.prep, predictor.views
    if not (run / ONNX_FILE).is_file() or "onnx" in stale_exports(run, views):
        sys.exit(f"{run / ONNX_FILE} is missing or stale: run `hematovision export {run} --no-calibrate` first")
    splits = read_run_split(run)
    test = splits["test"][: args.test_limit] if args.test_limit else splits["test"]
    loaded = load_images(test, prep, desc="test images")
    images, labels = loaded.images, label_indices(loaded.samples, predictor.class_names)

    backends: dict[str, Forward] = {}
    backends["torch"] = lambda batch: predictor.logits(batch, batch_size=len(batch), prepared=True)
    backends["onnx_fp32"] = onnx_forward(onnx_session(run / ONNX_FILE, args.threads), prep)
    precision = "?"
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = run / INT8_FILE
        if not int8_path.is_file() or "onnx" in stale_exports(run, views):
            rng = np.random.default_rng(0)  # the same choice as `hematovision export --int8`
            train = splits["train"]
            chosen = [train[i] for i in sorted(rng.choice(len(train), min(args.calibration, len(train)), replace=False))]
            calibration = load_images(chosen, prep, desc="int8 calibration images").images
            int8_path = quantize_int8(run / ONNX_FILE, Path(tmp) / INT8_FILE, calibration, prep)
        backends["onnx_int8"] = onnx_forward(onnx_session(int8_path, args.threads), prep)
        try:
            xml = export_openvino(run / ONNX_FILE, Path(tmp) / "model.xml")  # what `hematovision export` writes
            compiled = openvino_model(xml, args.threads)
            precision = openvino_precision(compiled)
            backends[f"openvino_{precision}"] = openvino_forward(compiled, prep)
            if precision != "f32":
                backends["openvino_f32"] = openvino_forward(openvino_model(xml, args.threads, "f32"), prep)
        except ImportError as error:  # MissingDependencyError: the extra is not installed
            print(f"OpenVINO not measured: {error}", file=sys.stderr)
        torch.set_num_threads(args.threads)
        results = measure(backends, images, labels, args)
    results["vgg19_forward_random_weights"] = {
        str(b): vgg19_rate(b, max(b, args.vgg_images), args.threads) for b in parse_sizes(args.batch_sizes)}
    results.update(run=str(run), test_images=len(labels), threads=args.threads, openvino_precision=precision,
                   image_size=prep.image_size, views=views, load_average_end=os.getloadavg()[0])
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def parse_sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size.strip()]


def measure(backends: dict[str, Forward], images: np.ndarray, labels: np.ndarray,
            args: argparse.Namespace) -> dict[str, object]:
    """Accuracy of every backend on all ``images``, then images/s in alternating rounds per batch size."""
    def logits_of(output: object) -> np.ndarray:
        return np.asarray(output[0] if isinstance(output, tuple) else output)

    predictions = {name: np.concatenate([logits_of(forward(images[i:i + 32])).argmax(1)
                                         for i in range(0, len(images), 32)])
                   for name, forward in backends.items()}
    reference = predictions["onnx_fp32"]
    accuracy = {name: {"accuracy": float((p == labels).mean()),
                       "change_pt": 100 * float((p == labels).mean() - (reference == labels).mean()),
                       "agreement_with_fp32": float((p == reference).mean())} for name, p in predictions.items()}
    speed: dict[str, dict[str, dict[str, float]]] = {}
    for size in parse_sizes(args.batch_sizes):
        batch = np.resize(images, (size, *images.shape[1:]))  # repeats the images when there are fewer
        rounds = []
        for _ in range(args.rounds):
            rounds.append({name: rate(forward, batch, max(size, args.images_per_round))
                           for name, forward in backends.items()})
            print(f"batch {size}: " + ", ".join(f"{n} {r:.0f}" for n, r in rounds[-1].items())
                  + f" images/s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        speed[str(size)] = {name: {"images_per_s": statistics.median(r[name] for r in rounds),
                                   "speedup_vs_onnx_fp32": statistics.median(r[name] / r["onnx_fp32"] for r in rounds)}
                            for name in backends}
    return {"accuracy": accuracy, "speed": speed}


def report(results: dict) -> None:
    print(f"\n{results['run']}: {results['test_images']} test images, {results['image_size']} px, "
          f"{results['threads']} threads, load average at the end {results['load_average_end']:.1f}\n")
    sizes = list(results["speed"])
    print("| backend | accuracy | change vs fp32 (pt) | agreement | "
          + " | ".join(f"img/s b{s} | × ORT fp32 b{s}" for s in sizes) + " |")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(sizes))
    for name, acc in results["accuracy"].items():
        cells = " | ".join(f"{results['speed'][s][name]['images_per_s']:.0f} | "
                           f"{results['speed'][s][name]['speedup_vs_onnx_fp32']:.2f}×" for s in sizes)
        print(f"| {name} | {acc['accuracy']:.4f} | {acc['change_pt']:+.2f} | {acc['agreement_with_fp32']:.4f} | {cells} |")
    vgg = results["vgg19_forward_random_weights"]
    print("| VGG19 forward (random weights, speed only) | | | | "
          + " | ".join(f"{vgg[s]:.1f} | " for s in sizes) + " |")
    print("\nTargets (issue 14):")
    # What `auto` runs after a default export: OpenVINO at the plugin's precision within the rule, else ONNX fp32.
    openvino = f"openvino_{results['openvino_precision']}"
    auto = openvino if results["accuracy"].get(openvino, {}).get("change_pt", -100.0) >= -0.5 else "onnx_fp32"
    for size in sizes:
        speed = results["speed"][size][auto]["images_per_s"]
        print(f"  batch {size}: auto's backend {auto}: {speed:.0f} images/s "
              f"({'meets' if speed >= 150 else 'misses'} >= 150), {speed / vgg[size]:.0f}x VGG19 "
              f"({'meets' if speed / vgg[size] >= 40 else 'misses'} >= 40x)")
    for name, acc in results["accuracy"].items():
        if name in ("torch", "onnx_fp32") or name.endswith("_f32"):
            continue
        speedups = [results["speed"][s][name]["speedup_vs_onnx_fp32"] for s in sizes]
        ok = acc["change_pt"] >= -0.5 and min(speedups) >= 1.5
        print(f"  {name}: {acc['change_pt']:+.2f} pt, {'/'.join(f'{x:.2f}' for x in speedups)}× ORT fp32 "
              f"({'meets' if ok else 'misses'} <= 0.5 pt and >= 1.5×)")


if __name__ == "__main__":
    raise SystemExit(main())
