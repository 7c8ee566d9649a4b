"""Thread settings chosen at start-up (``hematovision.threads``): idle cores, the user's choice wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hematovision import threads


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, 0.0, 2), (2, 0.6, 2), (2, 0.8, 1), (2, 1.9, 1), (2, 5.0, 1), (8, 2.0, 6), (4, None, 4)])
def test_threads_fill_the_idle_cores(cores: int, busy: float | None, expected: int) -> None:
    assert threads.choose_threads(cores, busy) == expected


def test_busy_cores_sees_a_spinning_process() -> None:
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.7  # the spinner alone keeps about one core busy


def test_the_users_settings_win_and_torch_already_loaded_changes_nothing() -> None:
    assert "torch" in sys.modules  # the test session has it: nothing could change any more
    environ = {"PATH": "x"}
    assert threads.configure(environ) is None and environ == {"PATH": "x"}
    script = ("import os, sys; from hematovision import threads; env = {%s}; n = threads.configure(env); "
              "print(n, env.get('OMP_NUM_THREADS'), env.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    def run(env: str) -> str:
        return subprocess.run([sys.executable, "-c", script % env], capture_output=True, text=True,
                              check=True).stdout.split()
    assert run("'OMP_NUM_THREADS': '3'") == ["None", "3", "None", "False"]
    assert run("'HEMATOVISION_THREADS': '1'") == ["1", "1", "None", "False"]
    assert run("'OMP_WAIT_POLICY': 'ACTIVE', 'HEMATOVISION_THREADS': '2'") == ["2", "2", "ACTIVE", "False"]


def test_other_work_means_fewer_threads_that_sleep_when_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh process: torch not loaded yet
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    busy: dict[str, str] = {}
    assert threads.configure(busy) == 1
    assert busy["OMP_NUM_THREADS"] == busy["MKL_NUM_THREADS"] == "1" and busy["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    quiet: dict[str, str] = {}
    assert threads.configure(quiet) == 2
    assert quiet["OMP_NUM_THREADS"] == "2" and "OMP_WAIT_POLICY" not in quiet  # spinning is faster when alone


def test_commands_without_a_model_skip_the_thread_set_up(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import hematovision.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "configure_threads", lambda: calls.append("configure"))
    assert cli.main(["models"]) == 0
    assert calls == []
    cli.main(["predict", str(tmp_path / "no_run"), str(tmp_path), "--out", str(tmp_path / "p.csv")])  # fails after it
    assert calls == ["configure"]
