"""The published OpenAPI contract (serve/contract.py): the document says what the server does.

Fast checks of the document on a TestClient, then schemathesis (``st run --checks all``, every phase:
coverage, fuzzing, stateful) against a real ``hematovision serve`` process with a logged-in user, seeded.
The default run uses 10 examples per operation; the CI run (``slow``) 100.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from auth_helpers import authorize  # tests/serve is on sys.path (no __init__.py)
from fastapi.testclient import TestClient
from PIL import Image
from server_process import free_port
from test_serve_api import fake_predictor

from hematovision.data.classes import WBC5
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings

HERE = Path(__file__).parent
SEED = 16
PROTECTED_ERRORS = {"400", "401", "408", "413", "429", "500"}


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(db=tmp_path / "hv.db"), predictor=fake_predictor()),
                    base_url="http://localhost") as test_client:
        yield authorize(test_client)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def test_every_error_of_every_operation_is_the_one_error_model(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorOut"]["required"] == ["detail"]
    assert schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"
    for method, path, operation in operations(document):
        errors = {code: response for code, response in operation["responses"].items() if int(code) >= 400}
        assert {"400", "408", "413", "500"} <= set(errors), (method, path)
        for code, response in errors.items():
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}, \
                (method, path, code)
            assert response["description"] and response["description"] != "Validation Error"


def test_protected_operations_declare_login_and_public_ones_do_not(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    public = {("GET", "/health"), ("POST", "/api/v1/auth/token")}
    for method, path, operation in operations(document):
        if (method, path) in public:
            assert "security" not in operation, path  # the token endpoint answers 401 to a wrong password
            continue
        assert operation["security"] == [{"OAuth2PasswordBearer": []}], (method, path)
        assert PROTECTED_ERRORS <= set(operation["responses"]), (method, path)
        assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]
        # 403: a role, or a state-changing request (CSRF with the session cookie); never for a plain read.
        assert ("403" in operation["responses"]) == (method != "GET"), (method, path)
    assert "429" not in document["paths"]["/health"]["get"]["responses"]  # never rate limited


def test_declared_codes_match_what_the_routes_answer(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/api/v1/analyses/{analysis_id}", "/api/v1/analyses/{analysis_id}/audit",
                 "/api/v1/analyses/{analysis_id}/export.csv"):
        assert "404" in paths[path]["get"]["responses"]
        assert client.get(path.replace("{analysis_id}", "999")).status_code == 404
    upload = paths["/api/v1/predict"]["post"]
    assert {"400", "413", "415", "422", "503"} <= set(upload["responses"])
    assert client.post("/api/v1/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert "422" not in paths["/api/v1/model"]["get"]["responses"]  # no parameters: nothing to validate


def test_a_validation_error_matches_the_published_schema(client: TestClient) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis
    document = client.get("/openapi.json").json()
    schema = {**document["components"]["schemas"]["ErrorOut"], "components": document["components"]}
    for response in (client.get("/api/v1/analyses", params={"status": "nope"}),
                     client.get("/api/v1/analyses/0"),
                     client.post("/api/v1/analyses/1/review", json={"labels": []})):
        assert response.status_code == 422
        jsonschema_rs.validate(schema, response.json())
        assert isinstance(response.json()["detail"], str)


def test_upload_and_review_schemas_say_what_is_accepted(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    body = document["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["additionalProperties"] is False and body["schema"]["properties"]["files"]["minItems"] == 1
    media_types = {item.strip() for item in body["encoding"]["files"]["contentType"].split(",")}
    assert {"image/png", "image/jpeg", "application/zip"} <= media_types
    schemas = document["components"]["schemas"]
    assert schemas["ReviewRequest"]["additionalProperties"] is False
    assert schemas["ReviewItem"]["properties"]["label"]["enum"] == [*WBC5, "excluded"]
    heatmap = document["paths"]["/api/v1/predictions/{prediction_id}/heatmap.png"]["get"]["parameters"]
    assert next(p for p in heatmap if p["name"] == "label")["schema"]["enum"] == list(WBC5)
    # An extra field is refused, as additionalProperties: false says.
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image, "PNG")
    refused = client.post("/api/v1/predict", files=[("files", ("a.png", image.getvalue()))], data={"extra": "1"})
    assert refused.status_code == 422 and "extra" in refused.json()["detail"]


def test_method_not_allowed_lists_every_method_of_the_resource(client: TestClient) -> None:
    response = client.request("PUT", "/api/v1/analyses/1")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "DELETE"}


# ---- schemathesis against a real server ----





def run_schemathesis(run: Path, folder: Path, examples: int) -> tuple[subprocess.CompletedProcess[str], Path, set[str]]:
    """Start a server with an admin, get a token, run ``st run --checks all``.

    Returns:
        The finished ``st`` process, its NDJSON report and the document's operations (``"GET /path"``).
    """
    httpx = pytest.importorskip("httpx")
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    db, port, log = folder / "hv.db", free_port(), folder / "server.log"
    # Rate limits off: schemathesis sends as fast as the server answers and would meet them by design.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEMATOVISION_RATE_LIMIT_PER_MINUTE": "0",
           "HEMATOVISION_UPLOAD_RATE_LIMIT_PER_MINUTE": "0", "HEMATOVISION_FAILED_LOGIN_LIMIT_PER_MINUTE": "0"}
    password = secrets.token_urlsafe(16)
    subprocess.run([sys.executable, "-m", "hematovision", "users", "add", "contract", "--role", "admin",
                    "--password-stdin", "--db", str(db)], input=password, text=True, env=env, check=True,
                   capture_output=True, timeout=120)
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "hematovision", "serve", "--model", str(run), "--port", str(port),
                               "--db", str(db), "--threads", "1", "--log-level", "warning"],
                              stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        documented = {f"{method} {path}" for method, path, _ in operations(httpx.get(f"{base}/openapi.json").json())}
        token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "contract", "password": password},
                           timeout=30).json()["access_token"]
        # A bearer token and no cookie jar use: CSRF applies to the session cookie only, so it is not in play.
        command = [st, "run", f"{base}/openapi.json", "--checks", "all", "--max-examples", str(examples),
                   "--seed", str(SEED), "--workers", "1", "--generation-database", "none", "--no-color",
                   "--header", f"Authorization: Bearer {token}", "--request-timeout", "30",
                   "--report", "ndjson", "--report-dir", str(folder / "report")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder,
                                env={**env, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                                     "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])})
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
    (report,) = (folder / "report").glob("*.ndjson")
    return result, report, documented


def summarize(report: Path) -> tuple[Counter[str], Counter[int]]:
    """Requests per documented operation, and response statuses, from schemathesis's NDJSON report."""
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        for case in event["recorder"].get("cases", {}).values():
            cases[f"{case['value']['method']} {case['value']['path']}"] += 1
        for interaction in event["recorder"].get("interactions", {}).values():
            if interaction.get("response"):
                statuses[interaction["response"]["status_code"]] += 1
    return cases, statuses


