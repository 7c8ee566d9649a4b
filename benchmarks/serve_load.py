"""Load test of ``POST /api/v1/predict`` on 127.0.0.1: latency, throughput, errors and server memory.

Usage:
    python benchmarks/serve_load.py --model RUN_DIR          # serve a trained run (ONNX if exported)
    python benchmarks/serve_load.py                          # EfficientNet-Lite0 (ImageNet weights,
                                                             # untrained 5-class head): timing only

Phases (each bounded in count and time, against servers this script starts on 127.0.0.1):
1. one client, ``--single`` sequential single-image requests: p50/p90/p99 latency, three ways in
   the same run: without login (``--no-auth``), with an API token (bearer), and with a browser's
   session cookie + CSRF token — the cost of the deployment protections;
2. ``--clients`` concurrent clients (API tokens) for ``--seconds``: errors, images/s, p50/p99 latency;
3. server RSS at rest (before phase 2) and after it.
Rate limits are switched off in the servers (they would answer 429 to a load test by design).
Images come from ``--images`` or ``../shared/data/pbc_dev`` (else synthetic). The CPU is
shared with other work: run niced and read the numbers as noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SERVER = """
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from hematovision.data.transforms import Preprocessing
from hematovision.export.onnx import export_onnx
from hematovision.models import create_model, get_model_info
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings
import uvicorn

backbone, run_dir, db, port, backend = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
info = get_model_info(backbone)
torch.manual_seed(0)
model = create_model(backbone, 5, pretrained=info.offline_weights).eval()
prep = Preprocessing(info.input_size, info.mean, info.std)
if backend != "torch" and not (run_dir / "model.onnx").exists():
    export_onnx(model, prep.image_size, run_dir / "model.onnx")
predictor = SimpleNamespace(class_names=["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
                            prep=prep, model=model, temperature=1.0, card={"backbone": backbone, "note": "timing only"})
app = create_app(Settings.from_env(model=run_dir, db=db, backend=backend), predictor=predictor)  # HEMATOVISION_AUTH etc.
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_images(folder: str | None, count: int = 64) -> list[tuple[str, bytes]]:
    from hematovision.paths import shared_data_dir

    root = Path(folder) if folder else (shared_data_dir() / "pbc_dev" if shared_data_dir() else None)
    if root is not None and root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        step = max(1, len(files) // count)
        return [(p.name, p.read_bytes()) for p in files[::step][:count]]
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (360, 360, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append((f"synthetic_{i}.jpg", buffer.getvalue()))
    return images


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.array(values) * 1000
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)} | {"mean": float(array.mean())}


async def concurrent_phase(base: str, images: list[tuple[str, bytes]], clients: int, seconds: float,
                           max_requests: int, headers: dict[str, str]) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    sent = 0

    async def client(worker: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
            i = worker
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                name, data = images[i % len(images)]
                i += clients
                tick = time.perf_counter()
                try:
                    response = await http.post("/api/v1/predict", files=[("files", (name, data))])
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as error:
                    errors.append(repr(error))
                    continue
                latencies.append(time.perf_counter() - tick)

    start = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(clients)))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "seconds": elapsed, "requests": len(latencies) + len(errors),
            "errors": len(errors), "error_examples": errors[:3], "images_per_s": len(latencies) / elapsed,
            **percentiles(latencies or [float("nan")])}


PASSWORD = "load-test password"
NO_RATE_LIMITS = {"HEMATOVISION_RATE_LIMIT_PER_MINUTE": "0", "HEMATOVISION_UPLOAD_RATE_LIMIT_PER_MINUTE": "0",
                  "HEMATOVISION_FAILED_LOGIN_LIMIT_PER_MINUTE": "0"}


def start_server(args: argparse.Namespace, work: Path, auth: bool,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Start a server (with a ``bench`` technologist when ``auth``); wait for /health; (process, base, log)."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    name = "auth" if auth else "no_auth"
    db = work / f"{name}.db"
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": "2", **NO_RATE_LIMITS,
           "HEMATOVISION_AUTH": "1" if auth else "0", **(extra_env or {})}
    if auth:
        subprocess.run([sys.executable, "-m", "hematovision", "users", "add", "bench", "--role", "technologist",
                        "--db", str(db), "--password-stdin"], input=PASSWORD.encode(), check=True,
                       capture_output=True, env=env)
    if args.model:
        command = [sys.executable, "-m", "hematovision", "serve", "--model", args.model, "--port", str(port),
                   "--db", str(db), "--backend", args.backend, "--log-level", "warning"]
    else:
        script = work / "server.py"
        script.write_text(SERVER)
        (work / "run").mkdir(exist_ok=True)
        command = [sys.executable, str(script), args.backbone, str(work / "run"), str(db), str(port), args.backend]
    log = work / f"{name}.log"
    server = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return server, base, log
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def bearer_headers(base: str) -> dict[str, str]:
    """An API token of the ``bench`` user (OAuth2 password form)."""
    import httpx

    response = httpx.post(f"{base}/api/v1/auth/token", data={"username": "bench", "password": PASSWORD}, timeout=30)
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def browser_session(http: Any) -> None:
    """Log ``http`` in through the login form, as the page does; later requests carry Origin + CSRF token."""
    import re

    page = http.get("/login")
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if page.status_code != 200 or match is None:
        raise SystemExit(f"login page: {page.status_code}")
    origin = str(http.base_url).rstrip("/")
    response = http.post("/login", data={"username": "bench", "password": PASSWORD, "csrf_token": match.group(1),
                                         "next": "/"}, headers={"Origin": origin}, follow_redirects=False)
    if response.status_code != 303:
        raise SystemExit(f"login failed: {response.status_code} {response.text[:200]}")
    http.headers.update({"Origin": origin, "X-CSRF-Token": http.cookies.get("hv_csrf")})


