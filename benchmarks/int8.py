"""INT8 recipes on a real run: accuracy on the run's test split vs fp32, and speed in the same run.

Usage:
    nice python benchmarks/int8.py RUN_DIR [--recipes default,entropy,...] [--calibration 200] [--json OUT]

RUN_DIR must have ``model.onnx`` (``hematovision export RUN --no-calibrate``) and its ``split.csv``
images; the run folder is only read (INT8 variants go to a temporary folder). Calibration uses the
same 200 seeded training images as ``hematovision export --int8``. Throughput: ONNX Runtime with the
served session options, batch 8, ``--threads`` threads, fp32 and INT8 alternating in 4 rounds (the
median ratio is reported, so load changes on a shared machine hit both). The load average is printed.

``--openvino`` also measures OpenVINO (``pip install openvino``; not a HematoVision dependency) on the same
``model.onnx``: its CPU plugin in strict f32 and with its default precision hint (bf16 on CPUs with
AVX512-BF16 or AMX), each against ONNX Runtime fp32 in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from hematovision.export.quantize import HEAD, POOLS, STEM, Recipe

RECIPES = {
    "default": Recipe(),
    "entropy": Recipe(calibration="entropy"),
    "percentile": Recipe(calibration="percentile"),
    "float_stem": Recipe(keep_float=(STEM,)),
    "float_pools": Recipe(keep_float=(POOLS,)),
    "float_head": Recipe(keep_float=(HEAD,)),
    "float_stem_pools_head": Recipe(keep_float=(STEM, POOLS, HEAD)),
    "conv_only": Recipe(op_types=("Conv",)),
    "reduce_range": Recipe(reduce_range=True),
    "s8s8": Recipe(activations="int8"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--recipes", default="default,s8s8,float_stem,float_pools,float_head,conv_only",
                        help=f"comma-separated, from: {', '.join(RECIPES)}")
    parser.add_argument("--calibration", type=int, default=200, help="training images for calibration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--openvino", action="store_true", help="also measure OpenVINO f32 and its default precision")
    args = parser.parse_args(argv)

    from hematovision.data.folder import label_indices, load_images
    from hematovision.export.calibrate import read_run_split
    from hematovision.export.quantize import compare_accuracy, measure_throughput, meets_targets, quantize_int8
    from hematovision.infer.exported import onnx_session
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(args.run_dir)
    prep = predictor.prep
    fp32_path = args.run_dir / "model.onnx"
    if not fp32_path.is_file():
        sys.exit(f"{fp32_path} is missing: run `hematovision export {args.run_dir} --no-calibrate` first")
    splits = read_run_split(args.run_dir)
    train = splits["train"]
    rng = np.random.default_rng(0)  # the same choice as `hematovision export --int8`
    chosen = [train[i] for i in sorted(rng.choice(len(train), min(args.calibration, len(train)), replace=False))]
    calibration = load_images(chosen, prep, desc="calibration images").images
    test = load_images(splits["test"], prep, desc="test images")
    labels = label_indices(test.samples, predictor.class_names)
    fp32 = onnx_session(fp32_path, args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            recipe = RECIPES[name]
            path = quantize_int8(fp32_path, Path(tmp) / f"{name}.onnx", calibration, prep, recipe=recipe)
            int8 = onnx_session(path, args.threads)
            scores = compare_accuracy({"fp32": fp32, "int8": int8}, test.images, labels, prep)
            speed = measure_throughput(fp32, int8, test.images, prep)
            change = scores["int8"]["accuracy"] - scores["fp32"]["accuracy"]
            row = {"recipe": name, "accuracy_fp32": scores["fp32"]["accuracy"],
                   "accuracy_int8": scores["int8"]["accuracy"], "change_pt": 100 * change,
                   "agreement": scores["int8"]["agreement"], "fp32_img_s": speed.fp32, "int8_img_s": speed.int8,
                   "speedup": speed.speedup, "meets_targets": meets_targets(change, speed.speedup),
                   "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    if args.openvino:
        rows += openvino_rows(fp32_path, fp32, test.images, labels, prep, args.threads)

    print(f"\n{args.run_dir}: test split {len(labels)} images, calibration {len(calibration)} train images, "
          f"batch 8, {args.threads} threads\n")
    print("| recipe | fp32 acc | int8 acc | change (pt) | agreement | fp32 img/s | int8 img/s | speed-up | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['accuracy_fp32']:.4f} | {r['accuracy_int8']:.4f} | {r['change_pt']:+.2f} | "
              f"{r['agreement']:.4f} | {r['fp32_img_s']:.0f} | {r['int8_img_s']:.0f} | {r['speedup']:.2f}× | "
              f"{r['load']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def openvino_rows(fp32_path: Path, fp32: object, images: np.ndarray, labels: np.ndarray, prep: object,
                  threads: int) -> list[dict]:
    """OpenVINO's CPU plugin on the same ONNX file, as rows of the same table (fp32 = ONNX Runtime fp32)."""
    import openvino as ov

    from hematovision.export.quantize import compare_accuracy, measure_throughput, meets_targets

    class Session:  # the two calls compare_accuracy/measure_throughput make of an ONNX Runtime session
        def __init__(self, compiled: object) -> None:
            self.compiled, self.request = compiled, compiled.create_infer_request()  # type: ignore[attr-defined]

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [self.request.infer({0: feeds["input"]})[self.compiled.output(0)]]  # type: ignore[attr-defined]

    core = ov.Core()
    model = core.read_model(str(fp32_path))
    rows = []
    for name, hint in (("openvino_f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino_default_precision", {})):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                     **hint})
        session = Session(compiled)
        scores = compare_accuracy({"fp32": fp32, name: session}, images, labels, prep)  # type: ignore[arg-type]
        speed = measure_throughput(fp32, session, images, prep)  # type: ignore[arg-type]
        change = scores[name]["accuracy"] - scores["fp32"]["accuracy"]
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # "<Type: 'bfloat16'>"
        label = f"{name} ({precision.split(chr(39))[1] if chr(39) in precision else precision})"
        rows.append({"recipe": label, "accuracy_fp32": scores["fp32"]["accuracy"],
                     "accuracy_int8": scores[name]["accuracy"], "change_pt": 100 * change,
                     "agreement": scores[name]["agreement"], "fp32_img_s": speed.fp32, "int8_img_s": speed.int8,
                     "speedup": speed.speedup, "meets_targets": meets_targets(change, speed.speedup),
                     "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
