"""Send the fuzz corpus (tests/serve/fuzz_corpus.py) to a running ``hematovision serve`` and print a table.

Usage:
    python benchmarks/serve_fuzz.py --url http://127.0.0.1:8000 --user fuzz --password-stdin < pw.txt
    python benchmarks/serve_fuzz.py --url https://hemato.lab.example --token "$TOKEN" --n 5000 --seed 7
    python benchmarks/serve_fuzz.py --url http://127.0.0.1:8000 --no-auth --pid "$(pgrep -f 'hematovision serve')"

It sends ``--n`` malformed requests (broken and hostile images, zips, multipart and HTTP framing, odd
sample names, review bodies, login forms and query strings), one after another, ``--rounds`` times,
and prints per kind how many got which status. A 5xx, or an API 4xx that is not JSON ``{"detail": ...}``,
is a failure (exit code 1). Expectations written for the test server's small limits
(``fuzz_corpus.LIMITS``, e.g. a 1 MB request) are shown as notes: a deployment with larger limits
accepts some "over the limit" cases. Use an account made for this (an admin, so that no route is refused
for its role) on a test database: the corpus uploads images and reviews an analysis. Switch the rate
limits off on that server (``--rate-limit 0 --upload-rate-limit 0 --failed-login-limit 0``), or most
answers are 429. ``--pid`` (a server on this machine) adds its resident memory before and after;
``--log`` names the server's log file, to count tracebacks in it afterwards.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serve"))

import httpx  # noqa: E402
from fuzz_corpus import fill, generate, problems, send  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def login(client: httpx.Client, url: str, user: str, password: str) -> str:
    response = client.post(f"{url}/api/v1/auth/token", data={"username": user, "password": password}, timeout=60)
    if response.status_code != 200:
        sys.exit(f"login as {user!r} failed: {response.status_code} {response.text[:200]}")
    return str(response.json()["access_token"])


def first_analysis(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[int, int]:
    """Upload one good image: the analysis and prediction that the review cases refer to."""
    from fuzz_corpus import base_images

    response = client.post(f"{url}/api/v1/predict", files=[("files", ("seed.png", base_images(random.Random(0))["png"],
                                                                      "image/png"))], headers=headers, timeout=120)
    if response.status_code != 200:
        sys.exit(f"a valid upload failed: {response.status_code} {response.text[:300]}")
    body = response.json()
    return int(body["analysis_id"]), int(body["results"][0]["id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=2000, help="cases (default 2000; below ~870 a subset of every kind)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=1, help="send the corpus this many times (memory trend)")
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="an API token (from POST /api/v1/auth/token)")
    auth.add_argument("--user", help="log in as this user; the password is read from stdin (--password-stdin)")
    auth.add_argument("--no-auth", action="store_true", help="the server runs with --no-auth")
    parser.add_argument("--password-stdin", action="store_true", help="read --user's password from stdin")
    parser.add_argument("--pid", type=int, help="the server's process id (same machine): report its memory")
    parser.add_argument("--log", type=Path, help="the server's log file: count tracebacks written during the run")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = parser.parse_args()

    url = args.url.rstrip("/")
    headers = {"Origin": url}
    with httpx.Client() as client:
        if args.user:
            if not args.password_stdin:
                parser.error("--user needs --password-stdin")
            headers["Authorization"] = f"Bearer {login(client, url, args.user, sys.stdin.readline().rstrip())}"
        elif args.token:
            headers["Authorization"] = f"Bearer {args.token}"
        cases = generate(args.seed, args.n)
        analysis_id, prediction_id = first_analysis(client, url, headers)
        log_start = args.log.stat().st_size if args.log else 0
        statuses: dict[str, Counter[str]] = defaultdict(Counter)
        failures: list[str] = []
        notes: list[str] = []
        memory = [rss_mb(args.pid)] if args.pid else []
        start = time.perf_counter()
        for _ in range(args.rounds):
            for template in cases:
                version = 0
                if b"@VER@" in template.body:
                    current = client.get(f"{url}/api/v1/analyses/{analysis_id}", headers=headers, timeout=args.timeout)
                    version = int(current.json().get("version", 0)) if current.status_code == 200 else 0
                case = fill(template, analysis_id, prediction_id, version)
                outcome = send(case, client, url, headers, timeout=args.timeout)
                statuses[case.kind][str(outcome.status or "none")] += 1
                for problem in problems(case, outcome):
                    (notes if problem.startswith("expected") else failures).append(f"{case.name}: {problem}")
            if args.pid:
                memory.append(rss_mb(args.pid))
        seconds = time.perf_counter() - start
        health = client.get(f"{url}/health", timeout=args.timeout)

    total = len(cases) * args.rounds
    print(f"{total} requests ({len(cases)} cases x {args.rounds}, seed {args.seed}) to {url} in {seconds:.1f} s")
    print("\n| kind | requests | statuses |\n|---|---:|---|")
    for kind in sorted(statuses):
        shown = " ".join(f"{status}x{count}" for status, count in sorted(statuses[kind].items()))
        print(f"| {kind} | {sum(statuses[kind].values())} | {shown} |")
    fives = sum(n for counts in statuses.values() for status, n in counts.items() if status.startswith("5"))
    print(f"\n5xx: {fives}; other failures: {len(failures) - fives}; /health after: {health.status_code}")
    if memory:
        print("server RSS (MB) before and after each round: " + " -> ".join(f"{value:.0f}" for value in memory))
    if args.log:
        with args.log.open("rb") as handle:
            handle.seek(log_start)
            tracebacks = handle.read().decode(errors="replace").count("Traceback")
        print(f"tracebacks in {args.log} during the run: {tracebacks}")
        failures += [f"{tracebacks} tracebacks in the log"] if tracebacks else []
    for line in failures[:50]:
        print("FAIL", line)
    for line in notes[:20]:
        print("note", line)
    if len(notes) > 20:
        print(f"note ... and {len(notes) - 20} more expectation notes")
    return 1 if failures or health.status_code != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
