"""The versioned JSON API (``/api/v1``) and the health check."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from hematovision._io import write_bytes
from hematovision.serve.batching import MicroBatcher
from hematovision.serve.db import (
    EXCLUDED,
    Database,
    PredictionRecord,
    differential_count,
)
from hematovision.serve.engine import Engine, ImagePrediction
from hematovision.serve.settings import Settings
from hematovision.serve.uploads import (
    EXTENSIONS,
    RawImage,
    UploadError,
    UploadLimits,
    decode_image,
    expand_uploads,
)

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
               "tiff": "image/tiff", "webp": "image/webp"}
TEXT_FIELDS = {"sample": 200}  # accepted non-file form fields and their longest value


@dataclass
class AppState:
    """What the routes share: settings, the engine, the database and the micro-batcher."""

    settings: Settings
    engine: Engine
    db: Database
    batcher: MicroBatcher[np.ndarray, ImagePrediction]

    @property
    def model_name(self) -> str:
        """How analyses name the model: run folder, backbone and mode, e.g. ``pbc-lite0: efficientnet_lite0 (finetune)``."""
        card = self.engine.card
        name = str(card.get("backbone") or "model")
        if card.get("mode"):
            name += f" ({card['mode']})"
        return f"{self.settings.model.name}: {name}" if self.settings.model else name


def get_state(request: Request) -> AppState:
    """FastAPI dependency: the app's shared state."""
    state: AppState = request.app.state.hv  # set by create_app; Starlette's State holds untyped attributes
    return state


State = Annotated[AppState, Depends(get_state)]


# ---- response and request models (they make the OpenAPI docs at /docs) ----

class Differential(BaseModel):
    total: int = Field(description="images counted (reviewed label when there is one, 'excluded' left out)")
    excluded: int
    counts: dict[str, int]
    percent: dict[str, float]


class PredictionOut(BaseModel):
    id: int
    position: int
    filename: str = Field(description="the client's file name (display only; never used as a path)")
    sha256: str
    width: int
    height: int
    label: str
    confidence: float
    probabilities: dict[str, float]
    needs_review: bool
    review_reasons: list[str]
    ood_score: float | None
    reviewed_label: str | None = None
    reviewer: str | None = None
    reviewed_at: str | None = None
    final_label: str
    image_url: str
    heatmap_url: str | None


class AnalysisSummary(BaseModel):
    id: int
    created_at: str
    sample: str
    model: str
    n_images: int
    n_reviewed: int
    n_needs_review: int
    review_status: Literal["unreviewed", "partial", "reviewed"]
    version: int


class AnalysisOut(AnalysisSummary):
    predictions: list[PredictionOut]
    differential: Differential


class LabShiftOut(BaseModel):
    score: float = Field(description="the images' lab-shift score: about 1 for images like the training data")
    threshold: float | None = Field(description="above it the images are taken to come from another lab")
    n_images: int
    shifted: bool
    message: str | None = Field(description="the warning, when shifted")


class PredictResponse(BaseModel):
    analysis_id: int
    results: list[PredictionOut]
    differential: Differential
    backend: str
    lab_shift: LabShiftOut | None = Field(
        default=None, description="how unlike the training data these images are (null: the run has no reference)")


class AnalysisPage(BaseModel):
    items: list[AnalysisSummary]
    total: int
    page: int
    page_size: int


class ReviewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: int
    label: str = Field(description="a class name, or 'excluded' for an image that is not a white blood cell")


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[ReviewItem] = Field(min_length=1, max_length=10_000)
    reviewer: str = Field(default="anonymous", max_length=100)
    expected_version: int | None = Field(
        default=None, description="refuse with 409 if the analysis changed since this version was read"
    )


class Health(BaseModel):
    status: str
    backend: str
    classes: int
    mean_batch_size: float | None = Field(default=None, description="over the last 1000 model calls")


router = APIRouter()

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "images (JPEG, PNG, GIF, BMP, TIFF, WebP) or zips of images"},
                "sample": {"type": "string", "maxLength": 200, "description": "optional sample/slide name"},
            },
        }}},
    }
}


