"""Batched inference throughput: PyTorch eager vs ONNX Runtime (fp32, and INT8 when exported), same run.

Usage:
    python benchmarks/onnx_throughput.py --model RUN_DIR            # a trained run (exported or not)
    python benchmarks/onnx_throughput.py --backbone efficientnet_lite0   # timing only, untrained head

Each configuration runs for ``--seconds`` after a warm-up; images/s and ms per batch are
reported as a Markdown table (and JSON with ``--json``). The machine is shared, so run it
niced and read the numbers as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# OpenMP threads that spin while waiting burn whole cores on a shared machine (PyTorch eager went
# from ~20 to >1000 CPU-ms per image here); passive waiting must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch


def load(args: argparse.Namespace) -> tuple[SimpleNamespace, Path]:
    if args.model:
        from hematovision.infer.predictor import Predictor

        return Predictor.from_run_dir(args.model), Path(args.model)
    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model, get_model_info

    info = get_model_info(args.backbone)
    model = create_model(args.backbone, args.num_classes, pretrained=info.offline_weights).eval()
    prep = Preprocessing(args.image_size or info.input_size, info.mean, info.std)
    return SimpleNamespace(model=model, prep=prep, class_names=[str(i) for i in range(args.num_classes)]), Path(
        tempfile.mkdtemp(prefix="hv-bench-"))


def timed(run, batch: np.ndarray, seconds: float) -> dict[str, float]:
    run(batch)  # warm-up (allocations, kernel selection)
    run(batch)
    durations = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        run(batch)
        durations.append(time.perf_counter() - tick)
    cpu = time.process_time() - cpu_start
    total = float(np.sum(durations))
    images = len(durations) * len(batch)
    # CPU time per image (all threads) hardly depends on other load; wall-clock throughput does.
    return {"images_per_s": images / total, "ms_per_batch": 1000 * float(np.median(durations)),
            "batches": len(durations), "cpu_ms_per_image": 1000 * cpu / images}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run folder (uses its model.onnx / model.int8.onnx when present)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="registered model when no --model")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8", action="store_true", help="quantise (random calibration) when no int8 file exists")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from hematovision.data.transforms import normalize
    from hematovision.export.onnx import export_onnx
    from hematovision.infer.exported import onnx_session

    torch.set_num_threads(args.threads)
    predictor, run_dir = load(args)
    prep = predictor.prep
    onnx_path = run_dir / "model.onnx"
    if not onnx_path.is_file():
        export_onnx(predictor.model, prep.image_size, onnx_path)
    sessions = {"onnxruntime fp32": onnx_session(onnx_path, args.threads)}
    int8_path = run_dir / "model.int8.onnx"
    if args.int8 and not int8_path.is_file():
        from hematovision.export.quantize import quantize_int8

        calibration = np.random.default_rng(0).integers(0, 256, (32, prep.image_size, prep.image_size, 3), np.uint8)
        quantize_int8(onnx_path, int8_path, calibration, prep)
    if int8_path.is_file():
        sessions["onnxruntime int8"] = onnx_session(int8_path, args.threads)

    rng = np.random.default_rng(0)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        images = rng.integers(0, 256, (batch_size, prep.image_size, prep.image_size, 3), dtype=np.uint8)
        inputs = normalize(images, prep)

        def run_torch(x: torch.Tensor) -> None:
            with torch.inference_mode():
                predictor.model(x)

        rows.append({"backend": "pytorch eager", "batch": batch_size, **timed(run_torch, inputs, args.seconds)})
        for name, session in sessions.items():
            feed = inputs.numpy()
            rows.append({"backend": name, "batch": batch_size,
                         **timed(lambda x, s=session: s.run(None, {"input": x}), feed, args.seconds)})
            print(f"batch {batch_size:>3} {name}: {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr)

    load_average = os.getloadavg()[0]
    print(f"\nModel: {args.model or args.backbone}, input {prep.image_size} px, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, load average at end {load_average:.1f}\n")
    print("| backend | batch | images/s (measured) | ms per batch | CPU ms per image | upper bound on 2 idle cores, images/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['backend']} | {row['batch']} | {row['images_per_s']:.1f} | {row['ms_per_batch']:.1f} | "
              f"{row['cpu_ms_per_image']:.1f} | {2000 / row['cpu_ms_per_image']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model or args.backbone, "image_size": prep.image_size,
                                               "threads": args.threads, "load_average": load_average,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
