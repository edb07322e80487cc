"""Eval runs a careless or impatient user can break: Ctrl+C on a hung judge, two runs on one file,
a judge that never follows the format (issue 19 items 5, 20, 21)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from test_eval_fakes import Reply, ScriptedServer
from test_eval_pipeline import answered, answering, judge, score_judge  # noqa: F401 -- `answered` is a fixture


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "vicuna", *map(str, args)]


def _start(cmd: list[str]) -> subprocess.Popen:
    # A child of a background job inherits SIGINT ignored, and Python then installs no Ctrl+C
    # handler: give the run what a terminal user's process has.
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def hanging_after(n_ok: int, respond):
    """A judge/model that answers the first ``n_ok`` calls, then hangs until released."""
    release = threading.Event()

    def reply(body, n):
        if n > n_ok:
            release.wait(600)
            return Reply(status=503)
        return respond(body, n)

    return reply, release


@pytest.mark.parametrize("verb", ["judge", "answer"])
def test_one_ctrl_c_stops_a_run_against_a_hung_endpoint(tmp_path, answered, verb):  # noqa: F811
    respond = score_judge() if verb == "judge" else answering
    reply, release = hanging_after(3, respond)
    out = tmp_path / "out.jsonl"
    with ScriptedServer(reply) as s:
        if verb == "judge":
            cmd = _cli("eval", "judge", "--questions", answered, "--answers", tmp_path / "answers", "--models",
                       "alpha,beta", "--judge-model", "judge-x", "--judge-api-base", s.base_url, "--judge-timeout",
                       "300", "--parallel", "2", "-o", out)
        else:  # one-turn questions, so that each call is one whole record
            qfile = tmp_path / "one-turn.jsonl"
            qfile.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"Say {i}."]}) + "\n"
                                     for i in range(8)))
            cmd = _cli("eval", "answer", "--questions", qfile, "--model", "m", "--api-base", s.base_url, "--timeout",
                       "300", "--parallel", "2", "-o", out)
        proc = _start(cmd)
        try:
            # three calls answered and written, two more hanging in flight
            _wait_for(lambda: len(_lines(out)) == 3 and len(s.requests) == 5, proc, "3 records and 2 hung calls")
            proc.send_signal(signal.SIGINT)
            # A hang detector, not a timing assertion: before the fix the process sat out the 300 s timeouts.
            rc = proc.wait(timeout=60)
            stderr = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            release.set()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert "the 3 records finished in this run are saved" in stderr and "run the same command again" in stderr
    records = _lines(out)
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert not (tmp_path / ".out.jsonl.lock").exists()


def test_a_second_run_on_the_same_output_is_refused(tmp_path, answered):  # noqa: F811
    reply, release = hanging_after(2, score_judge())
    out = tmp_path / "j.jsonl"
    with ScriptedServer(reply) as s:
        first = _start(_cli("eval", "judge", "--questions", answered, "--answers", tmp_path / "answers", "--models",
                            "alpha,beta", "--judge-model", "judge-x", "--judge-api-base", s.base_url, "--parallel", "1",
                            "-o", out))
        try:
            _wait_for(lambda: len(s.requests) == 3, first, "the first run to hang on its third call")
            second = judge(tmp_path, s, answered, out="j.jsonl")
            assert second.returncode == 2
            assert f"{out} is being written by another run (pid {first.pid})" in second.stderr
            assert len(s.requests) == 3  # the second run asked the judge nothing
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=60) == 130
        finally:
            if first.poll() is None:
                first.kill()
            release.set()
    assert len(_lines(out)) == 2
    with ScriptedServer(score_judge()) as s:  # the lock went with the first run: a new run resumes
        proc = judge(tmp_path, s, answered, out="j.jsonl")
        assert proc.returncode == 0, proc.stderr
        assert len(s.requests) == 10 and "10 judged, 0 unparsed, 0 failed, 2 already done" in proc.stdout


def test_a_judge_that_never_follows_the_format_fails_the_run_loudly(tmp_path, answered):  # noqa: F811
    with ScriptedServer(lambda body, n: "I think both answers are quite nice, really.") as s:
        proc = judge(tmp_path, s, answered)
        assert proc.returncode == 1
        assert "12 of 12 judgments" in proc.stderr and "could not be parsed (0% parsed)" in proc.stderr
        assert "below --min-parsed 0.5" in proc.stderr
        assert "0 judged, 12 unparsed" in proc.stdout
        # resumed: nothing to ask, same verdict on the file as a whole
        again = judge(tmp_path, s, answered)
        assert again.returncode == 1 and len(s.requests) == 12 and "12 already done" in again.stdout
        # a user who accepts a weak judge says so; the count is still shown
        lenient = judge(tmp_path, s, answered, "--min-parsed", "0")
        assert lenient.returncode == 0 and "12 of 12 judgments" in lenient.stderr
    def sometimes(body, n):  # every other call parses
        return score_judge()(body, n) if n % 2 else "No idea."

    with ScriptedServer(sometimes) as s:
        proc = judge(tmp_path, s, answered, "--min-parsed", "0.5", out="half.jsonl")
        assert proc.returncode == 0 and "6 of 12 judgments" in proc.stderr, proc.stderr
        strict = judge(tmp_path, s, answered, "--min-parsed", "0.9", out="half.jsonl")
        assert strict.returncode == 1 and "below --min-parsed 0.9" in strict.stderr
    bad = run_cli("eval", "judge", "--answers", tmp_path / "answers", "--models", "alpha,beta", "--judge-model", "j",
                  "--min-parsed", "50")
    assert bad.returncode == 2 and "--min-parsed is a share" in bad.stderr
