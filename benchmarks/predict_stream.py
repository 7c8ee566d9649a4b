"""Streaming inference vs loading everything first: images/s and peak RSS, same run, same images.

Usage:
    python benchmarks/predict_stream.py --run RUN_DIR [--data ../shared/data/pbc_dev] [-n 300]
    python benchmarks/predict_stream.py            # builds a small frozen EfficientNet-Lite0 run first

Each configuration runs in its own process (so peak RSS is its own) on the same first ``-n``
images of ``--data``:

* ``load-all``: what ``evaluate`` did before streaming: every image decoded and prepared
  (``load_images``, 2 threads), then predicted (``predict_reviewed(prepared=True)``);
* ``predict (old)``: what ``predict`` did: batches decoded one after the other, then predicted;
* ``stream wN``: :func:`hematovision.infer.stream.stream_predictions` with N decoding threads
  beside the model.

Then decoding alone (``load_rgb`` + ``prep.prepare``) with threads and with processes, to show
which keeps the cores busy. The machine is shared: run it niced; the report includes ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep

CONFIGS = ("load-all", "predict-old", "stream-w1", "stream-w2")


def image_paths(data: Path, n: int) -> list[Path]:
    from hematovision.predict import collect_image_paths

    paths = collect_image_paths([data])
    step = max(1, len(paths) // n)
    return paths[::step][:n]  # spread over the classes


def one(config: str, run: Path, data: Path, n: int, batch: int, threads: int) -> dict:
    """Time one configuration in this process; peak RSS from getrusage."""
    import numpy as np
    import torch

    from hematovision.data.folder import Sample, load_images
    from hematovision.infer.predictor import Predictor

    torch.set_num_threads(threads)
    paths = image_paths(data, n)
    predictor = Predictor.from_run_dir(run)
    predictor.predict(np.zeros((2, 64, 64, 3), np.uint8))  # warm-up outside the timing
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    if config == "load-all":
        loaded = load_images([Sample(p, "x") for p in paths], predictor.prep, desc="loading")
        probabilities, _ = predictor.predict_reviewed(list(loaded.images), batch, prepared=True)
    elif config == "predict-old":
        from hematovision.predict import predict_files

        probabilities = np.stack([r.probabilities for r in predict_files(predictor, paths, batch)])
    else:
        from hematovision.infer.stream import stream_predictions

        workers = int(config.removeprefix("stream-w"))
        probabilities = np.stack([r.probabilities for r in stream_predictions(predictor, paths, batch, workers)])
    wall = time.perf_counter() - start
    return {"config": config, "images": len(probabilities), "images_per_s": round(len(probabilities) / wall, 1),
            "cpu_per_wall": round((time.process_time() - cpu) / wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_load_mb": round(rss_before)}


def decode_only(run: Path, data: Path, n: int) -> list[dict]:
    """Decode + prepare alone: threads vs processes."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from hematovision.run import read_card

    prep = read_card(run).preprocessing
    paths = image_paths(data, n)
    rows = []
    for kind, workers in (("thread", 1), ("thread", 2), ("process", 2)):
        pool_type = ThreadPoolExecutor if kind == "thread" else ProcessPoolExecutor
        with pool_type(max_workers=workers) as pool:
            list(pool.map(_decode, [prep] * 2, paths[:2]))  # start the workers
            start = time.perf_counter()
            list(pool.map(_decode, [prep] * len(paths), paths, chunksize=1 if kind == "thread" else 8))
            rows.append({"decode": f"{workers} {kind}(s)", "images_per_s": round(len(paths) / (time.perf_counter() - start), 1)})
    return rows


def _decode(prep: object, path: Path) -> int:
    from hematovision.data.images import load_rgb

    return int(prep.prepare(load_rgb(path)).shape[0])  # type: ignore[attr-defined]


def make_run(data: Path, out: Path) -> Path:
    """A frozen EfficientNet-Lite0 run (224 px) fitted on 8 images per class: timing, not accuracy."""
    from hematovision.cli import main

    subset = out / "subset"
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:8]:
            (subset / folder.name / image.name).symlink_to(image.resolve())
    run = out / "run"
    assert main(["train", "--data", str(subset), "--out", str(run), "--mode", "frozen",
                 "--backbone", "efficientnet_lite0", "--epochs", "5", "--seed", "0"]) == 0
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/pbc_dev")
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="model threads (PyTorch)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.run, args.data, args.n, args.batch_size, args.threads)))
        return
    run = args.run or make_run(args.data, Path(tempfile.mkdtemp(prefix="hv-stream-")))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    for config in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--one", config, "--run", str(run), "--data", str(args.data),
                               "-n", str(args.n), "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    decode = decode_only(run, args.data, args.n)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    base = rows[0]
    print(f"\n{args.n} images of {args.data.name}, run {run} ({args.threads} model threads, batch {args.batch_size})")
    print(f"load before: {uptime}\nload after:  {uptime_after}\n")
    print("| path | images/s | CPU/wall | peak RSS MB | speed vs load-all | RSS vs load-all |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['images_per_s']} | {row['cpu_per_wall']} | {row['peak_rss_mb']} | "
              f"{row['images_per_s'] / base['images_per_s']:.2f}x | {row['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    print("\n| decoding alone | images/s |\n|---|---|")
    for row in decode:
        print(f"| {row['decode']} | {row['images_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"uptime": [uptime, uptime_after], "rows": rows, "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
