"""answer -> judge -> report through the CLI against scripted OpenAI-compatible servers on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from vicuna.eval.report import compute_report, load_judgments
from test_eval_fakes import Reply, ScriptedServer, user_text

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"], "reference": ["5", "20"]},
    {"question_id": 3, "category": "stem", "turns": ["Why is the sky blue?"]},
    {"question_id": "q4", "category": "writing", "turns": ["Write a limerick."]},
]
CATEGORY = {t: q["category"] for q in QUESTIONS for t in q["turns"]}
TURN = {t: i + 1 for q in QUESTIONS for i, t in enumerate(q["turns"])}
QID = {t: q["question_id"] for q in QUESTIONS for t in q["turns"]}

# What the scripted judge thinks of each model, per category.
SCORES = {"alpha": {"writing": 8, "math": 9, "stem": 7}, "beta": {"writing": 6, "math": 4, "stem": 7}}


def write_questions(path: Path, questions=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def answering(body: dict, n: int) -> str:
    """A model that tags its answers with its name and the turn it answers."""
    return f"[{body['model']}] answer {len(body['messages']) // 2 + 1} to: {user_text(body)}"


def prompt_parts(body: dict) -> dict:
    """Read back the question and the tagged answers (by position) from a judge prompt."""
    text = user_text(body)
    question = re.search(r"\[Question\]\n(.*?)\n\n\[", text, re.S).group(1)
    tags = re.findall(r"\[Assistant (?:1|2|A|B)'s Answer\]\n\[(\w+)\]", text)
    single = re.findall(r"\[Assistant's Answer\]\n\[(\w+)\]", text)
    return {"question": question, "models": tags or single, "text": text}


def answer(tmp_path: Path, server: ScriptedServer, model: str, qfile: Path, *extra: str):
    return run_cli("eval", "answer", "--questions", qfile, "--model", model, "--api-base", server.base_url,
                   "-o", tmp_path / "answers" / f"{model}.jsonl", "--backoff", "0.01", "--retries", "2", *extra)


def judge(tmp_path: Path, server: ScriptedServer, qfile: Path, *extra: str, models="alpha,beta", out="j.jsonl",
          check=False):
    return run_cli("eval", "judge", "--questions", qfile, "--answers", tmp_path / "answers", "--models", models,
                   "--judge-model", "judge-x", "--judge-api-base", server.base_url, "--judge-backoff", "0.01",
                   "-o", tmp_path / out, *extra, check=check)


@pytest.fixture
def answered(tmp_path):
    """Questions answered by two scripted models (alpha, beta); in-process to save CLI start-ups."""
    from vicuna.eval.answer import AnswerSettings, run_answers
    from vicuna.eval.openai_client import Endpoint
    from vicuna.eval.records import load_questions

    qfile = write_questions(tmp_path / "q.jsonl")
    with ScriptedServer(answering) as s:
        for m in ("alpha", "beta"):
            counts = run_answers(load_questions(qfile), Endpoint(s.base_url, m), tmp_path / "answers" / f"{m}.jsonl",
                                 model_id=m, settings=AnswerSettings())
            assert counts["errors"] == 0
    return qfile


def test_answer_turns_temperatures_errors_and_resume(tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl")
    broken = True

    def flaky(body, n):  # the stem question fails until the server is "fixed"
        if broken and "sky" in user_text(body):
            return Reply(status=500)
        return answering(body, n)

    with ScriptedServer(flaky) as s:
        proc = answer(tmp_path, s, "alpha", qfile, "--temperature", "writing=0.9", "--parallel", "2")
        assert proc.returncode == 1
        assert "3 answered, 0 already done, 1 failed" in proc.stdout
        first_run = len(s.requests)
        # 2 + 2 + 1 + 3 attempts at the failing one (1 try + 2 retries)
        assert first_run == 2 + 2 + 3 + 1
        by_q = {r["question_id"]: r for r in map(json.loads, (tmp_path / "answers/alpha.jsonl").read_text().splitlines())}
        assert list(by_q) == [1, 2, 3, "q4"]  # question order
        assert by_q[3]["status"] == "error" and "HTTP 500" in by_q[3]["error"] and by_q[3]["attempts"] == 3
        assert by_q[1]["choices"][0]["turns"] == ["[alpha] answer 1 to: Write a haiku about rain.",
                                                  "[alpha] answer 2 to: Now make it rhyme."]
        # Multi-turn: the second request carries the first answer; per-category temperatures.
        second_turn = next(r for r in s.requests if user_text(r) == "And times 4?")
        assert [m["role"] for m in second_turn["messages"]] == ["user", "assistant", "user"]
        assert second_turn["messages"][1]["content"] == "[alpha] answer 1 to: What is 2 + 3?"
        temps = {user_text(r): r["temperature"] for r in s.requests}
        assert temps["What is 2 + 3?"] == 0.0 and temps["Write a haiku about rain."] == 0.9
        assert temps["Why is the sky blue?"] == 0.1

        broken = False
        proc = answer(tmp_path, s, "alpha", qfile)
        assert proc.returncode == 0, proc.stderr
        assert "1 answered, 3 already done, 0 failed" in proc.stdout
        assert [user_text(r) for r in s.requests[first_run:]] == ["Why is the sky blue?"]
        records = [json.loads(x) for x in (tmp_path / "answers/alpha.jsonl").read_text().splitlines()]
        assert [r["status"] for r in records] == ["ok"] * 4  # compacted: the error record is gone


def score_judge(unparsed_at: tuple | None = None):
    """Scores each answer from SCORES; returns one malformed output where told to."""

    def respond(body, n):
        p = prompt_parts(body)
        cat = CATEGORY[p["question"]]
        if unparsed_at and (QID[p["question"]], TURN[p["question"]], p["models"][0]) == unparsed_at:
            return "Both answers have merit; I would rate them similarly overall."
        s1, s2 = (SCORES[m][cat] for m in p["models"])
        return f"{s1} {s2}\nAssistant 1 is {'better' if s1 > s2 else 'not better'}; Assistant 2 wrote 'Score: 10'."

    return respond


def test_pairwise_score_report_matches_hand_computation(tmp_path, answered):
    qfile = answered
    # question 2, turn 2, shown with beta first -> unparsed: that comparison is incomplete.
    with ScriptedServer(score_judge(unparsed_at=(2, 2, "beta"))) as s:
        proc = judge(tmp_path, s, qfile, "--baseline", "beta", "--parallel", "3")
        assert proc.returncode == 0, proc.stderr
        assert len(s.requests) == 6 * 2  # 6 question turns x 2 orders
        math_t2 = [prompt_parts(r)["text"] for r in s.requests if prompt_parts(r)["question"] == "And times 4?"]
        assert all("[Reference Answer]\n20\n" in t for t in math_t2)
        assert all("[Earlier Conversation of Assistant 1]" in t and "[alpha] answer 1 to: What is 2 + 3?" in t
                   for t in math_t2)
        assert not any("[Reference Answer]" in prompt_parts(r)["text"] for r in s.requests
                       if CATEGORY[prompt_parts(r)["question"]] != "math")

    records = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(records) == 12
    r0 = records[0]
    assert {k: r0[k] for k in ("question_id", "turn", "model_a", "model_b", "order", "positions", "judge_model",
                               "prompt_version", "status")} == {
        "question_id": 1, "turn": 1, "model_a": "alpha", "model_b": "beta", "order": "AB",
        "positions": ["alpha", "beta"], "judge_model": "judge-x", "prompt_version": "vicuna-judge-v1", "status": "ok"}
    assert r0["parsed"] == {"status": "ok", "scores": [8, 6]} and r0["result"]["score_a"] == 8
    swapped = next(r for r in records if r["question_id"] == 1 and r["turn"] == 1 and r["order"] == "BA")
    assert swapped["positions"] == ["beta", "alpha"] and swapped["parsed"]["scores"] == [6, 8]
    assert swapped["result"] == {"score_a": 8, "score_b": 6, "winner": "model_a"}
    unparsed = [r for r in records if r["status"] == "unparsed"]
    assert len(unparsed) == 1 and unparsed[0]["raw"].startswith("Both answers") and unparsed[0]["result"] is None
    assert sum(r["reference_guided"] for r in records) == 4

    proc = run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep",
                   "--bootstrap-rounds", "50")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "rep/results.json").read_text())

    # By hand: complete comparisons are every question turn except (2, turn 2).
    turns = [(q["question_id"], i + 1, q["category"]) for q in QUESTIONS for i in range(len(q["turns"]))]
    complete = [t for t in turns if t[:2] != (2, 2)]
    alpha_total = sum(SCORES["alpha"][c] for *_, c in complete)  # 8+8+9+7+8 = 40
    beta_total = sum(SCORES["beta"][c] for *_, c in complete)  # 6+6+4+7+6 = 29
    assert (alpha_total, beta_total) == (40, 29)
    a = res["models"]["alpha"]
    assert res["baseline"] == "beta" and res["mode"] == "pairwise-score"
    assert a["total_score"] == 40 and a["baseline_total"] == 29
    assert a["relative_score"] == pytest.approx(40 / 29)
    assert (a["wins"], a["ties"], a["losses"]) == (4, 1, 0)
    assert a["win_rate"] == pytest.approx(4 / 5) and a["win_rate_adjusted"] == pytest.approx(4.5 / 5)
    assert a["avg_score_turn"] == {"1": pytest.approx((8 + 9 + 7 + 8) / 4), "2": 8.0}
    assert res["judgments"] == {"ok": 11, "unparsed": 1, "error": 0, "total": 12}
    assert res["judge"]["complete"] == 5 and res["judge"]["incomplete"] == 1
    assert res["judge"]["consistency_rate"] == 1.0
    assert a["unparsed"] == 1 and res["models"]["beta"]["unparsed"] == 1
    assert a["rating"] > res["models"]["beta"]["rating"]
    assert a["rating_lower"] <= a["rating"] <= a["rating_upper"]
    cat = res["categories"]["writing"]["alpha"]
    assert cat["relative_score"] == pytest.approx(24 / 18) and cat["wins"] == 3
    assert res["categories"]["math"]["alpha"]["comparisons"] == 1
    assert res["categories"]["stem"]["alpha"]["ties"] == 1

    md = (tmp_path / "rep/report.md").read_text()
    assert "137.9%" in md and "unparsed 1" in md and "| alpha |" in md
    for png in ("relative_scores.png", "categories.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep")
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize("mode, reply", [("pairwise", "Assistant A is clearly better.\n[[A]]"),
                                         ("pairwise-score", "9 2\nThe first answer is better.")])
def test_judge_preferring_position_one_gives_ties_and_zero_consistency(tmp_path, answered, mode, reply):
    with ScriptedServer(lambda body, n: reply) as s:
        proc = judge(tmp_path, s, answered, "--mode", mode)
        assert proc.returncode == 0, proc.stderr
        assert len(s.requests) == 12
    run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep",
            "--bootstrap-rounds", "20", check=True)
    res = json.loads((tmp_path / "rep/results.json").read_text())
    a = res["models"]["alpha"]
    assert (a["wins"], a["ties"], a["losses"]) == (0, 6, 0)
    assert res["judge"]["consistency_rate"] == 0.0 and res["judge"]["swapped"] == 6
    if mode == "pairwise-score":
        assert a["relative_score"] == 1.0 and a["total_score"] == 6 * 5.5
    assert res["models"]["alpha"]["rating"] == pytest.approx(res["models"]["beta"]["rating"])

    # Without the swap the same judge looks decisive: the bias goes unnoticed.
    with ScriptedServer(lambda body, n: reply) as s:
        judge(tmp_path, s, answered, "--mode", mode, "--no-swap", out="noswap.jsonl", check=True)
        assert len(s.requests) == 6
    res = compute_report(load_judgments(tmp_path / "noswap.jsonl"), bootstrap_rounds=20)
    assert res["models"]["alpha"]["wins"] == 6 and res["judge"]["consistency_rate"] is None


def test_judge_failures_are_retried_then_recorded_then_redone(tmp_path, answered):
    attempts: dict = {}

    def flaky(body, n):
        p = prompt_parts(body)
        key = (p["question"], tuple(p["models"]))
        attempts[key] = attempts.get(key, 0) + 1
        if p["question"] == "Write a limerick.":
            return Reply(status=500)  # always fails
        if p["question"] == "Why is the sky blue?":  # 500, garbage, timeout, then fine
            k = attempts[key]
            if k == 1:
                return Reply(status=502)
            if k == 2:
                return Reply(raw=b"upstream proxy error", content_type="text/plain")
            if k == 3:
                return Reply(delay=2.0, text="7 7")
        return score_judge()(body, n)

    with ScriptedServer(flaky) as s:
        proc = judge(tmp_path, s, answered, "--judge-retries", "3", "--judge-timeout", "1", "--parallel", "4")
        assert proc.returncode == 1  # failed work
        assert "10 judged, 0 unparsed, 2 failed" in proc.stdout
    records = {(r["question_id"], r["turn"], r["order"]): r
               for r in map(json.loads, (tmp_path / "j.jsonl").read_text().splitlines())}
    sky = records[(3, 1, "AB")]
    assert sky["status"] == "ok" and sky["attempts"] == 4 and sky["parsed"]["scores"] == [7, 7]
    lim = records[("q4", 1, "BA")]
    assert lim["status"] == "error" and lim["attempts"] == 4 and "HTTP 500" in lim["error"] and lim["raw"] is None

    run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "-o", tmp_path / "rep", "--bootstrap-rounds", "20",
            check=True)
    res = json.loads((tmp_path / "rep/results.json").read_text())
    assert res["judgments"]["error"] == 2 and res["judge"]["incomplete"] == 1
    assert "**failed 2**" in (tmp_path / "rep/report.md").read_text()

    # Re-run against a healthy judge: only the two failed judgments are asked again.
    with ScriptedServer(score_judge()) as s:
        proc = judge(tmp_path, s, answered)
        assert proc.returncode == 0 and "2 judged, 0 unparsed, 0 failed, 10 already done" in proc.stdout
        assert {prompt_parts(r)["question"] for r in s.requests} == {"Write a limerick."}
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(x)["status"] == "ok" for x in lines)


def test_killed_judge_run_resumes_without_repeating(tmp_path, answered):
    qfile = answered
    out = tmp_path / "j.jsonl"
    with ScriptedServer(lambda body, n: Reply(delay=0.3, text=score_judge()(body, n))) as s:
        cmd = [sys.executable, "-m", "vicuna", "eval", "judge", "--questions", str(qfile), "--answers",
               str(tmp_path / "answers"), "--models", "alpha,beta", "--judge-model", "judge-x", "--judge-api-base",
               s.base_url, "--parallel", "1", "-o", str(out)]
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = len(s.requests)
    done = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert 4 <= len(done) < 12 and first <= len(done) + 1  # at most the in-flight call was lost
    done_keys = {(r["question_id"], r["turn"], tuple(r["positions"])) for r in done}

    with ScriptedServer(score_judge()) as s:
        proc = judge(tmp_path, s, qfile)
        assert proc.returncode == 0, proc.stderr
        asked = {(QID[p["question"]], TURN[p["question"]], tuple(p["models"])) for p in map(prompt_parts, s.requests)}
        assert len(s.requests) == 12 - len(done)
        assert not asked & done_keys
    final = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(final) == 12 and len({r["judgment_id"] for r in final}) == 12


def test_torn_log_line_from_a_crash_is_skipped_and_redone(tmp_path, answered):
    from vicuna.eval.openai_client import Endpoint
    from vicuna.eval.records import load_questions
    from vicuna.eval.judge import run_judge

    with ScriptedServer(score_judge()) as s:
        run_judge(load_questions(answered), tmp_path / "answers", ["alpha", "beta"], Endpoint(s.base_url, "judge-x"),
                  tmp_path / "j.jsonl", mode="pairwise-score")
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    # Keep 3 finished records and half of the 4th, as a crash in mid-write would.
    (tmp_path / "j.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with ScriptedServer(score_judge()) as s:
        counts = run_judge(load_questions(answered), tmp_path / "answers", ["alpha", "beta"],
                           Endpoint(s.base_url, "judge-x"), tmp_path / "j.jsonl", mode="pairwise-score")
        assert counts["skipped_done"] == 3 and counts["ok"] == 9 and len(s.requests) == 9
    final = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [r["judgment_id"] for r in final] == [json.loads(x)["judgment_id"] for x in lines]


def test_single_mode_and_run_config(tmp_path):
    write_questions(tmp_path / "q.jsonl")  # the config names it relative to itself

    def single_judge(body, n):
        p = prompt_parts(body)
        return f"Fine.\nRating: [[{SCORES[p['models'][0]][CATEGORY[p['question']]]}]]"

    with ScriptedServer(answering) as answers_srv, ScriptedServer(single_judge) as judge_srv:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(f"""
