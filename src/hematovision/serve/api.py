"""The versioned JSON API (``/api/v1``) and the health check."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from hematovision._io import write_bytes
from hematovision.infer.morphology import Measured
from hematovision.serve.audit import AuditEvent, audit_rows, record_audit
from hematovision.serve.auth import Admin, CurrentUser, Reviewer, authenticate, client_address
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
    reencode,
)
from hematovision.serve.users import User

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
               "tiff": "image/tiff", "webp": "image/webp"}
TEXT_FIELDS = {"sample": 200}  # accepted non-file form fields and their longest value


@dataclass
class AppState:
    """What the routes share: settings, the engine, the database and the micro-batcher."""

    settings: Settings
    engine: Engine
    db: Database
    batcher: MicroBatcher[np.ndarray | Measured, ImagePrediction]

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
# SQLite's integers are 64-bit: a larger id cannot exist, and binding one raises OverflowError (a 500).
RowId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


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
    version: int = Field(description="send it back as expected_version with a review, sign-off or amendment")
    signed_off_by: str | None = Field(default=None, description="the reviewer who signed it off (then read-only)")
    signed_off_at: str | None = None
    amended_by: str | None = Field(default=None, description="the admin who last amended it after sign-off")
    amended_at: str | None = None


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


_EXPECTED_VERSION = "the analysis's version when it was read: 409 if it changed since (required)"


class ReviewRequest(BaseModel):
    """The reviewer is the logged-in user; a ``reviewer`` field is refused (422), not trusted."""

    model_config = ConfigDict(extra="forbid")
    labels: list[ReviewItem] = Field(min_length=1, max_length=10_000)
    expected_version: int = Field(ge=0, description=_EXPECTED_VERSION)


class SignOffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expected_version: int = Field(ge=0, description=_EXPECTED_VERSION)


class AmendRequest(ReviewRequest):
    reason: str = Field(min_length=3, max_length=500, description="why the signed-off result is changed (audited)")


class AuditOut(BaseModel):
    id: int
    at: str = Field(description="ISO 8601, UTC")
    user: str
    action: str = Field(description="e.g. upload, view, review, signoff, amend, export")
    analysis_id: int | None
    detail: str
    client: str | None = Field(description="the client's IP address")


class Health(BaseModel):
    status: str
    backend: str
    classes: int
    mean_batch_size: float | None = Field(default=None, description="over the last 1000 model calls")


# Every route of ``router`` needs a logged-in user (401 otherwise): a route added here cannot forget it.
router = APIRouter(dependencies=[Depends(authenticate)])
public_router = APIRouter()  # only /health: a load balancer's probe has no credentials

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {"type": "array", "minItems": 1,
                              "items": {"type": "string", "format": "binary", "minLength": 1},
                              "description": "images (JPEG, PNG, GIF, BMP, TIFF, WebP) or zips of images; the type "
                                             "is judged by the content (415 otherwise), not by the part's type"},
                    "sample": {"type": "string", "maxLength": TEXT_FIELDS["sample"],
                               "description": "optional sample/slide name"},
                },
                "additionalProperties": False,  # any other field is refused (422)
            },
            "encoding": {"files": {
                "contentType": ", ".join([*MEDIA_TYPES.values(), "application/zip"]),
                # A part without a filename is a text field to the multipart parser, refused with 422.
                "headers": {"Content-Disposition": {
                    "required": True, "description": "each part is a file upload, with a filename",
                    "schema": {"type": "string", "example": 'form-data; name="files"; filename="cell.png"'}}},
            }},
        }},
    }
}
# A route's own error codes; serve/contract.py adds those of the app's wiring and the ErrorOut schema to all.
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such analysis"}}
_NOT_FOUND_LABELS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such analysis, or a prediction_id that is not part of it"}}
_NO_PREDICTION: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such prediction, or its image is no longer stored"}}


@public_router.get("/health", response_model=Health, tags=["service"])
def health(state: State) -> dict[str, Any]:
    """Liveness: the model is loaded and the app answers."""
    sizes = state.batcher.batch_sizes
    return {"status": "ok", "backend": state.engine.backend, "classes": len(state.engine.class_names),
            "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None}


@router.get("/api/v1/model", tags=["model"])
def model_card(state: State) -> dict[str, Any]:
    """The served model's card, preprocessing, backend and review policy."""
    return state.engine.describe()


@router.post("/api/v1/predict", response_model=PredictResponse, tags=["predict"], openapi_extra=_UPLOAD_SCHEMA,
             responses={400: {"description": "no file, an empty file, a malformed multipart body or a damaged image"},
                        413: {"description": "too many files, or a file, zip or image over the server's limits"},
                        415: {"description": "not multipart/form-data, or a file that is neither an image nor a zip"},
                        422: {"description": "a field other than 'files' and 'sample', or 'sample' too long"},
                        503: {"description": "the model gave a non-finite output: nothing was stored"}})
