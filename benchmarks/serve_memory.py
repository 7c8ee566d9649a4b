"""Server memory under sustained load: RSS over time while N clients post images, per server setting.

Usage:
    python benchmarks/serve_memory.py --model RUN_DIR --clients 8 --seconds 300
    git worktree add /tmp/hv_base 29cbe68    # an earlier HematoVision, as the baseline in the same run
    python benchmarks/serve_memory.py --model RUN_DIR --baseline-src /tmp/hv_base/src

Each variant starts its own ``hematovision serve`` (login on, an API token, rate limits off), sends the
load of ``benchmarks/serve_load.py``'s concurrent phase and samples the server's RSS every
``--every`` seconds. "At rest" is the RSS after start-up and 10 sequential warm-up requests, i.e.
what an operator sees before the lab's morning rush; growth is measured from there to the end and to
the peak. Variants run one after the other in the same invocation, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import bearer_headers, concurrent_phase, load_images, rss_mb, start_server  # noqa: E402

# Environment of each variant's server, on top of the benchmark's own (see serve_load.start_server).
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},  # what `hematovision serve` does by itself
    # glibc's allocator tunables, tried against the growth in the first seconds of load (docs/deployment.md):
    "arena2": {"MALLOC_ARENA_MAX": "2"},  # two malloc arenas instead of 8 per core
    "trim": {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "1048576", "MALLOC_MMAP_THRESHOLD_": "262144"},
    # jemalloc instead of glibc's malloc (Debian: libjemalloc2); OpenVINO aborts with it preloaded
    # (openvinotoolkit/openvino#29025), so only with --backend onnx, int8 or torch.
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
}


def sample_rss(pid: int, every: float, stop: threading.Event, into: list[tuple[float, float]]) -> None:
    start = time.perf_counter()
    while not stop.wait(every):
        into.append((time.perf_counter() - start, rss_mb(pid)))


def run_variant(args: argparse.Namespace, work: Path, name: str, images: list[tuple[str, bytes]]) -> dict:
    import httpx

    server, base, log = start_server(args, work / name, auth=True, extra_env=VARIANTS[name])
    try:
        headers = bearer_headers(base)
        with httpx.Client(base_url=base, timeout=30, headers=headers) as http:
            for filename, data in images[:10]:
                http.post("/api/v1/predict", files=[("files", (filename, data))]).raise_for_status()
        time.sleep(1.0)
        at_rest = rss_mb(server.pid)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.pid, args.every, stop, samples), daemon=True)
        sampler.start()
        load = asyncio.run(concurrent_phase(base, images, args.clients, args.seconds, 10**9, headers))
        stop.set()
        sampler.join()
        time.sleep(1.0)
        end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    peak = max([at_rest, end] + [rss for _, rss in samples])
    return {"variant": name, "env": VARIANTS[name], "requests": load["requests"], "errors": load["errors"],
            "error_examples": load["error_examples"], "images_per_s": load["images_per_s"],
            "rss_at_rest_mb": at_rest, "rss_end_mb": end, "rss_peak_mb": peak,
            "growth_end_percent": 100 * (end / at_rest - 1), "growth_peak_percent": 100 * (peak / at_rest - 1),
            "timeline": samples, "log": str(log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run folder to serve")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnx", "int8", "torch", "openvino"))
    parser.add_argument("--images", help="folder of test images (default ../shared/data/pbc_dev)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--every", type=float, default=10.0, help="RSS sampling interval, seconds")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--baseline-src", help="also serve from this source tree (PYTHONPATH), as variant 'baseline'")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    if args.baseline_src:
        VARIANTS["baseline"] = {"PYTHONPATH": str(Path(args.baseline_src).resolve())}
        names.insert(0, "baseline")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    work = Path(tempfile.mkdtemp(prefix="hv-memory-"))
    images = load_images(args.images)
    results = []
    for name in names:
        (work / name).mkdir()
        results.append(run_variant(args, work, name, images))
        row = results[-1]
        print(f"{name}: {row['requests']} requests, {row['errors']} errors, RSS {row['rss_at_rest_mb']:.0f} -> "
              f"{row['rss_end_mb']:.0f} MB (peak {row['rss_peak_mb']:.0f})", flush=True)

    print(f"\n{args.clients} clients x {args.seconds:.0f} s, model {args.model}\n")
    print("| server | requests | errors | images/s | RSS at rest MB | end MB | peak MB | growth (end) | growth (peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['variant']} | {row['requests']} | {row['errors']} | {row['images_per_s']:.1f} | "
              f"{row['rss_at_rest_mb']:.0f} | {row['rss_end_mb']:.0f} | {row['rss_peak_mb']:.0f} | "
              f"{row['growth_end_percent']:+.1f}% | {row['growth_peak_percent']:+.1f}% |")
    for row in results:
        timeline = ", ".join(f"{t:.0f}s {rss:.0f}" for t, rss in row["timeline"])
        print(f"\n{row['variant']} RSS over time (MB): {timeline}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
