"""Benchmark: fine-tuning and prediction throughput on a quiet machine and beside a CPU-bound program.

Each measurement runs in a fresh process, because OpenMP reads its settings once, when torch loads:

* ``default``: what a plain ``python`` + torch does (all cores, OpenMP's default waiting policy);
* ``hematovision``: the settings ``hematovision`` chooses at start-up (``hematovision.threads``:
  ``OMP_WAIT_POLICY=PASSIVE``, threads for the idle cores).

Both are measured quiet and beside one competing CPU-bound process (``while True: pass``), in the
same run. Workloads: EfficientNet-Lite0 fine-tuning steps (batch 16, 128 px, AdamW) and prediction
(batch 32, 224 px), random weights and inputs (the arithmetic is what counts).

    python benchmarks/busy_machine.py --seconds 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOAD = r"""
import json, os, sys, time
if sys.argv[1] == "hematovision":
    from hematovision.threads import configure
    configure()
import torch
from hematovision.models import create_model

kind, seconds = sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
model = create_model("efficientnet_lite0", 5, pretrained=False).to(memory_format=torch.channels_last)
if kind == "train":
    batch, size = 16, 128
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,))
    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
else:
    batch, size = 32, 224
    model.eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    def step():
        with torch.inference_mode():
            model(x)
step()  # warm-up
done, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step()
    done += 1
elapsed = time.perf_counter() - start
print(json.dumps({"steps_per_s": done / elapsed, "images_per_s": done * batch / elapsed,
                  "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}))
"""


def measure(settings: str, kind: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                        "HEMATOVISION_THREADS")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, settings, kind, str(seconds)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per cell")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    print(f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    for kind in ("train", "predict"):
        for busy in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                if competitor is not None:
                    time.sleep(1.0)  # let it take its core
                for settings in ("default", "hematovision"):
                    key = f"{kind}/{'busy' if busy else 'quiet'}/{settings}"
                    results[key] = measure(settings, kind, args.seconds)
                    print(key, results[key], flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print("\n| workload | settings | quiet | beside one CPU-bound program | busy / quiet | busy / quiet default |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, unit in (("train", "steps_per_s"), ("predict", "images_per_s")):
        quiet_default = results[f"{kind}/quiet/default"][unit]
        for settings in ("default", "hematovision"):
            quiet, busy = results[f"{kind}/quiet/{settings}"], results[f"{kind}/busy/{settings}"]
            print(f"| {kind} ({unit.replace('_per_s', '/s')}) | {settings} (threads {quiet['threads']} → "
                  f"{busy['threads']}) | {quiet[unit]:.2f} | {busy[unit]:.2f} | {busy[unit] / quiet[unit]:.2f} | "
                  f"{busy[unit] / quiet_default:.2f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