def single_phase(http: Any, images: list[tuple[str, bytes]], count: int, pid: int) -> dict:
    """``count`` sequential single-image requests after 10 warm-up ones: latency percentiles, server CPU."""
    for name, data in images[:10]:
        http.post("/api/v1/predict", files=[("files", (name, data))]).raise_for_status()
    latencies = []
    cpu_start = cpu_seconds(pid)
    for i in range(count):
        name, data = images[i % len(images)]
        tick = time.perf_counter()
        http.post("/api/v1/predict", files=[("files", (name, data))]).raise_for_status()
        latencies.append(time.perf_counter() - tick)
    return {"requests": count, **percentiles(latencies),
            "server_cpu_ms_per_request": 1000 * (cpu_seconds(pid) - cpu_start) / count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run folder to serve with `hematovision serve`")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="model for the timing-only server")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnx", "int8", "torch"))
    parser.add_argument("--images", help="folder of test images (default ../shared/data/pbc_dev)")
    parser.add_argument("--single", type=int, default=200, help="sequential requests of phase 1")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=20_000, help="bound on phase-2 requests")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import httpx

    work = Path(tempfile.mkdtemp(prefix="hv-load-"))
    images = load_images(args.images)
    # The same run measures the request path without login, then with it: on a shared machine
    # only numbers taken minutes apart are comparable.
    server, base, _ = start_server(args, work, auth=False)
    try:
        backend = httpx.get(f"{base}/health", timeout=10).json()["backend"]
        with httpx.Client(base_url=base, timeout=30) as http:
            single = {"no login (--no-auth)": single_phase(http, images, args.single, server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    server, base, _ = start_server(args, work, auth=True)
    try:
        token = bearer_headers(base)
        with httpx.Client(base_url=base, timeout=30, headers=token) as http:
            single["API token (bearer)"] = single_phase(http, images, args.single, server.pid)
        with httpx.Client(base_url=base, timeout=30) as http:
            browser_session(http)
            single["session cookie + CSRF token"] = single_phase(http, images, args.single, server.pid)
        time.sleep(1.0)
        rss_rest = rss_mb(server.pid)
        cpu_start = cpu_seconds(server.pid)
        concurrent = asyncio.run(concurrent_phase(base, images, args.clients, args.seconds, args.max_requests,
                                                  token))
        concurrent["server_cpu_ms_per_request"] = (1000 * (cpu_seconds(server.pid) - cpu_start)
                                                   / max(1, concurrent["requests"]))
        time.sleep(1.0)
        rss_after = rss_mb(server.pid)
        mean_batch = httpx.get(f"{base}/health", timeout=10).json().get("mean_batch_size")
    finally:
        server.terminate()
        server.wait(timeout=30)

    results = {
        "model": args.model or f"{args.backbone} (untrained head, timing only)", "backend": backend,
        "images": f"{len(images)} images from {args.images or 'pbc_dev (or synthetic)'}",
        "load_average_end": os.getloadavg()[0], "single_client": single,
        "concurrent": {**concurrent, "mean_batch_size_last_1000": mean_batch},
        "rss_mb": {"at_rest": rss_rest, "after_load": rss_after, "growth_percent": 100 * (rss_after / rss_rest - 1)},
    }
    print(f"\nServer: {results['model']}, backend {backend}, 127.0.0.1, load average at end "
          f"{results['load_average_end']:.1f}\n")
    baseline = single["no login (--no-auth)"]["p50"]
    print("| phase | requests | errors | images/s | p50 ms | p90 ms | p99 ms | p50 vs no login |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for how, row in single.items():
        print(f"| 1 client, sequential, {how} | {row['requests']} | 0 | {1000 / row['mean']:.1f} | {row['p50']:.1f} | "
              f"{row['p90']:.1f} | {row['p99']:.1f} | {row['p50'] / baseline:.2f}x |")
    c = results["concurrent"]
    baseline_cpu = single["no login (--no-auth)"]["server_cpu_ms_per_request"]
    print(f"| {c['clients']} clients, {c['seconds']:.0f} s, API tokens | {c['requests']} | {c['errors']} | "
          f"{c['images_per_s']:.1f} | {c['p50']:.1f} | {c['p90']:.1f} | {c['p99']:.1f} | |")
    print(f"\nMean model batch over the last 1000 calls: {c['mean_batch_size_last_1000']}")
    # CPU time does not depend much on how busy the machine is; wall-clock numbers do.
    print(f"Server CPU per request: {baseline_cpu:.1f} ms (1 client, no login), "
          f"{c['server_cpu_ms_per_request']:.1f} ms (concurrent) -> at most "
          f"{2000 / c['server_cpu_ms_per_request']:.0f} images/s on 2 otherwise idle cores")
    r = results["rss_mb"]
    print(f"\nServer RSS: {r['at_rest']:.0f} MB at rest, {r['after_load']:.0f} MB after the load "
          f"({r['growth_percent']:+.1f}%)")
    if c["error_examples"]:
        print("errors, e.g.:", *c["error_examples"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
