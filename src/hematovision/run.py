"""The run folder: the one owner of its file names, its model card, its weights and its split.

A run folder is what ``hematovision train`` writes and every other command reads::

    RUN/
      model_card.json      the typed :class:`ModelCard` (classes, preprocessing, views, temperature, ...)
      model.safetensors    the best weights; their sha256 is in the card and checked on every load
      split.csv            file, label, split, group (and source): which image was used for what
      train_config.json    the resolved training settings
      metrics.json, report.md, *.png, val/   evaluation of the held-out split
      last.safetensors, train_state.pt       fine-tuning only: what ``--resume`` continues from
      few_shot_start.safetensors   ``train --few-shot-start`` (frozen mode): the network ``adapt --data``
                           fine-tunes from; its sha256 is in the card's ``files`` too
      model.onnx, model.int8.onnx, export.json, serving.json, ood.npz   written by ``hematovision export``
      model.xml, model.bin   the OpenVINO IR of model.onnx (``hematovision export``, when openvino is installed)

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file behind.

Reading a run's card and checking its weights (:func:`read_run`) needs no torch: an exported run
(ONNX Runtime, OpenVINO) is scored without it. Building the network (:func:`load_run`,
:func:`load_model`) imports torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hematovision._io import atomic_write, sha256_file, write_json
from hematovision.data.folder import Sample
from hematovision.data.transforms import Preprocessing
from hematovision.errors import DatasetError, HematoVisionError

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
FEW_SHOT_START_FILE = "few_shot_start.safetensors"
STATE_FILE = "train_state.pt"
CARD_FILE = "model_card.json"
SPLIT_FILE = "split.csv"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
UNREADABLE_FILE = "unreadable_files.json"
VAL_DIR = "val"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPENVINO_FILE = "model.xml"  # the OpenVINO IR's graph; its weights are OPENVINO_WEIGHTS_FILE beside it
OPENVINO_WEIGHTS_FILE = "model.bin"
EXPORT_FILE = "export.json"
POLICY_FILE = "serving.json"
OOD_FILE = "ood.npz"

CARD_FORMAT = 3
MODES = ("frozen", "finetune")
STANDARDISATIONS = ("training", "per_lab")
VIEWS = (1, 2, 4, 8)
# Fitted temperatures lie in [0.05, 20] (evaluate.metrics.fit_temperature's bounds); far above that
# every answer would be uniform, so a card saying so is damaged rather than calibrated.
MAX_TEMPERATURE = 100.0
# Far above any head the code builds (EfficientNet-Lite2 with all taps: a few thousand features), far
# below sizes whose allocation fails: a card asking for more is damaged, not a bigger model.
MAX_HEAD_SIZE = 1 << 20


class RunFolderError(HematoVisionError):
    """A run folder, its card or its weights are missing, damaged or not ours."""


@dataclass
class FrozenHead:
    """What a frozen run's network is made of, besides its backbone.

    Attributes:
        taps: backbone stages whose pooled outputs join the features.
        num_features: D, the feature size the head takes.
        hidden: hidden width of an MLP head; 0 for a linear head.
        head: how the head was fitted (kind, chosen C or epochs, validation score, seconds).
        standardisation: ``training``: the features are standardised with the training split's
            statistics; ``per_lab``: each training lab with its own (``train --lab-standardise``), and
            ``evaluate`` standardises another lab's folder with the folder's own.
    """

    taps: list[int]
    num_features: int
    hidden: int = 0
    head: dict[str, Any] = field(default_factory=dict)
    standardisation: str = "training"

    @property
    def routed_labs(self) -> list[str]:
        """The training labs a per-lab head routes images to (``head.routing``; see
        :class:`~hematovision.models.frozen.LabRoutedLinear`); empty for other heads."""
        routing = self.head.get("routing")
        return list(routing["labs"]) if isinstance(routing, dict) else []


@dataclass
class ModelCard:
    """Everything needed to rebuild, trust and describe a trained classifier (``model_card.json``).

    Attributes:
        class_names: the K classes, in output order.
        mode: ``frozen`` (ImageNet features + fitted head) or ``finetune``.
        backbone: registry name (``a+b`` joins frozen backbones).
        preprocessing: input size, mean and std.
        pretrained: whether training started from ImageNet weights.
        weights: where the starting weights came from, in words.
        tta: dihedral views (flips/90° rotations) averaged per image, as in training and
            calibration; prediction, export and serving use the same number.
        temperature: calibration temperature fitted on the validation split.
        frozen: the frozen head's shape (frozen mode only).
        finetune: the fine-tuning settings and best epoch (fine-tune mode only).
        data: the training data: source folder(s), images per split, seed, how it was split, and
            ``sources`` (per dataset: name, folder, images per split and class).
        metrics: the held-out split's headline metrics.
        files: sha256 of the weight file (``{"model.safetensors": {"sha256": ...}}``).
        split_file: the split CSV's name inside the run folder.
        adaptation: for a run made by ``hematovision adapt``: what was adapted (normalisation,
            head, temperature, review policy), on which cells of which lab, and the source run.
        shift: the lab-shift score's reference (training-feature statistics) and its calibrated
            warning threshold (see :mod:`hematovision.infer.shift`).
        morphology: the morphology expert fused with the network's logits (``train --morphology``;
            see :mod:`hematovision.infer.morphology`).
        few_shot_start: a frozen run's network for few-shot fine-tuning (``train --few-shot-start``):
            how it was trained; the weights are ``few_shot_start.safetensors``, their sha256 in ``files``.
        hematovision_version, created, torch, platform, train_seconds: provenance.
        format: the card format version.
    """

    class_names: list[str]
    mode: str
    backbone: str
    preprocessing: Preprocessing
    pretrained: bool = True
    weights: str = ""
    tta: int = 1
    temperature: float = 1.0
    frozen: FrozenHead | None = None
    finetune: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    split_file: str = SPLIT_FILE
    adaptation: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    morphology: dict[str, Any] | None = None
    few_shot_start: dict[str, Any] | None = None
    hematovision_version: str = ""
    created: str = ""
    torch: str = ""
    platform: str = ""
    train_seconds: float | None = None
    format: int = CARD_FORMAT

    @property
    def weights_sha256(self) -> str | None:
        """The recorded sha256 of ``model.safetensors`` (``None`` for a card written before its weights)."""
        return self.files.get(MODEL_FILE, {}).get("sha256")

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (the layout of ``model_card.json``)."""
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return {"format": data.pop("format"), **{k: v for k, v in data.items() if v is not None}}

    @classmethod
    def from_dict(cls, data: Any, source: str = CARD_FILE) -> ModelCard:
        """Validate and build a card; older formats are migrated. Any problem is one :class:`RunFolderError`."""
        if not isinstance(data, Mapping):
            raise RunFolderError(f"{source} is not a model card (a JSON object was expected)")
        data = _migrate(dict(data), source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunFolderError(f"{source} has fields this version does not know: {', '.join(unknown)}")
        try:
            card = cls(**{**data, "preprocessing": _preprocessing(data.get("preprocessing")),
                          "frozen": FrozenHead(**data["frozen"]) if data.get("frozen") is not None else None})
        except TypeError as error:  # a missing required field or a frozen section of the wrong shape
            raise RunFolderError(f"{source} is incomplete: {error}") from None
        card.validate(source)
        return card

    def validate(self, source: str = CARD_FILE) -> None:
        """Check every field; raises :class:`RunFolderError` naming the first bad one."""
        def bad(what: str) -> RunFolderError:
            return RunFolderError(f"{source}: {what}")

        names = self.class_names
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
            raise bad("class_names must list at least 2 class names")
        if len(set(names)) != len(names):
            raise bad("class_names has duplicates")
        if self.mode not in MODES:
            raise bad(f"mode must be one of {MODES}, not {self.mode!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise bad("backbone must name a model")
        if self.tta not in VIEWS or isinstance(self.tta, bool):
            raise bad(f"tta must be one of {VIEWS}, not {self.tta!r}")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or not 0 < self.temperature <= MAX_TEMPERATURE):
            shown = "NaN" if self.temperature != self.temperature else repr(self.temperature)  # not a bare "nan"
            raise bad(f"temperature must be a number above 0 and at most {MAX_TEMPERATURE:g}, not {shown}")
        if self.mode == "frozen":
            head = self.frozen
            if head is None:
                raise bad("a frozen run needs its 'frozen' section (taps, num_features, hidden)")
            if not isinstance(head.taps, list) or not all(isinstance(t, int) and 0 <= t < 64 for t in head.taps):
                raise bad("frozen.taps must be a list of stage numbers")
            if not isinstance(head.num_features, int) or not 1 <= head.num_features <= MAX_HEAD_SIZE:
                raise bad(f"frozen.num_features must be an integer from 1 to {MAX_HEAD_SIZE}")
            if not isinstance(head.hidden, int) or not 0 <= head.hidden <= MAX_HEAD_SIZE:
                raise bad(f"frozen.hidden must be an integer from 0 to {MAX_HEAD_SIZE}")
            if not isinstance(head.head, dict):
                raise bad("frozen.head must be a JSON object")
            if head.standardisation not in STANDARDISATIONS:
                raise bad(f"frozen.standardisation must be one of {', '.join(STANDARDISATIONS)}")
            routing = head.head.get("routing")
            if routing is not None and not (
                    isinstance(routing, dict) and isinstance(routing.get("labs"), list) and routing["labs"]
                    and len(routing["labs"]) <= MAX_HEAD_SIZE and all(isinstance(lab, str) for lab in routing["labs"])
                    and head.hidden == 0):
                raise bad("frozen.head.routing must name the training labs (a list of strings) of a linear head")
        # The descriptive sections are read by other commands (adapt, serve's /api/v1/model, the
        # lab-shift score): a wrong type there would fail later, far from the card.
        for name in ("data", "metrics", "files"):
            if not isinstance(getattr(self, name), dict):
                raise bad(f"{name} must be a JSON object")
        for name in ("finetune", "adaptation", "shift", "few_shot_start"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise bad(f"{name} must be a JSON object or absent")
        if self.morphology is not None:
            from hematovision.infer.morphology import MorphologyExpert

            if not isinstance(self.morphology, dict):
                raise bad("morphology must be a JSON object or absent")
            try:
                MorphologyExpert.from_dict(self.morphology, len(names))
            except ValueError as error:
                raise bad(f"morphology: {error}") from None
        if not all(isinstance(entry, dict) for entry in self.files.values()):
            raise bad('files must map file names to {"sha256": ...}')
        if not isinstance(self.pretrained, bool):
            raise bad(f"pretrained must be true or false, not {self.pretrained!r}")
        text_fields = ("weights", "split_file", "hematovision_version", "created", "torch", "platform")
        if not all(isinstance(getattr(self, name), str) for name in text_fields):
            raise bad(f"{', '.join(text_fields)} must be text")
        sha = self.weights_sha256
        if sha is not None and not _is_sha256(sha):
            raise bad(f"files.{MODEL_FILE}.sha256 is not a sha256 digest")
        if self.few_shot_start is not None and (
                self.mode != "frozen" or not _is_sha256(self.files.get(FEW_SHOT_START_FILE, {}).get("sha256"))):
            raise bad(f"few_shot_start belongs to a frozen run whose files give {FEW_SHOT_START_FILE}'s sha256")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _preprocessing(data: Any) -> Preprocessing:
    try:
        size = data["image_size"]
        if not isinstance(size, int) or isinstance(size, bool):  # not "32" or 32.5: a card is written by code
            raise TypeError("image_size")
        prep = Preprocessing.from_dict(data)
        values = (*prep.mean, *prep.std)
        ok = (8 <= prep.image_size <= 4096 and len(prep.mean) == 3 and len(prep.std) == 3
              and all(math.isfinite(v) for v in values) and all(s > 0 for s in prep.std)
              and (prep.cell_scale is None or 0 < prep.cell_scale <= 1)
              and (prep.stain is None or isinstance(prep.stain, dict)))
    except (TypeError, KeyError, ValueError, AttributeError, IndexError):  # AttributeError: not an object
        ok = False
    if not ok:
        raise RunFolderError(f"{CARD_FILE}: preprocessing must give image_size (8-4096 px), mean and std "
                             f"(3 finite numbers each, std above 0), and cell_scale in (0, 1] if any; found {data!r}")
    return prep


def _migrate(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Bring an older card to :data:`CARD_FORMAT`."""
    version = data.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFolderError(f"{source}: unsupported model card format {version!r}")
    if version > CARD_FORMAT:
        raise RunFolderError(f"{source} has card format {version}, newer than this HematoVision reads "
                             f"({CARD_FORMAT}); upgrade HematoVision")
    if version == 1:
        # Format 1 kept the views twice (top level and frozen.tta) and the frozen head under "head".
        frozen = data.get("frozen")
        if isinstance(frozen, dict):
            frozen = dict(frozen)
            data.setdefault("tta", frozen.pop("tta", 1))
            frozen.pop("tta", None)
            data["frozen"] = frozen
        data.pop("model_kwargs", None)  # never written: models were always built with their defaults
        version = 2
    if version == 2:
        # Format 3 added optional fields (adaptation, shift, cell_scale and stain in preprocessing);
        # a format 2 card simply has none of them.
        version = 3
    data["format"] = version
    return data


def read_card(run_dir: str | Path) -> ModelCard:
    """Read and validate a run folder's model card (older formats are migrated in memory)."""
    path = Path(run_dir) / CARD_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a HematoVision run folder (no {CARD_FILE}); "
                             "train one with 'hematovision train'")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}); restore it or train the run again") from None
    return ModelCard.from_dict(data, str(path))


