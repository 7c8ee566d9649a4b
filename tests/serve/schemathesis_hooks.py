"""Schemathesis hooks for the HematoVision API: real image files for the upload's declared media types.

The OpenAPI document says ``files`` parts are ``image/png, image/jpeg, image/gif, image/bmp, image/tiff,
image/webp`` or ``application/zip`` (``encoding.contentType``). JSON Schema cannot say "bytes that decode
as an image", so by default schemathesis sends a few built-in sample files or random bytes, which the
server rightly refuses (415). These strategies give each media type what it names: decodable images of
random size and pixels, and zips of them. Negative cases (random bytes, wrong types) are still generated
by schemathesis for the body as a whole and must still be refused.

Used by ``test_serve_contract.py`` (imported) and by the CLI run in the README:
``SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH=tests/serve st run ...``.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary

IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/bmp": "BMP",
                 "image/tiff": "TIFF", "image/webp": "WEBP"}


@st.composite
def pixels(draw: st.DrawFn) -> Image.Image:
    """An RGB image of 1-48 px a side with drawn pixel values."""
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    data = draw(st.binary(min_size=width * height * 3, max_size=width * height * 3))
    return Image.frombytes("RGB", (width, height), data)


def encoded(image_format: str) -> st.SearchStrategy[bytes]:
    """Images encoded in ``image_format`` (a Pillow format name)."""

    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        return buffer.getvalue()

    return pixels().map(encode)


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    """A zip of 1-3 images of drawn formats, stored or deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as archive:
        for index in range(draw(st.integers(1, 3))):
            media_type = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
            archive.writestr(f"cell-{index}.{IMAGE_FORMATS[media_type].lower()}", draw(encoded(IMAGE_FORMATS[media_type])))
    return buffer.getvalue()


def register() -> None:
    """Register the strategies (idempotent: registering again replaces them)."""
    for media_type, image_format in IMAGE_FORMATS.items():
        schemathesis.openapi.media_type(media_type, encoded(image_format))
    schemathesis.openapi.media_type("application/zip", zips())


register()


UPLOAD_FIELDS = {"files", "sample"}
SAMPLE_MAX = 200  # the document's maxLength of 'sample'


def _single_file(body: object) -> bool:
    return isinstance(body, dict) and isinstance(body.get("files"), (bytes, Binary))


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """Send an upload's ``files`` as file parts, as the document declares (each with a filename).

    With ``encoding.contentType`` on an array property, schemathesis 4.32 draws one value for the whole
    array and sends it as a part without a filename, which a multipart parser reads as a text field. On
    the wire a one-element list is the same request, with the file part the document asks for.
    """
    if _single_file(case.body):
        case.body = {**case.body, "files": [case.body["files"]]}
    return case


def valid_upload(body: object) -> bool:
    """Whether a multipart body, as sent, is one the document allows (known fields, files, a short sample)."""
    if not isinstance(body, dict):
        return False
    files = body.get("files")
    files = [files] if isinstance(files, (bytes, Binary)) else files
    sample = body.get("sample", "")
    # Multipart sends every value as text: a number or a boolean drawn for 'sample' arrives as a valid string.
    sample = str(sample) if isinstance(sample, (int, float)) else sample
    return (set(body) <= UPLOAD_FIELDS and isinstance(files, list) and len(files) > 0
            and all(isinstance(item, (bytes, Binary)) and len(item.data if isinstance(item, Binary) else item) > 0
                    for item in files)
            and isinstance(sample, str) and len(sample) <= SAMPLE_MAX)


@schemathesis.hook
def filter_failure(context: schemathesis.HookContext, failure: Any, case: schemathesis.Case, response: Any) -> bool:
    """Drop "negative data accepted" for an upload that was valid as sent; keep every other failure.

    The same quirk: a negative case whose only negation was "``files`` is not an array" is, on the
    wire, one valid file part, so the server rightly accepts it. Only that failure, on the upload, for a
    body the document fully allows (see :func:`valid_upload`), is dropped; schemathesis counts the
    dropped failures in its summary.
    """
    return not (type(failure).__name__ == "AcceptedNegativeData" and case.operation.path == "/api/v1/predict"
                and case.method.upper() == "POST" and valid_upload(case.body))
