"""`--protocol arena-hard` end to end: Arena-Hard-shaped files, a scripted judge on 127.0.0.1, the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from test_eval_fakes import ScriptedServer, user_text

# Arena-Hard's files: v0.1 questions {question_id, category, cluster, turns: [{content}]}, v2 {uid, category, prompt};
# answers {question_id, model_id, choices: [{index, turns: [{content, token_len}]}]} or v2 {uid, messages}.
QUESTIONS = [
    {"question_id": "u1", "category": "arena-hard-v0.1", "cluster": "Python", "turns": [{"content": "Sort a list."}]},
    {"question_id": "u2", "category": "arena-hard-v0.1", "cluster": "SQL", "turns": [{"content": "Join two tables."}]},
    {"uid": "u3", "category": "hard_prompt", "prompt": "Explain entropy."},
    {"uid": "u4", "category": "hard_prompt", "prompt": "Write a regex for dates."},
    {"uid": "u5", "category": "creative_writing", "prompt": "A poem about the sea."},
]
MODELS = ("strong", "weak", "base")


def prompt_of(q: dict) -> str:
    return q["turns"][0]["content"] if "turns" in q else q["prompt"]


def write_inputs(tmp: Path) -> tuple[Path, Path]:
    qfile = tmp / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    answers = tmp / "model_answer"
    answers.mkdir()
    for m in MODELS:
        lines = []
        for q in QUESTIONS:
            text = f"[{m}] " + ("## Answer\n\n- **a** long list\n" * 4 if m == "strong" else "a short answer")
            if "uid" in q:  # v2 shape
                lines.append({"uid": q["uid"], "model": m, "messages": [
                    {"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": {"answer": text}}]})
            else:
                lines.append({"question_id": q["question_id"], "answer_id": "x", "model_id": m, "choices": [
                    {"index": 0, "turns": [{"content": text, "token_len": 9}]}]})
        (answers / f"{m}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return qfile, answers


def scripted_judge(body: dict, n: int) -> str:
    """strong >> base always; base > weak, except 'A poem about the sea.' where the judge rambles."""
    text = user_text(body)
    a, b = re.findall(r"<\|The Start of Assistant [AB]'s Answer\|>\n\[(\w+)\]", text)
    question = re.search(r"<\|User Prompt\|>\n(.*?)\n\n<\|", text, re.S).group(1)
    pair = {a, b}
    if pair == {"strong", "base"}:
        return "My own answer first... My final verdict is Assistant " + ("A is significantly better: [[A>>B]]"
                                                                         if a == "strong" else "B is significantly "
                                                                         "better: [[B>>A]]")
    if question == "A poem about the sea.":
        return "Both poems have merits and flaws; I cannot decide."
    return "Comparing them: " + ("[[B>A]]" if a == "weak" else "[[A>B]]")


def test_arena_hard_run_end_to_end(tmp_path):
    qfile, answers = write_inputs(tmp_path)
    with ScriptedServer(scripted_judge) as judge:
        proc = run_cli("eval", "run", "--protocol", "arena-hard", "--questions", qfile, "--answers", answers,
                       "--models", ",".join(MODELS), "--baseline", "base", "--judge-model", "judge-x",
                       "--judge-api-base", judge.base_url, "--bootstrap-rounds", "50", "-o", tmp_path / "out",
                       "--parallel", "2")
        requests = list(judge.requests)
    assert proc.returncode == 0, proc.stderr
    # Both orders of every (model, baseline) pair on every question; our prompt, Arena-Hard's settings.
    assert len(requests) == 2 * 2 * len(QUESTIONS)
    assert all(r["temperature"] == 0 and r["max_tokens"] == 4096 for r in requests)
    assert "[[A>>B]]" in requests[0]["messages"][0]["content"]  # the five labels are in the system prompt
    shown_first = [re.search(r"Assistant A's Answer\|>\n\[(\w+)\]", user_text(r)).group(1) for r in requests]
    assert shown_first.count("base") == len(QUESTIONS) * 2 and shown_first.count("strong") == len(QUESTIONS)
    assert any("Explain entropy." in user_text(r) for r in requests)  # the v2 'prompt' shape was read

    records = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in records} == {"arena-hard"} and {r["mode"] for r in records} == {"pairwise-5"}
    strong = [r for r in records if r["model_a"] == "strong"]
    assert all(r["result"] == {"winner": "model_a", "strong": True} for r in strong)
    assert all(set(r["answer_style"]) == {"strong", "base"} for r in strong)
    assert strong[0]["answer_style"]["strong"]["lists"] == 4 and strong[0]["answer_style"]["base"]["lists"] == 0

    res = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    ah = res["arena_hard"]
    assert ah["baseline"] == "base" and ah["strong_weight"] == 3
    assert ah["models"]["strong"]["verdicts"] == {"much better": 10, "better": 0, "tie": 0, "worse": 0,
                                                  "much worse": 0, "unparsed": 0, "error": 0}
    assert ah["models"]["weak"]["verdicts"] == {"much better": 0, "better": 0, "tie": 0, "worse": 8,
                                                "much worse": 0, "unparsed": 2, "error": 0}
    assert ah["games"] == 10 * 3 + 8  # strong verdicts count three times
    assert list(ah["models"]) == ["strong", "weak"]
    for m, row in ah["models"].items():
        assert row["win_rate_lower"] <= row["win_rate"] <= row["win_rate_upper"]
        sc = row["style_controlled"]
        assert sc["win_rate_lower"] <= sc["win_rate"] <= sc["win_rate_upper"]
    assert ah["models"]["strong"]["win_rate"] > 0.9 and ah["models"]["weak"]["win_rate"] < 0.35
    # weak writes like the baseline and always loses: style control must not lift it (only strong's
    # long, formatted answers carry a style difference)
    assert ah["models"]["weak"]["style_controlled"]["win_rate"] < 0.35
    assert res["judgments"]["unparsed"] == 2
    # the generic tables carry the style-controlled ratings too (both orders combined per comparison)
    assert set(res["style_coefficients"]) == {"tokens", "headers", "lists", "bold"}
    assert res["models"]["strong"]["style_controlled_lower"] <= res["models"]["strong"]["style_controlled_rating"]
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "style-controlled (95% CI)" in md
    assert "## Arena-Hard: win rate vs base" in md and "| weak |" in md and "0 / 0 / 0 / 8 / 0 | 2 | 0 |" in md

    # The weight is a setting: a report with weight 1 counts every verdict once.
    again = run_cli("eval", "report", "--judgments", tmp_path / "out" / "judgments.jsonl", "--strong-weight", "1",
                    "--bootstrap-rounds", "10", "-o", tmp_path / "r1", check=True)
    assert again.returncode == 0
    assert json.loads((tmp_path / "r1" / "results.json").read_text())["arena_hard"]["games"] == 10 + 8


def test_a_users_judge_config_and_bad_settings(tmp_path):
    qfile, answers = write_inputs(tmp_path)
    config = tmp_path / "judge_config.yaml"
    config.write_text("name: my-judge\nsystem_prompt: Be fair. Answer [[A>B]] etc.\nprompt_template:\n"
                      "  - \"Q: {question_1}\\n<|The Start of Assistant A's Answer|>\\n{answer_1}\\n"
                      "<|The End of Assistant A's Answer|>\\n<|The Start of Assistant B's Answer|>\\n{answer_2}\\n"
                      "<|The End of Assistant B's Answer|>\"\nmax_tokens: 100\n")
    with ScriptedServer(lambda body, n: "[[A=B]]") as judge:
        common = ("--questions", qfile, "--answers", answers, "--judge-model", "j", "--judge-api-base",
                  judge.base_url, "--judge-backoff", "0.01")
        ok = run_cli("eval", "judge", "--protocol", "arena-hard", "--judge-prompts", config, "--models", "weak,base",
                     "--baseline", "base", "-o", tmp_path / "j.jsonl", *common)
        assert ok.returncode == 0, ok.stderr
        assert judge.requests[0]["messages"][0]["content"] == "Be fair. Answer [[A>B]] etc."
        assert any(r["messages"][1]["content"].startswith("Q: Sort a list.\n<|The Start") for r in judge.requests)
        assert judge.requests[0]["max_tokens"] == 100
        no_base = run_cli("eval", "judge", "--protocol", "arena-hard", "--models", "weak,base", "-o",
                          tmp_path / "k.jsonl", *common)
        assert no_base.returncode == 2 and "--baseline" in no_base.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text("system_prompt: x\nprompt_template: '{question} {answer_a}'\n")
        refused = run_cli("eval", "judge", "--protocol", "arena-hard", "--judge-prompts", bad, "--models", "weak,base",
                          "--baseline", "base", "-o", tmp_path / "m.jsonl", *common)
        assert refused.returncode == 2 and "placeholder" in refused.stderr and "{question_1}" in refused.stderr
        one_order = run_cli("eval", "judge", "--protocol", "arena-hard", "--no-swap", "--models", "weak,base",
                            "--baseline", "base", "-o", tmp_path / "o.jsonl", *common)
        assert one_order.returncode == 2 and "both answer orders" in one_order.stderr
        mixed = run_cli("eval", "judge", "--protocol", "arena-hard", "--prompts", "vicuna-judge-v1", "--models",
                        "weak,base", "--baseline", "base", "-o", tmp_path / "n.jsonl", *common)
        assert mixed.returncode == 2 and "--judge-prompts" in mixed.stderr
    shown = run_cli("eval", "prompts", "arena-hard", check=True).stdout
    assert "[[B>>A]]" in shown and "{question_1}" in shown and "max_tokens 4096" in shown
    listed = run_cli("eval", "prompts", config, check=True).stdout
    assert "arena-hard prompts for mode pairwise-5" in listed and "my-judge" in listed
    res = json.loads(run_cli("eval", "report", "--judgments", tmp_path / "j.jsonl", "--bootstrap-rounds", "5", "-o",
                             tmp_path / "rep", check=True).stdout and (tmp_path / "rep" / "results.json").read_text())
    assert res["arena_hard"]["models"]["weak"]["verdicts"]["tie"] == 2 * len(QUESTIONS)
    assert res["arena_hard"]["models"]["weak"]["win_rate"] == pytest.approx(0.5, abs=1e-6)


def test_a_yaml_config_sets_the_strong_weight(tmp_path):
    qfile, answers = write_inputs(tmp_path)
    with ScriptedServer(scripted_judge) as judge:
        def config(weight) -> Path:
            path = tmp_path / "eval.yaml"
            path.write_text(json.dumps({  # JSON is YAML
                "questions": str(qfile), "output_dir": "out", "parallel": 2,
                "models": [{"name": m, "answers": str(answers / f"{m}.jsonl")} for m in ("strong", "base")],
                "judge": {"model": "j", "api_base": judge.base_url, "protocol": "arena-hard", "baseline": "base"},
                "report": {"bootstrap_rounds": 5, "strong_weight": weight}}))
            return path
        bad = run_cli("eval", "run", config("x"))
        assert bad.returncode == 2 and "strong_weight" in bad.stderr and not judge.requests  # refused up front
        run_cli("eval", "run", config(2), check=True)
    res = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert res["arena_hard"]["strong_weight"] == 2 and res["arena_hard"]["games"] == 10 * 2