def check_conformance(tiny_run: Path, tmp_path: Path, examples: int, least_per_operation: int) -> None:
    start = time.perf_counter()
    result, report, documented = run_schemathesis(tiny_run, tmp_path, examples)
    seconds = time.perf_counter() - start
    cases, statuses = summarize(report)
    print(result.stdout[-2500:])
    print(f"{sum(cases.values())} requests in {seconds:.0f} s; statuses {dict(sorted(statuses.items()))}")
    print("requests per operation:", {label: cases[label] for label in sorted(documented)})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert not [status for status in statuses if status >= 500], statuses
    assert f"Tested: {len(documented)}" in result.stdout, result.stdout[-3000:]
    # Every operation with inputs to vary got at least this many requests (one without any has only a few).
    varied = {label: cases[label] for label in documented if "{" in label or label.startswith(("POST", "DELETE"))}
    assert min(varied.values()) >= least_per_operation, varied


needs_schemathesis = pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None or
                                        importlib.util.find_spec("hematovision.predict") is None,
                                        reason="schemathesis (the test extra) or hematovision.predict is not installed")


@needs_schemathesis
def test_schemathesis_finds_no_contract_failure(tiny_run: Path, tmp_path: Path) -> None:
    check_conformance(tiny_run, tmp_path, examples=10, least_per_operation=5)


@pytest.mark.slow
@needs_schemathesis
def test_schemathesis_finds_no_contract_failure_with_100_examples(tiny_run: Path, tmp_path: Path) -> None:
    check_conformance(tiny_run, tmp_path, examples=100, least_per_operation=20)
