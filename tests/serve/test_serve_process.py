"""``hematovision serve`` as a real process on 127.0.0.1, serving a trained run; a killed server loses nothing."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from server_process import free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from PIL import Image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("hematovision.predict") is None,
                                reason="hematovision.predict (the foundation's Predictor) is not present")




def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()




def test_serve_command_survives_kill_9_without_losing_commits(tiny_run: Path, tmp_path: Path) -> None:
    db, port, log = tmp_path / "hv.db", free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "hematovision", "serve", "--model", str(tiny_run), "--port", str(port),
               "--db", str(db), "--threads", "1", "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    subprocess.run([sys.executable, "-m", "hematovision", "users", "add", "tech", "--role", "technologist", "--db",
                    str(db), "--password-stdin"], input="process test password\n", text=True, check=True)
    server = start(command, port, log)
    token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "tech", "password": "process test password"},
                       timeout=30).json()["access_token"]
    api = httpx.Client(headers={"Authorization": f"Bearer {token}"})  # the token outlives the restart below
    try:
        model = api.get(f"{base}/api/v1/model", timeout=30).json()
        assert model["class_names"] == ["lymphocyte", "neutrophil"] and model["card"]["backbone"] == "tiny_cnn"
        body = api.post(f"{base}/api/v1/predict", files=[("files", ("a.png", png(1))), ("files", ("b.png", png(2)))],
                        data={"sample": "before the crash"}, timeout=30).json()
        assert [r["label"] in model["class_names"] for r in body["results"]] == [True, True]
        pid = body["results"][0]["id"]
        reviewed = api.post(f"{base}/api/v1/analyses/{body['analysis_id']}/review",
                            json={"labels": [{"prediction_id": pid, "label": "neutrophil"}], "expected_version": 0},
                            timeout=30)
        assert reviewed.status_code == 200
    finally:
        server.send_signal(signal.SIGKILL)  # no shutdown hook, no checkpoint: as after a crash
        server.wait(timeout=30)
    assert Path(str(db) + "-wal").exists()  # the commits may live only in the write-ahead log

    server = start(command, port, log)
    try:
        analysis = api.get(f"{base}/api/v1/analyses/{body['analysis_id']}", timeout=30).json()
        assert analysis["sample"] == "before the crash" and analysis["n_images"] == 2
        assert [p["filename"] for p in analysis["predictions"]] == ["a.png", "b.png"]
        assert analysis["predictions"][0]["reviewed_label"] == "neutrophil"
        assert analysis["model"].startswith("run: tiny_cnn")
        stored = api.get(f"{base}{analysis['predictions'][1]['image_url']}", timeout=30).content
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), np.asarray(Image.open(io.BytesIO(png(2)))))
        second = api.post(f"{base}/api/v1/predict", files=[("files", ("c.png", png(3)))], timeout=30).json()
        assert second["analysis_id"] == body["analysis_id"] + 1
    finally:
        server.terminate()
        server.wait(timeout=30)
