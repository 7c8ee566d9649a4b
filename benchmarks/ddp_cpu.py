"""Distributed fine-tuning on one CPU machine: 1 process x 2 threads vs 2 processes x 1 thread (gloo).

Both arms run the same N fine-tuning steps of EfficientNet-Lite0 (random init, 128 px) on the same
synthetic images with the same global batch, through ``hematovision.train.finetune.finetune``
(one epoch, ``max_steps_per_epoch=N``, no augmentation); the 2-process arm under
``torchrun --standalone``. Reported per arm: wall seconds of the ``finetune`` call (the N steps,
plus validation on 8 images and rank 0's checkpoint) and seconds per step; process start-up,
imports and the process-group rendezvous are excluded from that and included in
``wall_seconds_with_startup``.

Usage: python benchmarks/ddp_cpu.py [--steps 30] [--batch 32] [--out benchmarks/results/ddp_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(steps: int, batch: int, size: int) -> None:
    """One arm's training (every rank runs this); rank 0 prints one JSON line."""
    import numpy as np
    import torch

    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model, get_model_info
    from hematovision.train import distributed
    from hematovision.train.finetune import FinetuneConfig, finetune

    with distributed.session() as world:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (steps * batch, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, 5, steps * batch)
        info = get_model_info("efficientnet_lite0")
        prep = Preprocessing(size, info.mean, info.std)
        torch.manual_seed(0)
        model = create_model("efficientnet_lite0", num_classes=5, pretrained=False)
        config = FinetuneConfig(epochs=1, batch_size=batch, augment=False, max_steps_per_epoch=steps, patience=10)
        with tempfile.TemporaryDirectory() as run_dir:
            started = time.perf_counter()
            finetune(model, prep, images, labels, images[:8], labels[:8], 5, config, run_dir)
            seconds = time.perf_counter() - started
        if world.is_main:
            print(json.dumps({"processes": world.size, "threads": torch.get_num_threads(), "steps": steps,
                              "global_batch": batch, "seconds": round(seconds, 2),
                              "seconds_per_step": round(seconds / steps, 3)}))


def run_arm(processes: int, threads: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE"}
    worker_args = [__file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch), "--size", str(args.size)]
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   *worker_args]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    row = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    row["wall_seconds_with_startup"] = round(time.perf_counter() - started, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch, args.size)
        return
    load = os.getloadavg()[0]
    rows = [run_arm(1, 2, args), run_arm(2, 1, args)]
    summary = {"load_average_1min_before": round(load, 2), "cores": os.cpu_count(), "arms": rows,
               "speedup_2proc_vs_1proc": round(rows[0]["seconds"] / rows[1]["seconds"], 3)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