questions: q.jsonl
output_dir: out
parallel: 2
models:
  - name: alpha
    api_base: {answers_srv.base_url}
  - name: beta
    api_base: {answers_srv.base_url}
    temperature: {{writing: 1.0}}
judge:
  model: judge-x
  api_base: {judge_srv.base_url}
  mode: single
  baseline: beta
report:
  bootstrap_rounds: 20
""")
        proc = run_cli("eval", "run", cfg)
        assert proc.returncode == 0, proc.stderr
        assert len(judge_srv.requests) == 12
        again = run_cli("eval", "run", cfg)  # everything done: nothing is asked again
        assert again.returncode == 0 and len(judge_srv.requests) == 12 and len(answers_srv.requests) == 12
    res = json.loads((tmp_path / "out/report/results.json").read_text())
    a = res["models"]["alpha"]
    turns = [(q["category"], i + 1) for q in QUESTIONS for i in range(len(q["turns"]))]
    assert a["score_sum"] == sum(SCORES["alpha"][c] for c, _ in turns) == 49
    assert a["relative_score"] == pytest.approx(49 / sum(SCORES["beta"][c] for c, _ in turns))  # 49 / 33
    assert a["relative_score"] == pytest.approx(49 / 33)
    assert a["avg_score_turn"] == {"1": pytest.approx(32 / 4), "2": pytest.approx(17 / 2)}
    assert res["models"]["beta"]["avg_score"] == pytest.approx(33 / 6)
    assert (a["wins"], a["ties"], a["losses"]) == (5, 1, 0)
    # The judge run's baseline is recorded, so a plain `eval report` finds it too.
    assert compute_report(load_judgments(tmp_path / "out/judgments.jsonl"), bootstrap_rounds=5)["baseline"] == "beta"


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2, "category": "x"}\n')
    proc = run_cli("eval", "answer", "--questions", bad, "--model", "m", "--api-base", "http://127.0.0.1:9/v1",
                   "-o", tmp_path / "a.jsonl")
    assert proc.returncode == 2 and "question 2: needs 'turns'" in proc.stderr
    qfile = write_questions(tmp_path / "q.jsonl")
    proc = run_cli("eval", "judge", "--questions", qfile, "--answers", tmp_path, "--models", "alpha,beta",
                   "--judge-model", "j", "--judge-api-base", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2 and "no answers for model 'alpha'" in proc.stderr
    proc = run_cli("eval", "judge", "--questions", qfile, "--answers", tmp_path, "--models", "alpha,beta",
                   "--judge-model", "j", "--baseline", "gamma")
    assert proc.returncode == 2 and "--baseline 'gamma' must be one of --models" in proc.stderr
    proc = run_cli("eval", "judge", "--answers", tmp_path, "--models", "alpha", "--judge-model", "j",
                   "--prompts", "nope")
    assert proc.returncode == 2 and "unknown judge prompt set 'nope'" in proc.stderr
    other = write_questions(tmp_path / "other.jsonl", [{"question_id": 99, "category": "x", "turns": ["?"]}])
    (tmp_path / "alpha.jsonl").write_text(json.dumps({"question_id": 1, "choices": [{"turns": ["a"]}]}) + "\n")
    (tmp_path / "beta.jsonl").write_text(json.dumps({"question_id": 1, "text": "b"}) + "\n")
    proc = run_cli("eval", "judge", "--questions", other, "--answers", tmp_path, "--models", "alpha,beta",
                   "--judge-model", "j", "--judge-api-base", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2 and "nothing to judge" in proc.stderr
    help_ = run_cli("eval", "judge", "--help", check=True).stdout
    assert "pairwise-score" in help_ and "examples:" in help_ and "--protocol" in help_


def test_run_config_with_existing_answers_and_config_errors(tmp_path, answered):
    from vicuna.errors import EvalUsageError
    from vicuna.eval.judge import load_prompts
    from vicuna.eval.pipeline import run_config

    (tmp_path / "mine").mkdir()
    (tmp_path / "answers" / "beta.jsonl").rename(tmp_path / "mine" / "beta.jsonl")
    with ScriptedServer(answering) as a, ScriptedServer(score_judge()) as j:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(f"questions: q.jsonl\noutput_dir: out\nmodels:\n"
                       f"  - {{name: alpha, api_base: '{a.base_url}'}}\n  - {{name: beta, answers: mine/beta.jsonl}}\n"
                       f"judge: {{model: judge-x, api_base: '{j.base_url}', baseline: beta}}\n"
                       f"report: {{bootstrap_rounds: 10}}\n")
        assert run_config(cfg) == 0
        assert len(a.requests) == 6 and len(j.requests) == 12  # beta's answers were not regenerated
    res = json.loads((tmp_path / "out/report/results.json").read_text())
    assert res["models"]["alpha"]["total_score"] == 49 and res["models"]["alpha"]["baseline_total"] == 33

    cfg.write_text("models: [{name: a, api_base: x}]\njudge: {model: j, temprature: 0}\n")
    with pytest.raises(EvalUsageError, match=r"judge: unknown key\(s\) temprature"):
        run_config(cfg)
    cfg.write_text("models: [{name: a}]\njudge: {model: j}\n")
    with pytest.raises(EvalUsageError, match="model 'a' needs 'api_base'"):
        run_config(cfg)
    bad = tmp_path / "p.yaml"
    bad.write_text("name: mine\nversion: 2\nprompts:\n" + "".join(
        f"  {m}: {{system: s, user: 'Q: {{question}} {{answr}}'}}\n" for m in ("pairwise-score", "pairwise", "single")))
    with pytest.raises(EvalUsageError, match=r"prompts.pairwise-score .*bad placeholder 'answr'"):
        load_prompts(str(bad))
