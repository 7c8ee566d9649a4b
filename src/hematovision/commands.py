"""Core subcommands: data, models, train, evaluate, predict."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the core subcommands on the top-level parser."""
    _add_data(subparsers)
    _add_models(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_predict(subparsers)


def _add_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect or download datasets")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="counts per class and split, image sizes, duplicates, unreadable files")
    inspect.add_argument("root", type=Path, help="dataset folder (ROOT/<class>/* or ROOT/<split>/<class>/*)")
    inspect.add_argument("--json", type=Path, help="also write the report as JSON here")
    inspect.set_defaults(func=run_data_inspect)
    fetch = actions.add_parser("fetch", help="download a public dataset (needs the network)")
    fetch.add_argument("name", choices=["bloodmnist"])
    fetch.add_argument("--size", type=int, default=224, choices=[28, 64, 128, 224])
    fetch.add_argument("--root", type=Path, help="download folder (default $HEMATOVISION_HOME/bloodmnist)")
    fetch.add_argument("--export", type=Path, help="also write it as class folders ROOT/<split>/<class>/*.png here")
    fetch.set_defaults(func=run_data_fetch)


def run_data_inspect(args: argparse.Namespace) -> int:
    from hematovision.data.inspect import format_inspection, inspect_dataset

    report = inspect_dataset(args.root)
    print(format_inspection(report))
    if args.json:
        from hematovision._io import write_json

        write_json(args.json, report)
    return 0


def run_data_fetch(args: argparse.Namespace) -> int:
    from hematovision.data.bloodmnist import export_bloodmnist, fetch_bloodmnist

    path = fetch_bloodmnist(args.size, args.root)
    print(f"BloodMNIST {args.size} px: {path}")
    if args.export:
        print(f"class folders: {export_bloodmnist(path, args.export)}")
    return 0


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="list the registered models")
    models.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from hematovision.models import get_model_info, list_models

    print(f"{'name':24} {'family':9} {'size':>4}  {'offline weights':15} description")
    for name in list_models():
        info = get_model_info(name)
        offline = "yes" if info.offline_weights else ("no (hub)" if info.weights else "none")
        print(f"{name:24} {info.family:9} {info.input_size:>4}  {offline:15} {info.description}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a classifier (frozen features + head, or fine-tuning)")
    data = train.add_argument_group("data")
    data.add_argument("--data", type=Path, help="dataset folder; split 70/15/15 (seeded, stratified) unless it has train/val/test folders")
    data.add_argument("--train-dir", type=Path, help="training images (instead of --data)")
    data.add_argument("--val-dir", type=Path, help="validation images (default: 15%% carved from --train-dir)")
    data.add_argument("--test-dir", type=Path, help="test images")
    data.add_argument("--classes", help="comma-separated classes to keep, e.g. basophil,eosinophil,lymphocyte,monocyte,neutrophil")
    data.add_argument("--group-csv", type=Path, help="CSV mapping file names to groups kept on one side of the split")
    model = train.add_argument_group("model")
    model.add_argument("--out", type=Path, required=True, help="run folder to create")
    model.add_argument("--mode", choices=["frozen", "finetune"], default="frozen")
    model.add_argument("--backbone", default="efficientnet_lite0", help="registry name (see 'hematovision models')")
    model.add_argument("--no-pretrained", action="store_true", help="start from random weights (finetune only; reported as such)")
    model.add_argument("--image-size", type=int, help="input side (default: 224 frozen, 192 finetune)")
    model.add_argument("--head", choices=["logreg", "mlp"], default="logreg", help="frozen-mode head")
    model.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8],
                       help="dihedral views (flips/90° rotations) averaged per image: in frozen features, or in "
                            "fine-tuned logits at evaluation; prediction uses the same")
    fit = train.add_argument_group("fine-tuning")
    fit.add_argument("--epochs", type=int, default=10)
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--balance", choices=["loss", "sampler", "none"], default="loss")
    fit.add_argument("--strong-augment", action="store_true",
                     help="also zoom out, blur, lower resolution and shift stains: for images from other labs and scanners")
    fit.add_argument("--patience", type=int, default=4)
    fit.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    fit.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from hematovision.train.finetune import FinetuneConfig
    from hematovision.train.pipeline import TrainConfig, run_training

    config = TrainConfig(
        out=args.out, data=args.data, train_dir=args.train_dir, val_dir=args.val_dir, test_dir=args.test_dir,
        mode=args.mode, backbone=args.backbone, pretrained=not args.no_pretrained, image_size=args.image_size,
        classes=args.classes.split(",") if args.classes else None, group_csv=args.group_csv, seed=args.seed,
        head=args.head, tta=args.tta, resume=args.resume,
        finetune=FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, balance=args.balance,
                                strong_augment=args.strong_augment, patience=args.patience, seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch),
    )
    metrics = run_training(config)
    print(_summary_line(f"{metrics['split']} split", metrics))
    print(f"report: {args.out / 'report.md'}")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("evaluate", help="evaluate a run on every image of a folder")
    evaluate.add_argument("run_dir", type=Path)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="class-folder dataset; all of it is test data")
    source.add_argument("--split", help="a part of the run's own split.csv instead, e.g. test")
    evaluate.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval_<name>)")
    evaluate.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    evaluate.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from hematovision.evaluate.external import evaluate_folder, evaluate_split

    if args.data is not None:
        metrics = evaluate_folder(args.run_dir, args.data, args.out, args.tta)
    else:
        metrics = evaluate_split(args.run_dir, args.split, args.out, args.tta)
    print(_summary_line(str(args.data or f"{args.split} split"), metrics))
    if metrics["unknown_classes"]:
        print(f"left out (unknown to the model): {', '.join(metrics['unknown_classes'])}")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="classify image files and folders")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    predict.add_argument("--out", type=Path, required=True, help="output .csv or .json")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    predict.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from hematovision.infer.predictor import Predictor
    from hematovision.predict import collect_image_paths, predict_files, write_predictions

    predictor = Predictor.from_run_dir(args.run_dir, args.tta)
    paths = collect_image_paths(args.paths)
    rows = predict_files(predictor, paths, args.batch_size)
    write_predictions(rows, predictor.class_names, args.out, args.top_k)
    errors = [row for row in rows if row.error]
    print(f"{len(rows) - len(errors)} image(s) classified, {len(errors)} unreadable; written to {args.out}")
    for row in errors[:10]:
        print(f"  unreadable: {row.error}")
    return 0


def _summary_line(name: str, metrics: dict) -> str:
    return (f"{name}: {metrics['n_images']} images, accuracy {metrics['accuracy']:.4f}, "
            f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
