"""The GPU verification pack's dry mode: on a CPU it runs every check's CPU-capable part at tiny
size (through the real `vicuna train`, engine and API), skips the CUDA parts with the reason, and
writes the report. The GPU run itself is for a machine with a GPU (docs/gpu.md)."""

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env


@pytest.mark.slow
def test_dry_mode_runs_each_check_and_reports(tmp_path):
    report = tmp_path / "report.md"
    p = subprocess.run([sys.executable, "-m", "vicuna.gpucheck", "--dry", "--steps", "2", "--report", str(report)],
                       capture_output=True, text=True, env=cli_env(), timeout=1200, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in "abcdef" and line.split("|")[1].strip()}
    assert rows == {"a": "PASS", "b": "PASS", "c": "PASS", "d": "PASS", "e": "SKIP", "f": "PASS"}, text
    assert "dry mode" in text and "needs CUDA" in text and "ok: tiny on cpu, float32: 8 batched greedy answers = alone" in text


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    """A check that raises is FAIL in the report and the exit code is 1 (never a silent PASS)."""
    from vicuna import gpucheck

    def broken(ctx, r):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpucheck, "CHECKS", [("a", "broken on purpose", broken), *gpucheck.CHECKS[4:5]])
    monkeypatch.setattr(gpucheck, "prepare", lambda work: (work, work))
    report = tmp_path / "r.md"
    assert gpucheck.main(["--dry", "--report", str(report)]) == 1
    text = report.read_text()
    assert "| a | broken on purpose | FAIL |" in text and "RuntimeError: boom" in text
    assert "| e |" in text and "SKIP" in text


def test_gpu_check_script_is_executable_and_parses():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    help_ = subprocess.run([sys.executable, "-m", "vicuna.gpucheck", "--help"], capture_output=True, text=True,
                           env=cli_env())
    assert help_.returncode == 0 and "--dry" in help_.stdout