def write_card(run_dir: str | Path, card: ModelCard) -> Path:
    """Write ``model_card.json``, recording the sha256 of the weights now in the folder."""
    run_dir = Path(run_dir)
    weights = run_dir / MODEL_FILE
    if weights.exists():
        card.files = {**card.files, MODEL_FILE: {"sha256": sha256_file(weights)}}
    card.validate()
    return write_json(run_dir / CARD_FILE, card.to_dict())


def save_weights(model: nn.Module, path: str | Path) -> str:
    """Save ``model``'s state dict as safetensors, atomically; returns its sha256."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return sha256_file(path)


def check_weights(path: str | Path, sha256: str | None = None) -> None:
    """Refuse a missing weight file, or one whose sha256 is not ``sha256`` (the card's), without reading it as weights.

    Raises:
        RunFolderError: the file is missing, or was changed, truncated or tampered with.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"weight file not found: {path}")
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        raise RunFolderError(f"{path} is not the file its model card was written for (sha256 {actual[:12]}..., "
                             f"card says {sha256[:12]}...): it was changed or damaged; restore it or train again")


def load_weights(model: nn.Module, path: str | Path, sha256: str | None = None) -> nn.Module:
    """Load safetensors weights into ``model``.

    Args:
        sha256: the digest the file must have (the card's); a changed, truncated or tampered
            file is then refused before it is read (:func:`check_weights`).

    Raises:
        RunFolderError: missing, damaged or foreign weights, or weights with NaN/inf values.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_weights(path, sha256)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunFolderError(f"{path} is not a readable safetensors file ({error})") from None
    damaged = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        raise RunFolderError(f"{path} has NaN or infinite values (e.g. in {damaged[0]}); the weights are damaged")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunFolderError(
            f"{path} does not fit this model ({first}); it was saved for a different backbone or class list"
        ) from None
    return model


def build_model(card: ModelCard) -> nn.Module:
    """An untrained network of the architecture a card describes (the weights are loaded separately)."""
    from hematovision.models import create_model
    from hematovision.models.frozen import FrozenClassifier, build_frozen_features

    num_classes = len(card.class_names)
    if card.frozen is not None:
        features = build_frozen_features(card.backbone, card.frozen.taps, pretrained=False)
        return FrozenClassifier(features, card.frozen.num_features, num_classes, card.frozen.hidden,
                                routed_labs=len(card.frozen.routed_labs))
    return create_model(card.backbone, num_classes=num_classes, pretrained=False)


def read_run(run_dir: str | Path) -> ModelCard:
    """The card of a run folder, its weight file checked against the card's sha256; no network is built.

    What an exported model (ONNX Runtime, OpenVINO) needs from the run: torch is not imported.

    Raises:
        RunFolderError: no valid card, or weights missing or not the card's (see :func:`check_weights`).
    """
    card = read_card(run_dir)
    check_weights(Path(run_dir) / MODEL_FILE, card.weights_sha256)
    return card


def load_model(run_dir: str | Path, card: ModelCard) -> nn.Module:
    """The trained network ``card`` describes, in eval mode, its weights from ``run_dir`` checked against the card.

    Raises:
        HematoVisionError: torch cannot be imported (an exported backend needs no torch: see :func:`read_run`).
    """
    try:
        import torch  # noqa: F401  # only to say in one line what is missing
    except ImportError as error:
        raise HematoVisionError(f"the PyTorch model of {run_dir} needs torch, which cannot be imported ({error}); "
                                "export the run (`hematovision export RUN`) and use --backend onnx, or install torch"
                                ) from None
    model = build_model(card)
    load_weights(model, Path(run_dir) / MODEL_FILE, card.weights_sha256)
    return model.eval()


def load_run(run_dir: str | Path) -> tuple[ModelCard, nn.Module]:
    """The card and the trained network of a run folder, its weights checked against the card."""
    card = read_card(run_dir)
    return card, load_model(run_dir, card)


def read_split(run_dir: str | Path, split_file: str = SPLIT_FILE) -> dict[str, list[Sample]]:
    """The samples of each part (``train``, ``val``, ``test`` or fold numbers) of a run's split CSV.

    Relative paths are tried from the current folder, then from the run folder.

    Raises:
        DatasetError: the run has no split file.
    """
    from hematovision.data.splits import read_split_csv

    run_dir = Path(run_dir)
    path = run_dir / split_file
    if not path.is_file():
        raise DatasetError(f"{run_dir} has no {split_file}; give the images with --data DIR instead")
    parts: dict[str, list[Sample]] = {}
    for sample, part in read_split_csv(path):
        file = sample.path
        if not file.is_absolute() and not file.exists() and (run_dir / file).exists():
            file = run_dir / file
        parts.setdefault(str(part), []).append(Sample(file, sample.label, str(part), sample.source))
    return parts


def recorded_source(run_dir: str | Path, name: str) -> str | None:
    """The weights' sha256 an export file (``export.json``, ``serving.json``) says it was made from."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        sha = json.loads(path.read_text()).get("source_sha256")
    except (ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) else None
