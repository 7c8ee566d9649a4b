"""Browser and abuse protections, seen from a client: hosts, headers, rate limits, decode budget, re-encoding.

The slow-client timeouts and disconnects need a real server: tests/serve/test_serve_protect_process.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("limits")
from fastapi.testclient import TestClient
from PIL import Image

from hematovision.data.classes import WBC5
from hematovision.data.transforms import Preprocessing
from hematovision.models import create_model
from hematovision.serve.app import create_app
from hematovision.serve.protect import host_name
from hematovision.serve.settings import Settings


def fake_predictor() -> SimpleNamespace:
    import torch

    torch.manual_seed(0)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn"})


def make_client(tmp_path: Path, base_url: str = "http://localhost", **fields: object) -> TestClient:
    """A client of an app without login (the protections here come before it), unless ``auth=True``."""
    fields.setdefault("auth", False)
    settings = Settings(db=tmp_path / "hv.db", **fields)  # type: ignore[arg-type]
    return TestClient(create_app(settings, predictor=fake_predictor()), base_url=base_url,
                      raise_server_exceptions=False)


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: TestClient, *images: bytes, headers: dict[str, str] | None = None):
    return client.post("/api/v1/predict", files=[("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
                       headers=headers)


# ---- allowed hosts ----

def test_wrong_host_is_refused_with_json(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        refused = client.get("/health", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and "evil.example" in refused.json()["detail"]
        assert refused.headers["x-frame-options"] == "DENY"  # the refusal carries the headers too
        assert client.post("/api/v1/predict", headers={"Host": "attacker.example:8000"}).status_code == 400
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_configured_hosts_replace_the_local_defaults(tmp_path: Path) -> None:
    with make_client(tmp_path, base_url="http://hemato.lab.example", host="127.0.0.1",
                     allowed_hosts=("hemato.lab.example", "*.wards.example")) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "ward3.wards.example"}).status_code == 200
        assert client.get("/health", headers={"Host": "localhost"}).status_code == 400
        assert client.get("/health", headers={"Host": "wards.example.evil.example"}).status_code == 400


def test_default_hosts_follow_the_listen_address() -> None:
    assert Settings(host="hemato-01.lab").trusted_hosts == ("localhost", "127.0.0.1", "::1", "hemato-01.lab")
    assert Settings(host="0.0.0.0").trusted_hosts == ("localhost", "127.0.0.1", "::1")
    env = Settings.from_env({"HEMATOVISION_ALLOWED_HOSTS": "a.example, b.example"})
    assert env.allowed_hosts == ("a.example", "b.example") and env.trusted_hosts == ("a.example", "b.example")
    assert host_name("[::1]:8000") == "::1" and host_name("Lab.Example.:443") == "lab.example"


# ---- security headers ----

def csp_directives(response) -> dict[str, str]:
    return {part.strip().split(" ", 1)[0]: part.strip().partition(" ")[2]
            for part in response.headers["content-security-policy"].split(";")}


def test_every_answer_has_the_security_headers(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        analysis = upload(client, png_bytes()).json()
        answers = {path: client.get(path) for path in
                   ("/", "/history", "/health", "/static/app.js", "/api/v1/analyses", "/api/v1/nothing-here",
                    analysis["results"][0]["image_url"], f"/api/v1/analyses/{analysis['analysis_id']}")}
        for path, response in answers.items():
            csp = csp_directives(response)
            assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'self'", path
            assert "unsafe-inline" not in response.headers["content-security-policy"], path
            assert response.headers["x-frame-options"] == "DENY", path
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["referrer-policy"] == "same-origin", path
            assert "strict-transport-security" not in response.headers, path  # not behind TLS
        for path in ("/api/v1/analyses", analysis["results"][0]["image_url"], f"/api/v1/analyses/{analysis['analysis_id']}"):
            assert answers[path].headers["cache-control"] == "no-store", path  # patient data: never cached
        assert answers["/"].status_code == 200 and "no-store" not in answers["/static/app.js"].headers.get("cache-control", "")


def test_pages_have_no_inline_script_or_style(tmp_path: Path) -> None:
    """Under ``script-src 'self'`` an inline script would not run: the pages must not need one."""
    static = Path(__file__).parents[2] / "src" / "hematovision" / "serve" / "static"
    for page in static.glob("*.html"):
        html = page.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>\s*\S", html), page.name
        assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), page.name  # onclick= and friends
        assert not re.search(r"\sstyle\s*=", html, re.IGNORECASE), page.name
        assert "javascript:" not in html, page.name


def test_hsts_only_when_switched_on(tmp_path: Path) -> None:
    with make_client(tmp_path, hsts=True) as client:
        assert client.get("/health").headers["strict-transport-security"].startswith("max-age=")


def test_docs_page_allows_exactly_its_own_inline_script(tmp_path: Path) -> None:
    pytest.importorskip("swagger_ui_bundle")
    with make_client(tmp_path) as client:
        docs = client.get("/docs")
    scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", docs.text, re.DOTALL)
    assert scripts, "FastAPI's Swagger page starts Swagger UI with an inline script"
    script_src = csp_directives(docs)["script-src"].split()
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in script_src
    assert "'unsafe-inline'" not in script_src and csp_directives(docs)["frame-ancestors"] == "'none'"


# ---- rate limits ----

def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    with make_client(tmp_path, rate_limit_per_minute=3) as client:
        assert [client.get("/api/v1/model").status_code for _ in range(3)] == [200, 200, 200]
        refused = client.get("/api/v1/analyses")
        assert refused.status_code == 429 and "per minute" in refused.json()["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-frame-options"] == "DENY"
        assert all(client.get("/health").status_code == 200 for _ in range(10))  # the liveness probe is exempt
        # Each credential has its own budget (two users behind one proxy do not share one).
        assert client.get("/api/v1/model", headers={"Authorization": "Bearer user-a"}).status_code == 200
        assert client.get("/api/v1/model", headers={"Cookie": "hv_session=user-b"}).status_code == 200


def test_uploads_have_their_own_smaller_budget(tmp_path: Path) -> None:
    with make_client(tmp_path, upload_rate_limit_per_minute=2, rate_limit_per_minute=100) as client:
        assert [upload(client, png_bytes(i)).status_code for i in range(3)] == [200, 200, 429]
        assert client.get("/api/v1/analyses").status_code == 200  # other calls still go through
        assert client.get("/api/v1/analyses").json()["total"] == 2


def test_failed_logins_are_limited_per_ip(tmp_path: Path) -> None:
    with make_client(tmp_path, auth=True, failed_login_limit_per_minute=3) as client:
        tries = [client.post("/api/v1/auth/token", data={"username": "admin", "password": f"guess-{i}"}).status_code
                 for i in range(5)]
        assert tries == [401, 401, 401, 429, 429]
        assert client.get("/health").status_code == 200 and client.get("/api/v1/model").status_code == 401


def test_inventing_credentials_earns_no_fresh_budget(tmp_path: Path) -> None:
    """Refused credentials (401) count against the client's IP: a new fake token per request is stopped too."""
    with make_client(tmp_path, auth=True, failed_login_limit_per_minute=4) as client:
        statuses = [client.get("/api/v1/analyses", headers={"Authorization": f"Bearer guess-{i}"}).status_code
                    for i in range(6)]
        assert statuses == [401, 401, 401, 401, 429, 429]


