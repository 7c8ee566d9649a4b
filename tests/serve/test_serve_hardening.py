"""Hostile and broken input: every case gets a clear 4xx JSON answer and leaves the database clean."""

from __future__ import annotations

import io
import sqlite3
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
from auth_helpers import authorize  # tests/serve is on sys.path (no __init__.py)
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from hematovision.data.classes import WBC5
from hematovision.data.transforms import Preprocessing
from hematovision.models import create_model
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings
from hematovision.serve.uploads import UploadError, UploadLimits, _read_member, expand_uploads


def fake_predictor() -> SimpleNamespace:
    import torch

    torch.manual_seed(0)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn"})


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_client(tmp_path: Path, **limits: object) -> TestClient:
    settings = Settings(db=tmp_path / "hv.db", **limits)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, predictor=fake_predictor()), raise_server_exceptions=False,
                        base_url="http://localhost")
    return authorize(client)  # an admin's API token on every request


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    limits = {"max_file_bytes": 200_000, "max_request_bytes": 1_000_000, "max_files": 10, "max_pixels": 1_000_000,
              "max_zip_bytes": 500_000}
    with make_client(tmp_path_factory.mktemp("hardening"), **limits) as client:
        yield client


def post(client: TestClient, parts: list[tuple[str, tuple[str, bytes, str]]], data: dict | None = None):
    return client.post("/api/v1/predict", files=parts, data=data)


