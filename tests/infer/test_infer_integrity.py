"""A damaged run folder is one clear line from ``predict``, ``evaluate`` and ``serve``: never a traceback, never "nan".

Every case of issue 13 (flipped bytes, truncated weights, NaN weights, finite weights whose outputs
overflow, bad temperatures, broken model cards) is made on a copy of a tiny trained run and given
to the three commands; ``serve`` must refuse to start (exit 2) before it listens. A model that
goes non-finite after the server started answers a clear 503 and stores nothing (never a 500).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hematovision.cli import main
from hematovision.run import CARD_FILE, MODEL_FILE

pytest.importorskip("fastapi")

NAN_TOKEN = re.compile(r"(?<![A-Za-z])nan(?![A-Za-z])")  # "confidence nan"; "NaN" in an error message is fine




def _card(run: Path) -> dict:
    return json.loads((run / CARD_FILE).read_text())


def _set_card(**changes: object) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        card = _card(run)
        card.update(changes)
        (run / CARD_FILE).write_text(json.dumps(card))
    return change


def _set_preprocessing(**changes: object) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        card = _card(run)
        card["preprocessing"].update(changes)
        (run / CARD_FILE).write_text(json.dumps(card))
    return change


def _drop(key: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        card = _card(run)
        del card[key]
        (run / CARD_FILE).write_text(json.dumps(card))
    return change


def _raw_card(text: str) -> Callable[[Path], None]:
    return lambda run: (run / CARD_FILE).write_text(text)


def _flip_two_bytes(run: Path) -> None:
    data = bytearray((run / MODEL_FILE).read_bytes())
    data[-10] ^= 0xFF
    data[-20] ^= 0xFF
    (run / MODEL_FILE).write_bytes(bytes(data))


def _truncate(run: Path) -> None:
    data = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(data[: len(data) // 2])


def _fill_weights(value: float, head_only: bool) -> Callable[[Path], None]:
    """Weights set to ``value`` and the card re-signed, so only the values (not the hash) are wrong."""
    def change(run: Path) -> None:
        state = load_file(str(run / MODEL_FILE))
        keys = [k for k, v in state.items() if v.is_floating_point() and "running_var" not in k]
        for key in keys[-2:] if head_only else keys:
            state[key].fill_(value)
        save_file(state, str(run / MODEL_FILE))
        card = _card(run)
        card["files"][MODEL_FILE]["sha256"] = hashlib.sha256((run / MODEL_FILE).read_bytes()).hexdigest()
        (run / CARD_FILE).write_text(json.dumps(card))
    return change


# name → (how to damage the run, words the one error line must contain)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "two_flipped_bytes": (_flip_two_bytes, "changed or damaged"),
    "truncated_weights": (_truncate, "changed or damaged"),
    "truncated_weights_unsigned": (lambda run: (_truncate(run), _drop("files")(run)), "not a readable safetensors"),
    "missing_weights": (lambda run: (run / MODEL_FILE).unlink(), "weight file not found"),
    "nan_head": (_fill_weights(float("nan"), head_only=True), "NaN or infinite values"),
    "finite_weights_nan_outputs": (_fill_weights(3e38, head_only=False), "non-finite outputs"),
    "temperature_0": (_set_card(temperature=0), "temperature"),
    "temperature_negative": (_set_card(temperature=-1.0), "temperature"),
    "temperature_nan": (_set_card(temperature=float("nan")), "temperature"),  # json writes the literal NaN
    "temperature_string": (_set_card(temperature="1.5"), "temperature"),
    "temperature_huge": (_set_card(temperature=1e308), "temperature"),
    "card_not_json": (_raw_card("{not json"), "not valid JSON"),
    "card_empty": (_raw_card(""), "not valid JSON"),
    "card_json_list": (_raw_card("[1, 2, 3]"), "a JSON object was expected"),
    "card_missing_class_names": (_drop("class_names"), "incomplete"),
    "card_missing_preprocessing": (_drop("preprocessing"), "preprocessing"),
    "card_class_names_empty": (_set_card(class_names=[]), "class_names"),
    "card_class_names_duplicated": (_set_card(class_names=["a", "a", "b"]), "duplicates"),
    "card_class_names_not_a_list": (_set_card(class_names="a,b,c"), "class_names"),
    "card_more_classes_than_weights": (_set_card(class_names=["a", "b", "c", "d"]), "does not fit this model"),
    "card_unknown_backbone": (_set_card(backbone="resnet9000"), "resnet9000"),
    "card_image_size_string": (_set_preprocessing(image_size="32"), "preprocessing"),
    "card_image_size_huge": (_set_preprocessing(image_size=10**30), "preprocessing"),
    "card_huge_head": (_set_card(mode="frozen", frozen={"taps": [1], "num_features": 10**18, "hidden": 0}),
                       "num_features"),
    "card_files_a_list": (_set_card(files=["model.safetensors"]), "files"),
    "card_data_a_list": (_set_card(data=[1]), "data"),
    "card_tta_string": (_set_card(tta="4"), "tta"),
}


@pytest.fixture(params=sorted(DAMAGE))
def damaged_run(request: pytest.FixtureRequest, tiny_run: Path, tmp_path: Path) -> tuple[Path, str]:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage, words = DAMAGE[request.param]
    damage(run)
    return run, words


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve"])
def test_a_damaged_run_is_one_line_everywhere(command: str, damaged_run: tuple[Path, str], synthetic_dataset: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run, words = damaged_run
    argv = {
        "predict": ["predict", str(run), str(synthetic_dataset / "NEUTROPHIL"), "--out", str(tmp_path / "p.csv")],
        "evaluate": ["evaluate", str(run), "--data", str(synthetic_dataset), "--out", str(tmp_path / "ev")],
        # Never reaches uvicorn: the app (and its model) is built first, and a bad run stops it there.
        "serve": ["serve", "--model", str(run), "--db", str(tmp_path / "hv.db"), "--port", "1", "--no-auth"],
    }[command]
    if command == "serve":
        import uvicorn

        def served(*_args: object, **_kwargs: object) -> None:
            pytest.fail("the server started on a damaged run")

        monkeypatch.setattr(uvicorn, "run", served)
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("hematovision: error:")]
    assert code == 2
    assert "Traceback" not in captured.out + captured.err
    assert len(errors) == 1 and words in errors[0]
    assert captured.err.rstrip("\n").splitlines()[-1] == errors[0]  # nothing after the error line
    assert not NAN_TOKEN.search(captured.out + captured.err)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "ev" / "metrics.json").exists()


def test_a_model_that_goes_non_finite_while_serving_answers_503_and_stores_nothing(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from hematovision.data.classes import WBC5
    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model
    from hematovision.serve.app import create_app
    from hematovision.serve.settings import Settings

    def png(seed: int = 0) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    torch.manual_seed(0)
    predictor = SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                                temperature=1.0, card={"backbone": "tiny_cnn"})
    app = create_app(Settings(db=tmp_path / "hv.db", auth=False), predictor=predictor)
    with TestClient(app, base_url="http://localhost") as client:
        assert client.post("/api/v1/predict", files=[("files", ("a.png", png(), "image/png"))]).status_code == 200
        with torch.no_grad():
            for parameter in predictor.model.parameters():
                parameter.fill_(float("inf"))
        answer = client.post("/api/v1/predict", files=[("files", ("b.png", png(1), "image/png"))])
        assert answer.status_code == 503
        assert "non-finite outputs" in answer.json()["detail"] and not NAN_TOKEN.search(answer.text)
        assert client.get("/api/v1/analyses").json()["total"] == 1  # only the first upload was stored
        assert client.get("/health").status_code == 200  # the server stays up
