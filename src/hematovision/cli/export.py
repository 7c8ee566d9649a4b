"""``hematovision export``: ONNX, its OpenVINO IR (+ optional INT8) and the review calibration for serving."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export``."""
    parser = subparsers.add_parser(
        "export",
        help="export a run to ONNX and calibrate its review flags for serving",
        description="Write RUN_DIR/model.onnx (dynamic batch axis; compared with PyTorch, max abs difference "
                    "reported), its OpenVINO IR RUN_DIR/model.xml + model.bin when openvino is installed "
                    "(accuracy against fp32 on the test split reported; `auto` uses it only if it loses at most "
                    "0.5 points), optionally RUN_DIR/model.int8.onnx (accuracy change on the test split "
                    "reported), and the review policy RUN_DIR/serving.json + ood.npz (confidence threshold "
                    "and out-of-distribution threshold calibrated on the run's validation split). "
                    "The report goes to RUN_DIR/export.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder made by `hematovision train`")
    parser.add_argument("--format", choices=("onnx", "none"), default="onnx",
                        help="model format to write; 'none' only calibrates (default onnx)")
    parser.add_argument("--int8", action="store_true", help="also write a static INT8 model (ONNX Runtime QDQ)")
    parser.add_argument("--no-openvino", action="store_true",
                        help="do not write the OpenVINO IR (model.xml/model.bin); it is written by default when "
                             "openvino is installed, and measured against fp32 on the run's test split")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the review-policy calibration")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--target-accuracy", type=float, default=0.99,
                        help="accuracy wanted among predictions not flagged as low confidence (default 0.99)")
    parser.add_argument("--ood-quantile", type=float, default=0.95,
                        help="fraction of validation cells the OOD threshold accepts (default 0.95)")
    parser.add_argument("--max-train", type=int, default=3000, help="most train images for the OOD model")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Prepare the run folder and print the report."""
    from hematovision.export.prepare import prepare_run

    report = prepare_run(
        args.run_dir, onnx=args.format == "onnx", int8=args.int8, calibrate=not args.no_calibrate,
        opset=args.opset, target_accuracy=args.target_accuracy, ood_quantile=args.ood_quantile,
        max_train=args.max_train, threads=args.threads, openvino=not args.no_openvino,
    )
    print(json.dumps(report, indent=2))
    return 0
