"""The fuzz corpus (``fuzz_corpus.py``) against a real ``hematovision serve`` process.

Every case must get an answer below 500 (or none, for a client that hangs up), every API 4xx must be
JSON ``{"detail": str}``, the server log must hold no traceback, ``/health`` must answer at the end and
the server's memory must not grow without bound. By default 100 cases (every kind) run, plus the ones
that once found a 500; the full corpus of 1,200 is marked ``slow`` and runs in CI
(``bash test.sh -m 'slow or not slow'``).
"""

from __future__ import annotations

import importlib.util
import os
import random
import secrets
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from server_process import free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
import fuzz_corpus  # tests/serve is on sys.path: pytest puts a test file's folder there (no __init__.py)
from fuzz_corpus import FuzzCase, Outcome

pytestmark = pytest.mark.skipif(importlib.util.find_spec("hematovision.predict") is None,
                                reason="hematovision.predict (the foundation's Predictor) is not present")

SEED = 13
FULL_SIZE = 1200
SUBSET_SIZE = 100
# Generous: normal growth is about 30 MB (allocator pools, caches); leaking ~200 kB a request fails it.
RSS_GROWTH_LIMIT_MB = 200.0
PUBLIC_API = "/api/v1/auth/token"  # the one API route that needs no user (it is where a token comes from)
UNAUTHENTICATED_EVERY = 10  # with login on, every 10th API case also goes out without a token / with a bad one




def memory_mb(pid: int) -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def login_available() -> bool:
    """Whether this checkout has users and tokens (``hematovision users``); the harness logs in if so."""
    return importlib.util.find_spec("hematovision.cli.users") is not None


@dataclass
class Server:
    """A running ``hematovision serve`` and how to talk to it."""

    process: subprocess.Popen[bytes]
    base: str
    log: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every case (Origin; Authorization with login)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")




@contextmanager
def running_server(run: Path, folder: Path) -> Iterator[Server]:
    """Start ``hematovision serve`` with the corpus's limits (and an admin when login exists); stop it after."""
    db, port, log = folder / "hv.db", free_port(), folder / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fuzz_corpus.server_env(),
           # The corpus is sent as fast as the server answers: rate limits (serve/protect.py) would turn most
           # of it into 429s and test nothing else. (Variables for settings a checkout lacks are ignored.)
           "HEMATOVISION_RATE_LIMIT_PER_MINUTE": "0", "HEMATOVISION_UPLOAD_RATE_LIMIT_PER_MINUTE": "0",
           "HEMATOVISION_FAILED_LOGIN_LIMIT_PER_MINUTE": "0",
           # Requests whose headers never end (bare CR line breaks) wait this long, not the client's 5 s.
           "HEMATOVISION_HEADER_TIMEOUT": "2"}
    password = secrets.token_urlsafe(16)
    if not login_available():
        env["HEMATOVISION_AUTH"] = "0"  # a checkout with the login code but not yet the `users` command
    else:
        subprocess.run([sys.executable, "-m", "hematovision", "users", "add", "fuzz", "--role", "admin",
                        "--password-stdin", "--db", str(db)], input=password.encode(), env=env, check=True,
                       capture_output=True, timeout=120)
    command = [sys.executable, "-m", "hematovision", "serve", "--model", str(run), "--port", str(port), "--db", str(db),
               "--threads", "1", "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        server = Server(process, base, log, {"Origin": base})
        if login_available():
            token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "fuzz", "password": password}, timeout=30)
            assert token.status_code == 200, token.text
            server.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@dataclass
class Report:
    """What a corpus run found."""

    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    problems: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory_before: dict[str, float] = field(default_factory=dict)
    memory_after: dict[str, float] = field(default_factory=dict)
    unauthenticated: int = 0
    unanswered: list[str] = field(default_factory=list)  # clients that hung up, or requests that are not HTTP
    durations: list[tuple[float, str]] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'kind':<20} {'cases':>5}  statuses"]
        for kind in sorted(self.statuses):
            counts = self.statuses[kind]
            shown = " ".join(f"{status}x{count}" for status, count in sorted(counts.items()))
            lines.append(f"{kind:<20} {sum(counts.values()):>5}  {shown}")
        return "\n".join(lines)