def test_rate_limit_can_be_switched_off(tmp_path: Path) -> None:
    with make_client(tmp_path, rate_limit_per_minute=0, upload_rate_limit_per_minute=0) as client:
        assert all(client.get("/api/v1/model").status_code == 200 for _ in range(30))


# ---- decoding budget ----

def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_decode_budget_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: 10 blank 5000×5000 PNGs are a small request but 250 megapixels to decode."""
    import hematovision.serve.uploads as uploads

    decoded: list[int] = []
    real_load = uploads.load_rgb
    monkeypatch.setattr(uploads, "load_rgb", lambda *a, **k: decoded.append(1) or real_load(*a, **k))
    big = blank_png(5000, 5000)
    with make_client(tmp_path) as client:  # default budget: 100 megapixels per request
        response = upload(client, *[big] * 10)
        assert response.status_code == 413, response.text
        assert "250.0 megapixels" in response.json()["detail"] and "100 megapixels" in response.json()["detail"]
        assert decoded == []  # refused from the headers alone
        assert client.get("/api/v1/analyses").json()["total"] == 0


def test_decode_budget_counts_all_images_of_a_request(tmp_path: Path) -> None:
    with make_client(tmp_path, max_request_pixels=5000) as client:
        assert upload(client, png_bytes(1, (50, 50)), png_bytes(2, (50, 50))).status_code == 200  # 5,000 px
        refused = upload(client, png_bytes(1, (50, 50)), png_bytes(2, (50, 50)), png_bytes(3, (40, 40)))
        assert refused.status_code == 413 and "megapixels" in refused.json()["detail"]


# ---- stored images are re-encoded ----

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def with_text_and_trailer(png: bytes, text: bytes, trailer: bytes) -> bytes:
    """A PNG with a tEXt chunk before the image data and bytes after IEND (a polyglot's hiding places)."""
    ihdr_end = 8 + 25
    return png[:ihdr_end] + png_chunk(b"tEXt", b"Comment\x00" + text) + png[ihdr_end:] + trailer


def stored_files(tmp_path: Path) -> list[Path]:
    return [path for path in (tmp_path / "images").rglob("*") if path.is_file()]


def test_stored_image_is_a_clean_reencoding(tmp_path: Path) -> None:
    """A PNG with a text chunk and a payload after its end, and a JPEG with EXIF: neither extra reaches the disk."""
    clean = png_bytes(5, (48, 40))
    hostile = with_text_and_trailer(clean, b"MRN-0012345 Doe, Jane", b"<?php system($_GET['c']); ?>PK\x05\x06" + b"\0" * 18)
    assert Image.open(io.BytesIO(hostile)).text == {"Comment": "MRN-0012345 Doe, Jane"}
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "patient MRN-0099999"  # ImageDescription
    Image.open(io.BytesIO(png_bytes(6))).save(jpeg, format="JPEG", exif=exif, quality=95)
    jpeg_with_trailer = jpeg.getvalue() + b"<?php echo 1; ?>"
    with make_client(tmp_path) as client:
        body = upload(client, hostile, jpeg_with_trailer).json()
        png_down, jpeg_down = (client.get(result["image_url"]) for result in body["results"])
    assert png_down.headers["content-type"] == "image/png" and png_down.content.endswith(b"IEND\xaeB`\x82")
    assert jpeg_down.headers["content-type"] == "image/jpeg" and jpeg_down.content.endswith(b"\xff\xd9")
    for download in (png_down, jpeg_down):
        assert download.status_code == 200
        assert b"MRN-" not in download.content and b"<?php" not in download.content
        shown = Image.open(io.BytesIO(download.content))
        assert not shown.info.get("exif") and not getattr(shown, "text", {})
    # PNG stays lossless: the same pixels. JPEG is re-encoded at quality 95: visually the same.
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_down.content))), np.asarray(Image.open(io.BytesIO(clean))))
    before = np.asarray(Image.open(io.BytesIO(jpeg_with_trailer)).convert("RGB"), dtype=np.float64)
    after = np.asarray(Image.open(io.BytesIO(jpeg_down.content)), dtype=np.float64)
    assert 10 * np.log10(255**2 / np.mean((before - after) ** 2)) > 35  # PSNR in dB, on noise: its worst case
    # The uploaded bytes never reached the disk; the record keeps the upload's sha256.
    files = stored_files(tmp_path)
    assert len(files) == 2 and all(b"MRN-" not in f.read_bytes() and b"<?php" not in f.read_bytes() for f in files)
    assert body["results"][0]["sha256"] == hashlib.sha256(hostile).hexdigest()