def image_part(name: str = "a.png", data: bytes | None = None, content_type: str = "image/png"):
    return ("files", (name, png_bytes() if data is None else data, content_type))


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def count_rows(client: TestClient) -> tuple[int, int]:
    db = client.app.state.hv.db.path  # type: ignore[attr-defined]
    with sqlite3.connect(db) as connection:
        return (connection.execute("SELECT COUNT(*) FROM analyses").fetchone()[0],
                connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


def _run_in_threads(target, count: int) -> None:
    """Call ``target(worker)`` for workers 0..count-1 at once, each in its own thread; wait for all."""
    threads = [threading.Thread(target=target, args=(worker,)) for worker in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_clean_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert "Traceback" not in response.text
    for word in words:
        assert word.lower() in detail.lower(), detail


def big_noise_png(side: int) -> bytes:
    return png_bytes(1, (side, side))


# ---- size and count limits ----

def test_file_over_the_per_file_limit(shared_client: TestClient) -> None:
    data = big_noise_png(300)  # ~270 kB of noise: over 200 kB
    assert len(data) > 200_000
    assert_clean_error(post(shared_client, [image_part("big.png", data)]), 413, "big.png", "per-file limit")


def test_request_over_the_declared_size_limit(shared_client: TestClient) -> None:
    parts = [image_part(f"{i}.png", big_noise_png(250)) for i in range(6)]  # each under 200 kB, ~1.1 MB together
    assert_clean_error(post(shared_client, parts), 413, "limit")


def test_streamed_request_over_the_size_limit(shared_client: TestClient) -> None:
    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 50_000  # 2 MB, sent without a Content-Length

    response = shared_client.post("/api/v1/predict", content=chunks(),
                                  headers={"content-type": "multipart/form-data; boundary=x"})
    assert_clean_error(response, 413, "limit")


def test_too_many_files(shared_client: TestClient) -> None:
    tiny = png_bytes(0, (8, 8))
    assert_clean_error(post(shared_client, [image_part(f"{i}.png", tiny) for i in range(11)]), 413, "too many")
    many = [image_part(f"{i}.png", b"x") for i in range(1500)]  # past the multipart parser's own limit too
    assert_clean_error(post(shared_client, many), 413, "too many")


def test_too_many_images_inside_a_zip(shared_client: TestClient) -> None:
    archive = zip_of({f"{i}.png": png_bytes(i, (8, 8)) for i in range(11)})
    assert_clean_error(post(shared_client, [image_part("many.zip", archive, "application/zip")]), 413, "too many")


# ---- type by content ----

def test_type_is_decided_by_content_not_name(shared_client: TestClient) -> None:
    ok = post(shared_client, [image_part("photo.txt", png_bytes(), "text/plain")])
    assert ok.status_code == 200 and ok.json()["results"][0]["filename"] == "photo.txt"
    html = b"<html><script>alert(1)</script></html>"
    assert_clean_error(post(shared_client, [image_part("cell.png", html)]), 415, "cell.png", "content")
    assert_clean_error(post(shared_client, [image_part("x.jpg", b"%PDF-1.4 not an image")]), 415)


# ---- decompression bombs and pixel limits ----

def test_pixel_limit_is_checked_before_decoding(shared_client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")  # 4 MP, a few kB compressed
    assert len(buffer.getvalue()) < 50_000
    assert_clean_error(post(shared_client, [image_part("bomb.png", buffer.getvalue())]), 413, "pixels")


def test_png_header_claiming_a_gigapixel_image(shared_client: TestClient) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    assert_clean_error(post(shared_client, [image_part("huge.png", bomb)]), 413)


def test_tiny_image_is_refused(shared_client: TestClient) -> None:
    assert_clean_error(post(shared_client, [image_part("dot.png", png_bytes(0, (4, 4)))]), 400, "smaller")


# ---- corrupt and truncated files ----

@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_png_and_jpeg(shared_client: TestClient, cut: float) -> None:
    data = png_bytes(2, (64, 64))
    assert_clean_error(post(shared_client, [image_part("cut.png", data[: int(len(data) * cut)])]), 400, "cut.png")
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    response = post(shared_client, [image_part("cut.jpg", jpeg[: int(len(jpeg) * cut)])])
    assert_clean_error(response, 400, "cut.jpg")


def test_signature_with_garbage_after_it(shared_client: TestClient) -> None:
    assert_clean_error(post(shared_client, [image_part("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x07" * 500)]), 400)
    assert_clean_error(post(shared_client, [image_part("fake.bmp", b"BM" + b"\xff" * 100)]), 400)


# ---- zips ----

def test_zip_member_declared_over_the_per_file_limit(shared_client: TestClient) -> None:
    # 5 MB of zeros in ~5 kB: the member's declared size is over the 200 kB per-file limit, so it is
    # refused from the header before anything is inflated (the ratio guard would also catch it).
    bomb = zip_of({"zeros.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 5_000_000})
    assert len(bomb) < 20_000
    assert_clean_error(post(shared_client, [image_part("bomb.zip", bomb)]), 413,
                       "bomb.zip/zeros.png: 5,000,008 bytes unpacked is above the per-file limit of 200,000")


def test_zip_member_over_the_compression_ratio(shared_client: TestClient) -> None:
    # 150 kB of zeros: under the per-file (200 kB) and total (500 kB) limits, but it deflates
    # to ~150 bytes, a ratio near 1000, above the default 200: only the ratio guard applies.
    member = b"\x89PNG\r\n\x1a\n" + b"\0" * 150_000
    bomb = zip_of({"zeros.png": member})
    info = zipfile.ZipFile(io.BytesIO(bomb)).infolist()[0]
    assert info.file_size < 200_000 and info.file_size / info.compress_size > 200
    assert_clean_error(post(shared_client, [image_part("ratio.zip", bomb)]), 413,
                       "ratio.zip/zeros.png: compression ratio is too high (zip bomb?)")


def test_zip_whose_members_unpack_past_the_total_limit(shared_client: TestClient) -> None:
    # Three members of 190 kB each: every one is under the per-file limit (200 kB) and, with 2 kB
    # of noise each, under the ratio limit (~90 < 200); together they pass the 500 kB total cap
    # at the third member, from a ~7 kB archive.
    rng = np.random.default_rng(5)
    members = {f"{i}.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(2_000) + b"\0" * 188_000 for i in range(3)}
    archive = zip_of(members)
    assert len(archive) < 10_000
    for info in zipfile.ZipFile(io.BytesIO(archive)).infolist():
        assert info.file_size < 200_000 and info.file_size / info.compress_size < 200
    assert_clean_error(post(shared_client, [image_part("total.zip", archive)]), 413,
                       "total.zip: more than 500,000 bytes unpacked")


def _lying_zip(payload: bytes, declared: int, crc_of_declared: bool = False) -> bytes:
    """A deflated one-member zip whose central directory understates the member's size."""
    archive = bytearray(zip_of({"a.png": payload}))
    offset = archive.rfind(b"PK\x01\x02")  # central directory entry: CRC at +16, uncompressed size at +24
    archive[offset + 24: offset + 28] = struct.pack("<I", declared)
    if crc_of_declared:  # a careful liar: the CRC of the bytes it claims
        archive[offset + 16: offset + 20] = struct.pack("<I", zlib.crc32(payload[:declared]))
    return bytes(archive)


def test_zip_member_whose_header_lies_about_its_size(shared_client: TestClient) -> None:
    # 300 kB (over the 200 kB per-file limit) in a ~0.4 kB archive that declares 1,000 bytes: it
    # passes the file-size, declared-size and ratio checks. zipfile inflates no more than the
    # declared 1,000 bytes, then the CRC (of the real 300 kB) does not match: a clean 400.
    payload = b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000
    archive = _lying_zip(payload, declared=1_000)
    assert len(archive) < 1_000
    response = post(shared_client, [image_part("liar.zip", archive)])
    assert_clean_error(response, 400)
    assert response.json()["detail"] == "liar.zip/a.png: cannot be unpacked (Bad CRC-32 for file 'a.png')"
    # With a CRC that matches the declared bytes, exactly those 1,000 bytes come out, no more.
    images = expand_uploads([("liar.zip", _lying_zip(payload, 1_000, crc_of_declared=True))],
                            UploadLimits(max_file_bytes=200_000))
    assert [len(image.data) for image in images] == [1_000]


def test_zip_member_read_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The second line behind the declared-size check, unreachable through the API while zipfile
    # honours the declared size: the read itself inflates at most limit + 1 bytes.
    archive_file = zipfile.ZipFile(io.BytesIO(zip_of({"a.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000})))
    member = archive_file.infolist()[0]
    inflated: list[int] = []
    real_open = archive_file.open

    def counting_open(info):
        handle = real_open(info)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            data = real_read(size)
            inflated.append(len(data))
            return data

        handle.read = read
        return handle

    monkeypatch.setattr(archive_file, "open", counting_open)
    with pytest.raises(UploadError, match=r"^big\.zip/a\.png: unpacks to more than 1,000 bytes$") as caught:
        _read_member(archive_file, member, 1_000, "big.zip")
    assert caught.value.status == 413
    assert sum(inflated) == 1_001


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "..\\evil.png"])
def test_zip_path_traversal(shared_client: TestClient, name: str) -> None:
    archive = zip_of({"good.png": png_bytes(), name: png_bytes(1)})
    assert_clean_error(post(shared_client, [image_part("trick.zip", archive)]), 400, "unsafe path")


def test_zip_oddities(shared_client: TestClient) -> None:
    nested = zip_of({"inner.zip": zip_of({"a.png": png_bytes()})})
    assert_clean_error(post(shared_client, [image_part("nested.zip", nested)]), 415, "inside zips")
    assert_clean_error(post(shared_client, [image_part("empty.zip", zip_of({}))]), 400, "no images")
    assert_clean_error(post(shared_client, [image_part("broken.zip", b"PK\x03\x04" + b"\x00" * 60)]), 400, "zip")
    text = zip_of({"notes.txt": b"hello"})
    assert_clean_error(post(shared_client, [image_part("text.zip", text)]), 415, "notes.txt")


# ---- empty requests and wrong fields ----

def test_empty_requests(shared_client: TestClient) -> None:
    assert_clean_error(shared_client.post("/api/v1/predict"), 415, "multipart")
    only_text = shared_client.post("/api/v1/predict", data={"sample": "x"},
                                   files=[("unused", ("", b"", "application/octet-stream"))])
    assert only_text.status_code in (400, 422)
    response = shared_client.post("/api/v1/predict", content=b"--x--\r\n",
                                  headers={"content-type": "multipart/form-data; boundary=x"})
    assert_clean_error(response, 400, "no files")
    assert_clean_error(post(shared_client, [image_part("empty.png", b"")]), 400, "empty")


def test_wrong_fields(shared_client: TestClient) -> None:
    assert_clean_error(post(shared_client, [("file", ("a.png", png_bytes(), "image/png"))]), 422, "'files'")
    assert_clean_error(post(shared_client, [image_part()], data={"colour": "red"}), 422, "colour")
    assert_clean_error(post(shared_client, [image_part()], data={"sample": "x" * 201}), 422, "sample")
    assert_clean_error(shared_client.post("/api/v1/predict", data={"files": "not a file"}), 415, "multipart")
    as_text = shared_client.post("/api/v1/predict", files=[("files", (None, b"not a file"))])
    assert_clean_error(as_text, 422, "file upload")
    assert_clean_error(shared_client.post("/api/v1/predict", json={"files": []}), 415)
    assert_clean_error(shared_client.get("/api/v1/analyses", params={"page": 0}), 422, "page")
    assert_clean_error(shared_client.get("/api/v1/analyses", params={"status": "odd"}), 422, "status")
    assert_clean_error(shared_client.get("/api/v1/analyses/abc"), 422, "analysis_id")
    assert_clean_error(shared_client.get("/api/v1/analyses/999999"), 404, "999999")
    assert_clean_error(shared_client.get("/api/v1/predictions/999999/image"), 404)
    assert_clean_error(shared_client.get("/api/v1/nothing-here"), 404)


def test_wrong_review_requests(shared_client: TestClient) -> None:
    first = post(shared_client, [image_part()]).json()
    second = post(shared_client, [image_part()]).json()
    url = f"/api/v1/analyses/{first['analysis_id']}/review"
    own = first["results"][0]["id"]
    v0 = {"expected_version": 0}
    assert_clean_error(shared_client.post(url, json={"labels": [], **v0}), 422, "labels")
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": own, "label": "x"}], **v0}), 422, "x")
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": own, "lable": "monocyte"}], **v0}),
                       422, "label")
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": own, "label": "monocyte"}],
                                                     "approve": True, **v0}), 422, "approve")
    # Optimistic locking is required, and the reviewer is the logged-in user, never a typed name.
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": own, "label": "monocyte"}]}),
                       422, "expected_version")
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": own, "label": "monocyte"}],
                                                     "reviewer": "Dr. Chief", **v0}), 422, "reviewer")
    foreign = second["results"][0]["id"]
    assert_clean_error(shared_client.post(url, json={"labels": [{"prediction_id": foreign, "label": "monocyte"}],
                                                     **v0}), 404, "not part of analysis")
    assert_clean_error(shared_client.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                       422)
    assert_clean_error(shared_client.post("/api/v1/analyses/999999/review",
                                          json={"labels": [{"prediction_id": own, "label": "monocyte"}], **v0}), 404)
    # Nothing of the refused reviews was applied.
    assert shared_client.get(f"/api/v1/analyses/{first['analysis_id']}").json()["n_reviewed"] == 0


