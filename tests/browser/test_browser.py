"""A real headless Chromium uses the page: log in, upload, result and heat map, correction, sign-off, audit
trail, history, log out.

Needs Debian's ``chromium`` and the Python ``playwright`` package (no downloaded browser):
``bash .ci/install-browser.sh`` installs both.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_process import wait_until_healthy

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HEMATOVISION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (run .ci/install-browser.sh)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(run .ci/install-browser.sh)")
httpx = pytest.importorskip("httpx")
pytest.importorskip("argon2")
from PIL import Image

PASSWORD = "browser test password"

SERVER = """
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import uvicorn

from hematovision.data.classes import WBC5
from hematovision.data.transforms import Preprocessing
from hematovision.models import create_model
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings

torch.manual_seed(0)
predictor = SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                            temperature=1.0, card={"backbone": "tiny_cnn"})
app = create_app(Settings(db=Path(sys.argv[1]), threads=1, confidence_threshold=0.99), predictor=predictor)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("browser")
    script = folder / "server.py"
    script.write_text(SERVER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = folder / "server.log"
    # The user is made as a lab would make it: with the command line, before the server starts.
    subprocess.run([sys.executable, "-m", "hematovision", "users", "add", "tester", "--role", "reviewer", "--db",
                    str(folder / "hv.db"), "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)
    process = subprocess.Popen([sys.executable, str(script), str(folder / "hv.db"), str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, base, log, timeout=120)
    yield base, folder
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_upload_review_and_history_in_a_real_browser(server: tuple[str, Path]) -> None:
    base, folder = server
    image = folder / "smear cell.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # Not logged in: the page sends the browser to the login form, which brings it back.
            page.goto(base + "/")
            sync_api.expect(page).to_have_url(base + "/login?next=%2F")
            page.fill("#username", "tester")
            page.fill("#password", "not the password")
            page.click("#login")
            sync_api.expect(page.locator("#login-message")).to_have_text("Wrong user name or password.")
            page.screenshot(path=str(folder / "login.png"), full_page=True)
            page.fill("#username", "tester")
            page.fill("#password", PASSWORD)
            page.click("#login")
            sync_api.expect(page).to_have_url(base + "/")
            sync_api.expect(page.locator("#user-name")).to_have_text("tester (reviewer)")
            sync_api.expect(page.locator("#model-info")).to_contain_text("5 classes")

            # Upload one image with a sample name, as a user would.
            page.locator("#file-input").set_input_files(str(image))
            page.fill("#sample", "browser-sample")
            page.click("#analyse")
            card = page.locator("article.card").first
            sync_api.expect(card).to_be_visible(timeout=30_000)
            sync_api.expect(card.locator(".filename")).to_have_text("smear cell.png")
            predicted = card.locator(".prediction .label").inner_text().strip().lower()
            assert predicted in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
            assert card.locator(".prob").count() == 5
            sync_api.expect(card.locator(".flag")).to_have_text("Needs review")  # threshold 0.99: flagged

            # The heat map is shown and has really loaded.
            heatmap = card.locator("img.cell")
            sync_api.expect(heatmap).to_have_attribute("src", "/api/v1/predictions/1/heatmap.png")
            page.wait_for_function("() => { const i = document.querySelector('img.cell');"
                                   " return i.complete && i.naturalWidth > 0; }", timeout=30_000)
            page.screenshot(path=str(folder / "analyse.png"), full_page=True)

            # Correct the label.
            corrected = "monocyte" if predicted != "monocyte" else "lymphocyte"
            card.locator("select.review-label").select_option(corrected)
            sync_api.expect(card.locator("button.confirm")).to_have_text("Correct")
            card.locator("button.confirm").click()
            reviewed = page.locator("article.card .reviewed")
            sync_api.expect(reviewed).to_have_text(f"Reviewed as {corrected} by tester")
            row = page.locator("#differential tbody tr", has_text=corrected)
            sync_api.expect(row.locator("td").nth(1)).to_have_text("1")

            # Sign off: the analysis becomes read-only, and the audit trail shows who did what.
            page.click("#signoff-button")
            sync_api.expect(page.locator("#signoff-state")).to_contain_text("Signed off by tester")
            sync_api.expect(card.locator("button.confirm")).to_be_disabled()
            audit = page.locator("#audit-table tbody tr")
            sync_api.expect(audit.last).to_contain_text("signoff")
            actions = [audit.nth(i).locator("td").nth(2).inner_text() for i in range(audit.count())]
            assert actions == ["upload", "view", "review", "signoff"], actions
            assert {audit.nth(i).locator("td").nth(1).inner_text() for i in range(audit.count())} == {"tester"}
            page.screenshot(path=str(folder / "signed-off.png"), full_page=True)

            # Find it in the history and open it again.
            page.click("nav >> text=History")
            page.fill("#search", "browser-sample")
            page.click("#search-form button")
            history_row = page.locator("#history tbody tr").first
            sync_api.expect(history_row).to_contain_text("browser-sample")
            sync_api.expect(history_row).to_contain_text("reviewed (1/1)")
            sync_api.expect(history_row).to_contain_text("tester,")  # signed off by
            page.screenshot(path=str(folder / "history.png"), full_page=True)
            history_row.locator("text=Open").click()
            sync_api.expect(page.locator("article.card .reviewed")).to_have_text(
                f"Reviewed as {corrected} by tester")
            sync_api.expect(page.locator("#signoff-state")).to_contain_text("read-only")
            # The OpenAPI docs render offline from the locally served Swagger UI.
            if httpx.get(f"{base}/docs-assets/swagger-ui-bundle.js", timeout=10).status_code == 200:
                page.goto(base + "/docs")
                sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("HematoVision",
                                                                                        timeout=30_000)
                sync_api.expect(page.locator('.opblock-summary-path[data-path="/api/v1/predict"]')).to_be_visible()
            # Log out: the pages and the API want a login again.
            page.goto(base + "/history")
            page.click("#logout")
            sync_api.expect(page).to_have_url(base + "/login")
            page.goto(base + "/history")
            sync_api.expect(page).to_have_url(base + "/login?next=%2Fhistory")
            assert errors == []
        finally:
            browser.close()
    # The server agrees with what the page showed.
    assert httpx.get(f"{base}/api/v1/analyses/1", timeout=10).status_code == 401
    token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "tester", "password": PASSWORD},
                       timeout=30).json()["access_token"]
    analysis = httpx.get(f"{base}/api/v1/analyses/1", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert analysis["predictions"][0]["reviewed_label"] == corrected
    assert analysis["sample"] == "browser-sample"
    assert analysis["signed_off_by"] == "tester" and analysis["predictions"][0]["reviewer"] == "tester"