def _first_analysis(server: Server, client: Any) -> tuple[int, int]:  # an httpx.Client
    """Upload one good image: the analysis and prediction that ``@AID@`` / ``@PID@`` stand for."""
    png = fuzz_corpus.base_images(random.Random(0))["png"]
    response = client.post(f"{server.base}/api/v1/predict", files=[("files", ("seed.png", png, "image/png"))],
                           headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    return int(body["analysis_id"]), int(body["results"][0]["id"])


def _unauthenticated_problem(case: FuzzCase, outcome: Outcome) -> str | None:
    # Without a valid token an API route must refuse; a well-formed request must get 401 exactly.
    if outcome.status is None or outcome.status >= 500:
        return f"{outcome.status} without a valid token"
    if case.expect == "2xx" and outcome.status != 401:
        return f"expected 401 without a valid token, got {outcome.status}"
    if 200 <= outcome.status < 300:
        return f"{outcome.status} without a valid token"
    return None


def summarize_traceback(log: str) -> str:
    """The exception line and the innermost frame in hematovision of a logged traceback."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    frames = [line for line in lines if line.startswith("File ") and "hematovision" in line and ".venv" not in line]
    errors = [line for line in lines if not line.startswith(("File ", "^", "~", "Traceback", "+", "|"))
              and ("Error" in line or "Exception" in line)]
    return f"{errors[-1] if errors else lines[-1]} at {frames[-1] if frames else '?'}"


def run_corpus(server: Server, cases: list[FuzzCase]) -> Report:
    """Send every case in order; attribute any traceback in the log to the case that was in flight."""
    report = Report()
    with httpx.Client() as client:
        analysis_id, prediction_id = _first_analysis(server, client)
        for _ in range(3):  # warm up before measuring memory: the first requests allocate caches
            _first_analysis(server, client)
        report.memory_before = memory_mb(server.process.pid)
        start = time.perf_counter()
        for index, template in enumerate(cases):
            version = 0
            if b"@VER@" in template.body:
                current = client.get(f"{server.base}/api/v1/analyses/{analysis_id}", headers=server.headers, timeout=30)
                assert current.status_code == 200, f"{template.name}: {current.text}"
                version = int(current.json()["version"])
            case = fuzz_corpus.fill(template, analysis_id, prediction_id, version)
            log_size = server.log.stat().st_size
            outcome = fuzz_corpus.send(case, client, server.base, server.headers)
            if case.half_close or outcome.status is None or outcome.status >= 500:
                # The server notices a hang-up after the client returns, and Starlette logs a 500's
                # traceback after the answer is sent: wait, so the log lines land with their case.
                time.sleep(0.2)
            report.statuses[case.kind][str(outcome.status or "none")] += 1
            report.durations.append((outcome.seconds, case.name))
            report.problems += [f"{case.name}: {problem}" for problem in fuzz_corpus.problems(case, outcome)]
            if outcome.status is None:
                report.unanswered.append(case.name)
                if case.transport != "raw":
                    report.problems.append(f"{case.name}: no answer ({outcome.error})")
            if "Authorization" in server.headers and index % UNAUTHENTICATED_EVERY == 0 \
                    and case.path.startswith("/api/") and not case.path.startswith(PUBLIC_API) and case.transport != "raw":
                token = {} if index % (2 * UNAUTHENTICATED_EVERY) else {"Authorization": "Bearer not-a-token"}
                anonymous = {"Origin": server.headers["Origin"], **token}
                problem = _unauthenticated_problem(case, fuzz_corpus.send(case, client, server.base, anonymous))
                report.unauthenticated += 1
                if problem:
                    report.problems.append(f"{case.name} (unauthenticated): {problem}")
            with server.log.open("rb") as handle:
                handle.seek(log_size)
                new_log = handle.read().decode(errors="replace")
            if "Traceback" in new_log:
                report.tracebacks.append(f"{case.name} ({outcome.status}): {summarize_traceback(new_log)}")
        report.seconds = time.perf_counter() - start
        report.memory_after = memory_mb(server.process.pid)
        health = client.get(f"{server.base}/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        _first_analysis(server, client)  # still classifies after the corpus
    return report


def check(report: Report, cases: list[FuzzCase], server: Server) -> None:
    growth = report.memory_after["VmRSS"] - report.memory_before["VmRSS"]
    print(f"\n{len(cases)} cases in {report.seconds:.1f} s (seed {SEED}); "
          f"{report.unauthenticated} also sent without a valid token")
    print(report.table())
    print(f"server RSS {report.memory_before['VmRSS']:.0f} MB -> {report.memory_after['VmRSS']:.0f} MB "
          f"(growth {growth:+.1f} MB; peak {report.memory_after['VmHWM']:.0f} MB)")
    fives = sum(count for counts in report.statuses.values() for status, count in counts.items() if status.startswith("5"))
    print("slowest: " + ", ".join(f"{name} {seconds:.2f} s" for seconds, name in sorted(report.durations)[-5:]))
    print(f"5xx answers: {fives}; tracebacks in the log: {len(report.tracebacks)}; "
          f"no answer (client hung up, or not HTTP): {', '.join(report.unanswered) or 'none'}")
    failures = []
    if report.tracebacks or "Traceback" in server.log_text():
        failures.append(f"{len(report.tracebacks)} tracebacks in the server log, after:\n" + "\n".join(report.tracebacks[:40]))
    if report.problems:
        failures.append(f"{len(report.problems)} problems:\n" + "\n".join(report.problems[:60]))
    if growth >= RSS_GROWTH_LIMIT_MB:
        failures.append(f"server RSS grew by {growth:.0f} MB over the corpus (limit {RSS_GROWTH_LIMIT_MB:.0f})")
    assert not failures, "\n\n".join(failures)


# Cases that once found a 500, sent by the default subset too (named, so that a renamed case fails loudly).
REGRESSIONS = (
    "zip-deflate-stream-corrupt-0",  # zlib.error out of zipfile (uploads._read_member)
    "zip-lzma-stream-corrupt",  # lzma.LZMAError, likewise
    "review-id-2^64",  # an id past SQLite's 64-bit integers: OverflowError (db.get_analysis)
    "review-signoff-id-2^63",  # likewise (db._locked_row)
    "query-path-16-s/18446744073709551616/image",  # likewise (db.get_prediction)
)


def test_fuzz_subset_against_a_real_server(tiny_run: Path, tmp_path: Path) -> None:
    cases = fuzz_corpus.generate(SEED, SUBSET_SIZE)
    assert len({case.kind for case in cases}) == len({case.kind for case in fuzz_corpus.generate(SEED, FULL_SIZE)})
    regressions = {case.name: case for case in fuzz_corpus.structured(SEED) if case.name in REGRESSIONS}
    assert sorted(regressions) == sorted(REGRESSIONS)
    cases += [case for name, case in regressions.items() if case not in cases]
    with running_server(tiny_run, tmp_path) as server:
        check(run_corpus(server, cases), cases, server)


@pytest.mark.slow
def test_fuzz_full_corpus_against_a_real_server(tiny_run: Path, tmp_path: Path) -> None:
    cases = fuzz_corpus.generate(SEED, FULL_SIZE)
    assert len(cases) == FULL_SIZE >= 1000
    with running_server(tiny_run, tmp_path) as server:
        check(run_corpus(server, cases), cases, server)


def test_corpus_is_deterministic_and_covers_the_issue() -> None:
    first, second = fuzz_corpus.generate(SEED, 300), fuzz_corpus.generate(SEED, 300)
    assert first == second
    assert fuzz_corpus.generate(SEED + 1, 300) != first
    full = fuzz_corpus.generate(SEED, FULL_SIZE)
    assert len({case.name for case in full}) == FULL_SIZE
    kinds = {case.kind for case in full}
    assert {"truncated-image", "bit-flip", "polyglot", "decompression-bomb", "png-chunks", "image-mode", "tiny-image",
            "zip", "multipart", "sample-name", "review", "query", "http", "over-limit"} <= kinds
    # A few requests are over the limits the server is started with, so the limits themselves are exercised.
    assert sum(len(case.body) > fuzz_corpus.LIMITS["max_request_bytes"] for case in full) >= 3
