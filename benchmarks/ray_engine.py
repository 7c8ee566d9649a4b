"""The Ray engine against the local streaming engine: images/s, identical results, Ray's overhead.

Usage:
    python benchmarks/ray_engine.py RUN_DIR [--data ../shared/data/pbc_dev] [-n 300] [--workers 1,2]

On the same first ``-n`` images of ``--data`` (spread over the classes), each writing Parquet
shards through ``stream_to_file`` as ``hematovision predict`` does:

* ``local``: the streaming engine in this process (decoding threads beside the model, the model on
  the machine's cores, as ``predict`` runs on a quiet machine);
* ``ray wN``: ``--engine ray --ray-workers N`` on one in-process Ray started once with the machine's
  cores (its start-up is reported apart); each worker holds a model on one CPU with one decoding thread.

Per configuration, two jobs: the first half of the images, then all of them. End to end (model
loading and Ray actor start-up included, since every job pays them): wall time and images/s of the
full job. The steady rate, what scales with nodes, is the marginal one: the extra images over the
extra time between the two jobs (``wall = start-up + images / rate``; independent of how Ray
groups the images into blocks), and the start-up is what is left. Every Ray result is compared with
the local one (same labels, largest probability difference). The overhead is the local rate over the
Ray rate with the same cores. A markdown table is printed, then the numbers docs/scale.md asks for.
The machine is shared: run it niced; the report includes ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Generator, Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep


def image_paths(data: Path, n: int) -> list[Path]:
    from hematovision.predict import collect_image_paths

    paths = collect_image_paths([data])
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def timed(config: str, run: Path, paths: Sequence[Path], out: Path, batch: int, ray_workers: int | None,
          backend: str) -> dict:
    """One job end to end: load the run, predict ``paths`` into ``out``; wall time and the rows written."""
    import pyarrow.parquet as pq

    from hematovision.infer.predictor import Predictor
    from hematovision.infer.ray_engine import ray_predictions
    from hematovision.predict import stream_to_file

    start = time.perf_counter()
    predictor = Predictor.from_run_dir(run, backend=backend)
    engine = None
    if ray_workers is not None:
        def engine(todo: Sequence[Path]) -> Generator:
            return ray_predictions(predictor, run, todo, batch, ray_workers=ray_workers)
    summary = stream_to_file(predictor, paths, out, batch_size=batch, engine=engine)
    wall = time.perf_counter() - start
    return {"config": config, "images": summary.classified, "wall_s": round(wall, 2),
            "images_per_s": round(len(paths) / wall, 1), "rows": {row["file"]: row for row in pq.read_table(out).to_pylist()}}


def measured(config: str, run: Path, paths: Sequence[Path], scratch: Path, batch: int, ray_workers: int | None,
             backend: str) -> dict:
    """Half the images, then all: end-to-end numbers of the full job, marginal rate and start-up from both."""
    half = timed(config, run, paths[: len(paths) // 2], scratch / f"{config}-half.parquet".replace(" ", ""), batch,
                 ray_workers, backend)
    full = timed(config, run, paths, scratch / f"{config}.parquet".replace(" ", ""), batch, ray_workers, backend)
    extra, more_time = len(paths) - len(paths) // 2, full["wall_s"] - half["wall_s"]
    if more_time < 0.1 * full["wall_s"]:  # start-up noise larger than the work: -n too small to tell
        full.update(steady_images_per_s=None, startup_s=None, half_wall_s=half["wall_s"])
        return full
    rate = extra / more_time
    full.update(steady_images_per_s=round(rate, 1), startup_s=round(max(full["wall_s"] - len(paths) / rate, 0.0), 2),
                half_wall_s=half["wall_s"])
    return full


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def compare(reference: dict, rows: dict) -> dict:
    """Same files, same labels, the largest probability difference."""
    probability_columns = [c for c in next(iter(reference.values())) if c.startswith("p_")]
    same_files = reference.keys() == rows.keys()
    same_labels = same_files and all(reference[f]["label"] == rows[f]["label"] for f in reference)
    largest = max((abs(reference[f][c] - rows[f][c]) for f in reference if reference[f]["label"]
                   for c in probability_columns), default=0.0) if same_files else float("nan")
    return {"same_files": same_files, "same_labels": same_labels, "max_abs_dp": largest,
            "identical": same_labels and largest <= 1e-5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (e.g. the recommended model's)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/pbc_dev")
    parser.add_argument("-n", type=int, default=300, help="images")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: predict's)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to measure, comma-separated")
    parser.add_argument("--backend", default="auto", help="the run's runtime, as `predict --backend` (default auto)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import ray
    import torch

    from hematovision.infer.exported import BATCH_SIZE
    from hematovision.threads import available_cores

    args.batch_size = args.batch_size or BATCH_SIZE
    cores = available_cores()
    torch.set_num_threads(cores)
    paths = image_paths(args.data, args.n)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="hv-ray-bench-"))
    counts = [int(w) for w in args.workers.split(",")]
    results = [measured("local", args.run, paths, scratch, args.batch_size, None, args.backend)]
    print({k: v for k, v in results[-1].items() if k != "rows"}, flush=True)
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(cores, *counts), include_dashboard=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - start
    try:
        for count in counts:
            result = measured(f"ray w{count}", args.run, paths, scratch, args.batch_size, count, args.backend)
            result.update(compare(results[0]["rows"], result["rows"]))
            results.append(result)
            print({k: v for k, v in result.items() if k != "rows"}, flush=True)
    finally:
        ray.shutdown()
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    local = results[0]
    print(f"\n{len(paths)} images of {args.data.name}, run {args.run}, batch {args.batch_size}, {cores} core(s); "
          f"Ray start-up {ray_start:.1f} s (not in the rows)")
    print(f"load before: {uptime}\nload after:  {uptime_after}\n")
    print("| engine | images/s end to end | wall s (half / full) | steady images/s | start-up s | vs local (steady) "
          "| identical (max abs dp) |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        same = "reference" if row is local else f"{'yes' if row['identical'] else 'NO'} ({row['max_abs_dp']:.1e})"
        print(f"| {row['config']} | {row['images_per_s']} | {row['half_wall_s']} / {row['wall_s']} | "
              f"{row['steady_images_per_s'] or 'n/a'} | {row['startup_s'] if row['startup_s'] is not None else 'n/a'} | "
              f"{ratio(row['steady_images_per_s'], local['steady_images_per_s'])} | {same} |")
    by_workers = {int(r["config"][5:]): r for r in results[1:]}
    if by_workers.get(1, {}).get("steady_images_per_s"):
        per_worker = by_workers[1]["steady_images_per_s"]
        print(f"\nper-worker steady rate: {per_worker} images/s; a 10-node cluster of {cores}-core nodes "
              f"({10 * cores} workers) would reach at most ~{10 * cores * per_worker:.0f} images/s, before storage "
              "bandwidth and decoding limits (docs/scale.md)")
    same_cores = by_workers.get(cores)
    if same_cores is not None:
        print(f"Ray overhead with the same {cores} core(s): local {local['images_per_s']} vs ray "
              f"{same_cores['images_per_s']} images/s end to end ({local['images_per_s'] / same_cores['images_per_s']:.2f}x), "
              f"{local['steady_images_per_s'] or 'n/a'} vs {same_cores['steady_images_per_s'] or 'n/a'} steady "
              f"({ratio(local['steady_images_per_s'], same_cores['steady_images_per_s'])}; n/a: use a larger -n)")
    if args.json:
        args.json.write_text(json.dumps({"uptime": [uptime, uptime_after], "ray_start_s": ray_start,
                                         "rows": [{k: v for k, v in r.items() if k != "rows"} for r in results]},
                                        indent=2))


if __name__ == "__main__":
    main()
