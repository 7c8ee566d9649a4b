"""Benchmark: speed of EK-means, the U-Net and the whole-field pipeline on this machine's CPU.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/segmentation_speed.py --unet-run runs/unet_zheng --out runs/seg_speed

Wall-clock time depends on what else runs on the machine, so each measurement is repeated
and the median taken, the CPU time of this process is reported beside it (less sensitive to
other processes, though not immune: shared caches and hyper-threads still slow it), and the
load average at the start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def timed(function, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median wall and CPU milliseconds of ``function()`` over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(1000 * (time.perf_counter() - wall))
        cpus.append(1000 * (time.process_time() - cpu))
    return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet-run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10, help="images of each kind to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from hematovision.data.images import load_rgb
    from hematovision.paths import shared_data_dir
    from hematovision.segment.bccd_eval import read_split
    from hematovision.segment.ekmeans import segment_ekmeans
    from hematovision.segment.field import analyze_field
    from hematovision.segment.masks import find_seg_samples, split_seg_samples
    from hematovision.segment.unet import load_unet, predict_labels

    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data not found")
    load_start = os.getloadavg()
    zheng = split_seg_samples(find_seg_samples(shared / "wbc_seg_zheng"), 0.2, 0.1, 0)["test"][: args.images]
    cells = [load_rgb(s.image_path) for s in zheng]
    frames = [load_rgb(shared / "bccd" / "JPEGImages" / f"{stem}.jpg")
              for stem in read_split(shared / "bccd", "test")[: args.images]]
    model, config = load_unet(args.unet_run)
    predict_labels(model, cells[0], config)  # warm-up

    results: dict = {"threads": args.threads, "cpu_count": os.cpu_count()}
    for name, items, function in (
        ("ekmeans_ms_per_cell_image", cells, lambda im: segment_ekmeans(im)),
        ("unet_ms_per_cell_image", cells, lambda im: predict_labels(model, im, config)),
        ("field_ms_per_bccd_frame", frames, lambda im: analyze_field(im)),
    ):
        measured = [timed(lambda im=im, f=function: f(im), args.repeats) for im in items]
        results[name] = {"wall_median": float(np.median([m[0] for m in measured])),
                         "cpu_median": float(np.median([m[1] for m in measured]))}
    results["field_frames_per_second_wall"] = 1000 / results["field_ms_per_bccd_frame"]["wall_median"]
    results["load_average_1min"] = [load_start[0], os.getloadavg()[0]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