@router.get("/health", response_model=Health, tags=["service"])
def health(state: State) -> dict[str, Any]:
    """Liveness: the model is loaded and the app answers."""
    sizes = state.batcher.batch_sizes
    return {"status": "ok", "backend": state.engine.backend, "classes": len(state.engine.class_names),
            "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None}


@router.get("/api/v1/model", tags=["model"])
def model_card(state: State) -> dict[str, Any]:
    """The served model's card, preprocessing, backend and review policy."""
    return state.engine.describe()


@router.post("/api/v1/predict", response_model=PredictResponse, tags=["predict"], openapi_extra=_UPLOAD_SCHEMA)
async def predict(request: Request, state: State) -> dict[str, Any]:
    """Classify one or more images (multipart parts named ``files``; zips are unpacked).

    The analysis and its predictions are stored; the answer has, per image, the label,
    confidence, probabilities and whether a person should review it.
    """
    settings = state.settings
    files, sample = await _read_form(request, settings)
    limits = UploadLimits(settings.max_file_bytes, settings.max_files, settings.max_pixels,
                          settings.max_zip_bytes, settings.max_zip_ratio)
    raw_images = await run_in_threadpool(expand_uploads, files, limits)
    prepared = await run_in_threadpool(_decode_all, raw_images, state.engine, settings.max_pixels)
    predictions = await state.batcher.submit([image for image, _ in prepared])
    analysis_id = await run_in_threadpool(_store, state, sample, raw_images, prepared, predictions)
    analysis = await run_in_threadpool(state.db.get_analysis, analysis_id)
    shift = state.engine.lab_shift(predictions)
    return {
        "analysis_id": analysis_id,
        "results": [_prediction_out(p, state) for p in analysis["predictions"]],
        "differential": analysis["differential"],
        "backend": state.engine.backend,
        "lab_shift": shift.to_dict() if shift is not None else None,
    }


@router.get("/api/v1/analyses", response_model=AnalysisPage, tags=["analyses"])
def list_analyses(
    state: State,
    q: Annotated[str, Query(max_length=200, description="search sample names and file names")] = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 20,
    status: Annotated[Literal["unreviewed", "partial", "reviewed", "needs_review"] | None, Query()] = None,
) -> dict[str, Any]:
    """Past analyses, newest first, searchable and paged, with their review status."""
    items, total = state.db.list_analyses(q, page, page_size, status)
    return {"items": items, "total": total, "page": page, "page_size": page_size}


@router.get("/api/v1/analyses/{analysis_id}", response_model=AnalysisOut, tags=["analyses"])
def get_analysis(analysis_id: int, state: State) -> dict[str, Any]:
    """One analysis with every prediction, its review and the differential count."""
    return _analysis_out(state.db.get_analysis(analysis_id), state)


@router.post("/api/v1/analyses/{analysis_id}/review", response_model=AnalysisOut, tags=["analyses"])
def review_analysis(analysis_id: int, review: ReviewRequest, state: State) -> dict[str, Any]:
    """Confirm (send the predicted label) or correct (send another) the labels of some images.

    Use ``excluded`` for an image that is not a white blood cell; it leaves the differential.
    """
    labels = {item.prediction_id: item.label for item in review.labels}
    allowed = [*state.engine.class_names, EXCLUDED]
    reviewer = "".join(c for c in review.reviewer if c.isprintable()).strip() or "anonymous"
    state.db.review(analysis_id, labels, reviewer, allowed, review.expected_version)
    return _analysis_out(state.db.get_analysis(analysis_id), state)


@router.get("/api/v1/analyses/{analysis_id}/export.csv", tags=["analyses"],
            response_class=Response, responses={200: {"content": {"text/csv": {}}}})
def export_csv(analysis_id: int, state: State, kind: Literal["images", "differential"] = "images") -> Response:
    """The analysis as CSV: one row per image (``kind=images``) or the differential count."""
    analysis = state.db.get_analysis(analysis_id)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if kind == "differential":
        diff = analysis["differential"]
        writer.writerow(["class", "count", "percent"])
        for label, count in diff["counts"].items():
            writer.writerow([label, count, f"{diff['percent'][label]:.1f}"])
        writer.writerow(["total", diff["total"], "100.0" if diff["total"] else "0.0"])
        writer.writerow([EXCLUDED, diff["excluded"], ""])
    else:
        classes = state.engine.class_names
        writer.writerow(["analysis_id", "sample", "position", "filename", "sha256", "predicted_label", "confidence",
                         "needs_review", "review_reasons", "reviewed_label", "reviewer", "reviewed_at", "final_label",
                         *[f"p_{c}" for c in classes]])
        for p in analysis["predictions"]:
            writer.writerow([_csv_safe(v) for v in [
                analysis["id"], analysis["sample"], p["position"], p["filename"], p["sha256"], p["label"],
                f"{p['confidence']:.4f}", int(p["needs_review"]), "; ".join(p["review_reasons"]),
                p["reviewed_label"] or "", p["reviewer"] or "", p["reviewed_at"] or "", p["final_label"],
                *[f"{p['probabilities'].get(c, 0.0):.4f}" for c in classes],
            ]])
    name = f"analysis-{analysis_id}{'-differential' if kind == 'differential' else ''}.csv"
    return Response(buffer.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/api/v1/predictions/{prediction_id}/image", tags=["analyses"], response_class=Response,
            responses={200: {"content": {"image/*": {}}}})
def prediction_image(prediction_id: int, state: State) -> Response:
    """The stored image of one prediction."""
    prediction = state.db.get_prediction(prediction_id)
    path = _stored_path(state, prediction["stored_name"])
    if not path.is_file():
        raise HTTPException(404, f"the image of prediction {prediction_id} is no longer stored")
    kind = next((k for k, ext in EXTENSIONS.items() if path.suffix == ext), "jpeg")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[kind],
                    headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


@router.get("/api/v1/predictions/{prediction_id}/heatmap.png", tags=["analyses"], response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def prediction_heatmap(prediction_id: int, state: State, label: str | None = None) -> Response:
    """Grad-CAM overlay: where the model looked for ``label`` (default: the predicted class)."""
    from PIL import Image

    from hematovision.data.images import load_rgb
    from hematovision.infer.gradcam import overlay

    if not state.settings.gradcam:
        raise HTTPException(404, "Grad-CAM is switched off on this server")
    if label is not None and label not in state.engine.class_names:
        raise HTTPException(422, f"unknown label {label!r}; use one of {state.engine.class_names}")
    prediction = state.db.get_prediction(prediction_id)
    path = _stored_path(state, prediction["stored_name"])
    if not path.is_file():
        raise HTTPException(404, f"the image of prediction {prediction_id} is no longer stored")
    image = load_rgb(path, max_pixels=state.settings.max_pixels)
    cam = state.engine.heatmap(image, label or prediction["label"])
    # Shown at most 384 px wide/high: enough for the page, cheap to send.
    scale = min(1.0, 384 / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    shown = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) if scale < 1 else image
    buffer = io.BytesIO()
    Image.fromarray(overlay(shown, cam)).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


# ---- helpers ----

async def _read_form(request: Request, settings: Settings) -> tuple[list[tuple[str | None, bytes]], str]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError("send the images as multipart/form-data, in parts named 'files'", 415)
    try:
        # One more file than allowed lets "too many" be told apart from the parser's own limit.
        form = await request.form(max_files=settings.max_files + 1, max_fields=len(TEXT_FIELDS) + 4,
                                  max_part_size=64 * 1024)
    except HTTPException as error:
        detail = str(error.detail)
        if "Too many files" in detail:
            raise UploadError(f"too many files in one request (more than {settings.max_files})", 413) from None
        raise UploadError(f"malformed multipart request: {detail}", 400) from None
    try:
        files: list[tuple[str | None, bytes]] = []
        sample = ""
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "files":
                    raise UploadError(f"unexpected file field {key!r}; send images in parts named 'files'", 422)
                if value.size is not None and value.size > settings.max_file_bytes:
                    raise UploadError(f"{value.filename}: {value.size:,} bytes is above the per-file limit of "
                                      f"{settings.max_file_bytes:,}", 413)
                files.append((value.filename, await value.read(settings.max_file_bytes + 1)))
            elif key in TEXT_FIELDS:
                if len(value) > TEXT_FIELDS[key]:
                    raise UploadError(f"field {key!r} is longer than {TEXT_FIELDS[key]} characters", 422)
                sample = "".join(c for c in value if c.isprintable()).strip()
            elif key == "files":
                raise UploadError("part 'files' must be a file upload, not a text field", 422)
            else:
                raise UploadError(f"unexpected field {key!r}; allowed: 'files' and {sorted(TEXT_FIELDS)}", 422)
        return files, sample
    finally:
        await form.close()


def _decode_all(raw_images: list[RawImage], engine: Engine, max_pixels: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
    prepared = []
    for raw in raw_images:
        image = decode_image(raw, max_pixels)
        prepared.append((engine.prepare(image), (image.shape[1], image.shape[0])))
    return prepared


def _store(state: AppState, sample: str, raw_images: list[RawImage],
           prepared: list[tuple[np.ndarray, tuple[int, int]]], predictions: list[ImagePrediction]) -> int:
    records = []
    for raw, (_, (width, height)), prediction in zip(raw_images, prepared, predictions):
        digest = hashlib.sha256(raw.data).hexdigest()
        # The stored name comes from the content, never from the client: no path tricks, and
        # an image uploaded twice is kept once.
        stored_name = f"{digest[:2]}/{digest}{EXTENSIONS[raw.kind]}"
        path = _stored_path(state, stored_name)
        if not path.exists():
            write_bytes(path, raw.data)
        records.append(PredictionRecord(
            filename=raw.filename, stored_name=stored_name, sha256=digest, width=width, height=height,
            label=prediction.label, confidence=prediction.confidence, probabilities=prediction.probabilities,
            ood_score=prediction.ood_score, needs_review=prediction.needs_review,
            review_reasons=prediction.reasons,
        ))
    # Images are written first; the analysis appears only when its one transaction commits.
    return state.db.add_analysis(sample, state.model_name, records)


def _stored_path(state: AppState, stored_name: str) -> Path:
    return state.settings.storage_dir / stored_name


def _prediction_out(p: dict[str, Any], state: AppState) -> dict[str, Any]:
    out = {key: value for key, value in p.items() if key != "stored_name"}
    out["image_url"] = f"/api/v1/predictions/{p['id']}/image"
    out["heatmap_url"] = f"/api/v1/predictions/{p['id']}/heatmap.png" if state.settings.gradcam else None
    return out


def _analysis_out(analysis: dict[str, Any], state: AppState) -> dict[str, Any]:
    out = dict(analysis)
    out["predictions"] = [_prediction_out(p, state) for p in analysis["predictions"]]
    return out


def _csv_safe(value: object) -> object:
    # A cell starting with = + - @ is run as a formula by spreadsheet programs; file names come from clients.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


__all__ = ["AppState", "differential_count", "router"]