# ---- atomicity and concurrency ----

def test_a_bad_file_stores_nothing(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        before = count_rows(client)
        response = post(client, [image_part("ok.png"), image_part("bad.png", b"\x89PNG\r\n\x1a\nbroken")])
        assert_clean_error(response, 400, "bad.png")
        assert count_rows(client) == before == (0, 0)


def test_a_failing_insert_rolls_back(tmp_path: Path) -> None:
    from hematovision.serve.db import Database, PredictionRecord

    db = Database(tmp_path / "hv.db")
    good = PredictionRecord("a.png", "aa/a.png", "a" * 64, 10, 10, "monocyte", 0.9, {"monocyte": 0.9}, None,
                            False, [])
    bad = PredictionRecord("b.png", "bb/b.png", "b" * 64, 10, 10, "monocyte", 0.9, {"monocyte": object()},  # type: ignore[dict-item]
                           None, False, [])
    with pytest.raises(TypeError):
        db.add_analysis("s", "m", [good, bad])  # the second record cannot be written
    assert db.list_analyses() == ([], 0)
    with sqlite3.connect(db.path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0


def test_internal_errors_reveal_nothing(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        def broken(images):
            raise RuntimeError("secret internal detail /etc/passwd")

        client.app.state.hv.batcher.process = broken  # type: ignore[attr-defined]
        response = post(client, [image_part()])
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error"}
        assert "secret" not in response.text and "Traceback" not in response.text
        assert count_rows(client) == (0, 0)


def test_concurrent_reviews_of_one_analysis(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        body = post(client, [image_part(f"{i}.png", png_bytes(i)) for i in range(4)]).json()
        url = f"/api/v1/analyses/{body['analysis_id']}/review"
        ids = [r["id"] for r in body["results"]]
        statuses: list[int] = []
        barrier = threading.Barrier(8)

        def review(worker: int) -> None:
            # Each worker reads the version and reviews from it, again after a 409, as a careful client does.
            barrier.wait()
            label = WBC5[worker % 5]
            for _ in range(50):
                version = client.get(url.removesuffix("/review")).json()["version"]
                response = client.post(url, json={"expected_version": version,
                                                  "labels": [{"prediction_id": pid, "label": label} for pid in ids]})
                if response.status_code != 409:
                    break
            statuses.append(response.status_code)

        _run_in_threads(review, 8)
        assert statuses == [200] * 8
        analysis = client.get(f"/api/v1/analyses/{body['analysis_id']}").json()
        assert analysis["version"] == 8  # each review applied whole, one after another
        # All images carry the label of the same (last) review: no mix of two reviews.
        assert len({p["reviewed_label"] for p in analysis["predictions"]}) == 1
        assert len(client.app.state.hv.db.review_log(body["analysis_id"])) == 8 * 4  # type: ignore[attr-defined]

        # With optimistic locking, of several reviews made from the same version only one wins.
        version = analysis["version"]
        results: list[int] = []
        barrier = threading.Barrier(4)

        def guarded(worker: int) -> None:
            barrier.wait()
            response = client.post(url, json={"expected_version": version,
                                              "labels": [{"prediction_id": ids[0], "label": WBC5[worker]}]})
            results.append(response.status_code)

        _run_in_threads(guarded, 4)
        assert sorted(results) == [200, 409, 409, 409]


# ---- fuzzing ----

_VALID = png_bytes(3, (24, 24))


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    parts=st.lists(
        st.tuples(
            st.sampled_from(["files", "files", "files", "file", "sample", ""]),
            st.text(max_size=40),
            st.one_of(
                st.binary(max_size=600),
                st.builds(lambda cut, flip: bytes(b ^ (0xFF if i == flip else 0) for i, b in enumerate(_VALID[:cut])),
                          st.integers(0, len(_VALID)), st.integers(0, len(_VALID))),
                st.builds(lambda members: zip_of(members),
                          st.dictionaries(st.text(min_size=1, max_size=20), st.binary(max_size=200), max_size=3)),
            ),
        ),
        max_size=4,
    )
)
def test_fuzz_upload_never_5xx(shared_client: TestClient, parts: list[tuple[str, str, bytes]]) -> None:
    files = [(field or "files", (name, data, "application/octet-stream")) for field, name, data in parts]
    response = shared_client.post("/api/v1/predict", files=files or None,
                                  headers=None if files else {"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
