"""Benchmark: what ``synchronous=FULL`` costs the server's database against ``NORMAL``.

Stores N analyses (each with ``--images`` predictions, as one upload stores them: one
``BEGIN IMMEDIATE`` transaction) through :class:`hematovision.serve.db.Database` with each
setting, in the same run, alternating blocks of ``--block`` inserts so that disk and machine
noise fall on both alike. Prints the median and p95 milliseconds per stored analysis for each
setting and the FULL/NORMAL ratio; ``--json`` also writes them.

    python benchmarks/db_synchronous.py --n 400 --dir /var/lib/hematovision   # on the server's disk

The number that matters is on the disk the server's database will live on (fsync cost is the
disk's and the file system's, not Python's): give ``--dir`` there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from hematovision.serve.db import Database, PredictionRecord

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def records(images: int, seed: int) -> list[PredictionRecord]:
    """``images`` predictions like an upload's (the values do not matter to the cost)."""
    probabilities = {name: 0.2 for name in CLASSES}
    return [PredictionRecord(f"cell_{seed}_{i}.png", f"{seed % 256:02x}/{seed:08x}{i:04x}.png", f"{seed:064x}",
                             360, 363, "neutrophil", 0.2, probabilities, None, True, ["low confidence"])
            for i in range(images)]


def time_block(db: Database, count: int, images: int, start: int) -> list[float]:
    """Milliseconds for each of ``count`` stored analyses."""
    times = []
    for i in range(count):
        batch = records(images, start + i)
        began = time.perf_counter()
        db.add_analysis("bench", "bench-model", batch)
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="analyses stored per setting")
    parser.add_argument("--images", type=int, default=8, help="predictions per analysis")
    parser.add_argument("--block", type=int, default=50, help="inserts per setting before switching")
    parser.add_argument("--dir", type=Path, help="folder for the two databases (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        databases = {mode: Database(Path(folder) / f"{mode.lower()}.db", synchronous=mode) for mode in ("NORMAL", "FULL")}
        for db in databases.values():
            time_block(db, 5, args.images, 10**6)  # warm-up: file creation and first checkpoint are not the cost
        times: dict[str, list[float]] = {mode: [] for mode in databases}
        done = 0
        while done < args.n:
            count = min(args.block, args.n - done)
            for mode, db in databases.items():
                times[mode] += time_block(db, count, args.images, done)
            done += count
        for db in databases.values():
            db.close()

    result: dict[str, object] = {"n": args.n, "images_per_analysis": args.images, "dir": str(args.dir or tempfile.gettempdir()),
                                 "platform": platform.platform()}
    for mode, values in times.items():
        ordered = sorted(values)
        result[mode] = {"median_ms": round(statistics.median(values), 3),
                        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
                        "mean_ms": round(statistics.fmean(values), 3)}
    full, normal = result["FULL"], result["NORMAL"]
    assert isinstance(full, dict) and isinstance(normal, dict)
    result["ratio_median"] = round(full["median_ms"] / normal["median_ms"], 2)
    result["extra_ms_median"] = round(full["median_ms"] - normal["median_ms"], 3)
    for mode in ("NORMAL", "FULL"):
        row = result[mode]
        assert isinstance(row, dict)
        print(f"{mode:6}  median {row['median_ms']:.2f} ms  p95 {row['p95_ms']:.2f} ms  mean {row['mean_ms']:.2f} ms "
              f"per stored analysis ({args.images} predictions)")
    print(f"FULL / NORMAL (median): {result['ratio_median']}x, +{result['extra_ms_median']:.2f} ms per upload")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