async def predict(request: Request, state: State, user: CurrentUser) -> dict[str, Any]:
    """Classify one or more images (multipart parts named ``files``; zips are unpacked).

    The analysis and its predictions are stored; the answer has, per image, the label,
    confidence, probabilities and whether a person should review it.
    """
    settings = state.settings
    files, sample = await _read_form(request, settings)
    limits = UploadLimits(settings.max_file_bytes, settings.max_files, settings.max_pixels,
                          settings.max_zip_bytes, settings.max_zip_ratio, settings.max_request_pixels)
    raw_images = await run_in_threadpool(expand_uploads, files, limits)
    prepared = await run_in_threadpool(_decode_all, raw_images, state.engine, settings.max_pixels)
    predictions = await state.batcher.submit([item.model_input for item in prepared])
    audit = AuditEvent(user.name, "upload", f"{len(raw_images)} image(s)", client_address(request))
    analysis_id = await run_in_threadpool(_store, state, sample, raw_images, prepared, predictions, audit)
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


@router.get("/api/v1/analyses/{analysis_id}", response_model=AnalysisOut, tags=["analyses"], responses=_NOT_FOUND)
def get_analysis(analysis_id: RowId, state: State, user: CurrentUser, request: Request) -> dict[str, Any]:
    """One analysis with every prediction, its review, sign-off and the differential count (audited as a view)."""
    analysis = state.db.get_analysis(analysis_id)
    record_audit(state.db, user.name, "view", analysis_id, client=client_address(request))
    return _analysis_out(analysis, state)


@router.post("/api/v1/analyses/{analysis_id}/review", response_model=AnalysisOut, tags=["analyses"],
             responses={**_NOT_FOUND_LABELS,
                        409: {"description": "the analysis changed since expected_version, or is signed off"}})
def review_analysis(analysis_id: RowId, review: ReviewRequest, state: State, user: CurrentUser,
                    request: Request) -> dict[str, Any]:
    """Confirm (send the predicted label) or correct (send another) the labels of some images, as the logged-in user.

    Use ``excluded`` for an image that is not a white blood cell; it leaves the differential.
    Refused with 409 once the analysis is signed off (an admin amends it instead).
    """
    return _change_labels(analysis_id, review, state, user, request, reason=None)


@router.post("/api/v1/analyses/{analysis_id}/signoff", response_model=AnalysisOut, tags=["analyses"],
             responses={403: {"description": "the user is a technologist"}, **_NOT_FOUND,
                        409: {"description": "changed since expected_version, already signed off, or flagged "
                                             "images not reviewed yet"}})
def sign_off_analysis(analysis_id: RowId, body: SignOffRequest, state: State, user: Reviewer,
                      request: Request) -> dict[str, Any]:
    """Sign the analysis off (reviewer or admin): the result is released and becomes read-only.

    Every image flagged for review must have been reviewed first.
    """
    audit = AuditEvent(user.name, "signoff", f"signed off at version {body.expected_version}", client_address(request))
    state.db.sign_off(analysis_id, user.name, body.expected_version, audit=audit.insert)
    return _analysis_out(state.db.get_analysis(analysis_id), state)


@router.post("/api/v1/analyses/{analysis_id}/amend", response_model=AnalysisOut, tags=["analyses"],
             responses={403: {"description": "the user is not an admin"}, **_NOT_FOUND_LABELS,
                        409: {"description": "changed since expected_version, or not signed off"}})
def amend_analysis(analysis_id: RowId, amendment: AmendRequest, state: State, user: Admin,
                   request: Request) -> dict[str, Any]:
    """Correct labels of a signed-off analysis (admin only), with the reason; it stays signed off, marked amended."""
    return _change_labels(analysis_id, amendment, state, user, request, reason=amendment.reason)


class DeletedOut(BaseModel):
    """What deleting an analysis removed."""

    analysis_id: int
    predictions: int
    reviews: int
    files: int


@router.delete("/api/v1/analyses/{analysis_id}", response_model=DeletedOut, tags=["analyses"],
               responses={403: {"description": "the user is not an admin"},
                          404: {"description": "no such analysis"}})
def delete_analysis_route(analysis_id: RowId, state: State, user: Admin, request: Request,
                          reason: Annotated[str, Query(min_length=3, max_length=500,
                                                       description="why it is deleted (kept in the audit trail)")],
                          ) -> dict[str, Any]:
    """Delete one analysis for good (admin only): its records and the images no other analysis uses.

    The audit trail keeps the deletion with its reason (never the sample name).
    """
    from hematovision.serve.retention import delete_analysis

    audit = AuditEvent(user.name, "delete", f"deleted: {reason}", client_address(request))
    deleted = delete_analysis(state.db, state.settings.storage_dir, analysis_id, audit=audit.insert)
    return {"analysis_id": analysis_id, "predictions": deleted.predictions, "reviews": deleted.reviews,
            "files": deleted.files}


@router.get("/api/v1/analyses/{analysis_id}/audit", response_model=list[AuditOut], tags=["analyses"],
            responses=_NOT_FOUND)
def analysis_audit(analysis_id: RowId, state: State) -> list[dict[str, Any]]:
    """The audit trail of one analysis, oldest first: who viewed, reviewed, signed off, amended or exported it."""
    state.db.get_analysis(analysis_id)  # 404 for an analysis that does not exist
    return audit_rows(state.db, analysis_id=analysis_id)


@router.get("/api/v1/analyses/{analysis_id}/export.csv", tags=["analyses"],
            response_class=Response, responses={200: {"content": {"text/csv": {}}}, **_NOT_FOUND})
def export_csv(analysis_id: RowId, state: State, user: CurrentUser, request: Request,
               kind: Literal["images", "differential"] = "images") -> Response:
    """The analysis as CSV: one row per image (``kind=images``) or the differential count (audited)."""
    analysis = state.db.get_analysis(analysis_id)
    record_audit(state.db, user.name, "export", analysis_id, f"CSV ({kind})", client_address(request))
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
            responses={200: {"content": {"image/*": {}}}, **_NO_PREDICTION})
def prediction_image(prediction_id: RowId, state: State) -> Response:
    """The stored image of one prediction."""
    prediction = state.db.get_prediction(prediction_id)
    path = _stored_path(state, prediction["stored_name"])
    if not path.is_file():
        raise HTTPException(404, f"the image of prediction {prediction_id} is no longer stored")
    kind = next((k for k, ext in EXTENSIONS.items() if path.suffix == ext), "jpeg")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[kind],
                    headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


@router.get("/api/v1/predictions/{prediction_id}/heatmap.png", tags=["analyses"], response_class=Response,
            responses={200: {"content": {"image/png": {}}},
                       404: {"description": "no such prediction, its image is no longer stored, or Grad-CAM is off"},
                       422: {"description": "an invalid prediction id, or a label the model does not have"}})
def prediction_heatmap(prediction_id: RowId, state: State, label: str | None = None) -> Response:
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


class _Decoded(NamedTuple):
    model_input: np.ndarray | Measured  # Engine.prepare's
    size: tuple[int, int]  # width, height
    stored: tuple[bytes, str]  # what is stored, and its format: the decoded pixels re-encoded, never the upload


def _decode_all(raw_images: list[RawImage], engine: Engine, max_pixels: int) -> list[_Decoded]:
    prepared = []
    for raw in raw_images:
        image = decode_image(raw, max_pixels)
        prepared.append(_Decoded(engine.prepare(image), (image.shape[1], image.shape[0]), reencode(image, raw.kind)))
    return prepared


def _store(state: AppState, sample: str, raw_images: list[RawImage],
           prepared: list[_Decoded], predictions: list[ImagePrediction], audit: AuditEvent) -> int:
    records = []
    for raw, decoded, prediction in zip(raw_images, prepared, predictions):
        width, height = decoded.size
        digest = hashlib.sha256(raw.data).hexdigest()  # of the upload, so a lab can match its own file
        # The stored name comes from the content, never from the client: no path tricks, and
        # an image uploaded twice is kept once. The stored file is a fresh encoding of the pixels:
        # metadata, trailing bytes and polyglot payloads of the upload never reach the disk.
        stored_bytes, stored_kind = decoded.stored
        stored_name = f"{digest[:2]}/{digest}{EXTENSIONS[stored_kind]}"
        path = _stored_path(state, stored_name)
        if not path.exists():
            write_bytes(path, stored_bytes)
        records.append(PredictionRecord(
            filename=raw.filename, stored_name=stored_name, sha256=digest, width=width, height=height,
            label=prediction.label, confidence=prediction.confidence, probabilities=prediction.probabilities,
            ood_score=prediction.ood_score, needs_review=prediction.needs_review,
            review_reasons=prediction.reasons,
        ))
    # Images are written first; the analysis (and its audit row) appear only when its one transaction commits.
    return state.db.add_analysis(sample, state.model_name, records, audit=audit.insert)


def _change_labels(analysis_id: int, change: ReviewRequest, state: AppState, user: User, request: Request,
                   reason: str | None) -> dict[str, Any]:
    """A review (``reason`` None) or an admin's amendment, stored with its audit row in one transaction."""
    labels = {item.prediction_id: item.label for item in change.labels}
    before = state.db.get_analysis(analysis_id)
    # Read before the change: if the analysis moves on in between, expected_version makes the change fail,
    # so the "was" labels below are those the change replaced.
    was = {p["id"]: p["final_label"] for p in before["predictions"]}
    changes = ", ".join(f"#{pid} {was.get(pid, '?')}→{label}" if was.get(pid) != label else f"#{pid} {label} (confirmed)"
                        for pid, label in labels.items())
    detail = (f"reason: {reason}; " if reason is not None else "") + f"{len(labels)} label(s): {changes}"
    audit = AuditEvent(user.name, "review" if reason is None else "amend", detail, client_address(request))
    state.db.review(analysis_id, labels, user.name, [*state.engine.class_names, EXCLUDED], change.expected_version,
                    amend=reason is not None, audit=audit.insert)
    return _analysis_out(state.db.get_analysis(analysis_id), state)


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


__all__ = ["AppState", "differential_count", "public_router", "router"]
