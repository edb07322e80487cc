"""The real public data: the original Vicuna-80 answers of five models, MT-bench questions and references."""

from __future__ import annotations

import json
import re

import pytest

from conftest import SHARED_DATA, run_cli
from test_eval_fakes import ScriptedServer, user_text
from vicuna.errors import EvalUsageError
from vicuna.eval.records import load_answers, load_questions, load_references
from vicuna.eval.judge import build_jobs, resolve_setup
from vicuna.eval.judge_prompts import load_prompts

BLOG = SHARED_DATA / "vicuna_blog_answers"
MT = SHARED_DATA / "mt_bench"
PROMPTS = SHARED_DATA / "judge_prompts"
pytestmark = pytest.mark.skipif(not BLOG.exists(), reason=f"shared data not available at {SHARED_DATA}")

MODELS = ["vicuna-13b", "alpaca-13b", "llama-13b", "bard", "gpt35"]


def length_score(text: str) -> int:
    """The scripted judge's (deliberately simple) taste: longer answers score higher, 1-10."""
    return min(10, 1 + len(text.split()) // 30)


def blog_prompt_for(category: str) -> dict:
    """The blog's prompt for a question category, read straight from the two files (FastChat's rule:
    the first reviewer with the category, else the first reviewer; its prompt_id names the prompt)."""
    reviewers = [json.loads(x) for x in (PROMPTS / "vicuna_blog_reviewers.jsonl").read_text().splitlines()]
    prompts = {p["prompt_id"]: p for p in map(json.loads, (PROMPTS / "vicuna_blog_prompts.jsonl").read_text().splitlines())}
    reviewer = next((r for r in reviewers if r["category"] == category), reviewers[0])
    return {**prompts[reviewer["prompt_id"]], "reviewer": reviewer}


def test_vicuna_blog_protocol_reproduces_the_table(tmp_path):
    """The original evaluation, one command: every model vs Vicuna-13B, FastChat's prompts, "% of ChatGPT"."""
    questions = {q["question_id"]: q for q in map(json.loads, (BLOG / "question.jsonl").read_text().splitlines())}
    answers = {m: load_answers(BLOG / f"answer_{m}.jsonl") for m in MODELS}
    others = [m for m in MODELS if m != "vicuna-13b"]
    text_of = {t[0]: m for m in MODELS for t in answers[m].values()}

    def judge(body, n):
        user = user_text(body)
        shown = [re.search(rf"\[The Start of Assistant {i}'s Answer\]\n(.*?)\n\n\[The End of Assistant {i}'s Answer\]",
                           user, re.S).group(1) for i in (1, 2)]
        s1, s2 = (length_score(t) for t in shown)
        if text_of[shown[0]] == "bard" and len(user) % 7 == 0:  # now and then the judge forgets the format
            return "Both assistants did well; the second is a bit more detailed."
        return f"{s1} {s2}\n\nAssistant 1 provides {'more' if s1 > s2 else 'less'} detail."

    with ScriptedServer(judge) as s:
        proc = run_cli("eval", "run", "--protocol", "vicuna-blog", "--questions", BLOG / "question.jsonl",
                       "--answers", BLOG, "--models", ",".join(MODELS), "--baseline", "vicuna-13b",
                       "--relative-to", "gpt35", "--judge-prompts", PROMPTS / "vicuna_blog_prompts.jsonl",
                       "--judge-reviewers", PROMPTS / "vicuna_blog_reviewers.jsonl", "--judge-model", "gpt-4",
                       "--judge-api-base", s.base_url, "--parallel", "8", "-o", tmp_path / "blog")
        assert proc.returncode == 0, proc.stderr
        requests = list(s.requests)

    # The procedure: one order per pair (the other model as Assistant 1, Vicuna as Assistant 2), the
    # category's prompt filled in exactly, the reviewer's temperature and max_tokens.
    assert len(requests) == len(others) * 80
    for body in requests:
        user = body["messages"][1]["content"]
        qid = next(q for q, a in answers["vicuna-13b"].items() if f"\n{a[0]}\n\n[The End of Assistant 2" in user)
        first = next(m for m in others if f"Assistant 1's Answer]\n{answers[m][qid][0]}\n\n" in user)
        p = blog_prompt_for(questions[qid]["category"])
        expected = (p["prompt_template"].replace("{question}", questions[qid]["text"])
                    .replace("{answer_1}", answers[first][qid][0]).replace("{answer_2}", answers["vicuna-13b"][qid][0])
                    .replace("{prompt}", p["defaults"]["prompt"]))
        assert body["messages"] == [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": expected}]
        assert (body["temperature"], body["max_tokens"]) == (0.2, 1024) == (
            p["reviewer"]["metadata"]["temperature"], p["reviewer"]["metadata"]["max_tokens"])
        assert body["model"] == "gpt-4"

    records = [json.loads(x) for x in (tmp_path / "blog/judgments.jsonl").read_text().splitlines()]
    assert {r["prompt_name"] for r in records} == {"gpt-4-0328-default", "gpt-4-0328-coding", "gpt-4-0328-math"}
    assert all(r["protocol"] == "vicuna-blog" and r["order"] == "AB" and len(r["prompt_sha"]) == 12 for r in records)
    unparsed = {(r["question_id"], r["model_a"]) for r in records if r["status"] == "unparsed"}
    assert unparsed and all(m == "bard" for _, m in unparsed)

    # The table by hand: totals per pair over the parsed reviews, ratios, and the chain through Vicuna.
    res = json.loads((tmp_path / "blog/report/results.json").read_text())
    ratio = {}
    for m in others:
        qids = [q for q in answers[m] if (q, m) not in unparsed]
        mine = sum(length_score(answers[m][q][0]) for q in qids)
        vicuna = sum(length_score(answers["vicuna-13b"][q][0]) for q in qids)
        row = res["models"][m]
        assert (row["total_score"], row["baseline_total"]) == (mine, vicuna)
        ratio[m] = mine / vicuna
        wins = sum(length_score(answers[m][q][0]) > length_score(answers["vicuna-13b"][q][0]) for q in qids)
        assert row["wins"] == wins and row["comparisons"] == len(qids)
    for m in others:
        assert res["models"][m]["relative_to_score"] == pytest.approx(ratio[m] / ratio["gpt35"])
    assert res["models"]["vicuna-13b"]["relative_to_score"] == pytest.approx(1 / ratio["gpt35"])
    assert res["models"]["gpt35"]["relative_to_score"] == pytest.approx(1.0)
    assert res["judgments"]["unparsed"] == len(unparsed)
    assert ratio["llama-13b"] < 1  # short LLaMA answers lose on length, as in the blog
    md = (tmp_path / "blog/report/report.md").read_text()
    assert "% of gpt35" in md and f"{100 / ratio['gpt35']:.1f}%" in md


def test_mt_bench_reference_guided_jobs():
    questions = load_questions(MT / "question.jsonl")
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    fake = {m: {q.question_id: [f"{m} one", f"{m} two"] for q in questions} for m in ("x", "y")}
    cats = {"math", "reasoning", "coding"}

    inline, _ = build_jobs(questions, fake, "single", baseline=None, swap=True, references={}, reference_categories=cats)
    assert len(inline) == 2 * 80 * 2
    guided = {(j.question.question_id, j.turn) for j in inline if j.reference}
    expected = {(q.question_id, t + 1) for q in questions if q.category in cats and q.reference
                for t in range(min(2, len(q.reference))) if q.reference[t].strip()}
    assert guided == expected and (103, 2) not in guided  # no empty references, none outside `cats`
    assert all(j.question.category in cats for j in inline if j.reference)

    gpt4 = load_references(MT / "reference_answer" / "gpt-4.jsonl")
    assert sorted(gpt4) == list(range(101, 131))
    with_file, missing = build_jobs(questions, fake, "pairwise", baseline="y", swap=True, references=gpt4,
                                    reference_categories=cats)
    assert missing == 0 and len(with_file) == 80 * 2 * 2
    j101 = next(j for j in with_file if j.question.question_id == 101 and j.turn == 2)
    assert j101.reference == gpt4[101]  # an explicit --reference file wins over the inline field
    prompt = load_prompts().render_mode("pairwise", question=j101.question.turns[1], answers=["A1", "B1"],
                                        histories=[[(j101.question.turns[0], "a0")], [(j101.question.turns[0], "b0")]],
                                        reference=j101.reference[1])
    text = prompt[1]["content"]
    assert "[Reference Answer]\n" + gpt4[101][1] in text
    assert text.index("[Earlier Conversation of Assistant A]") < text.index("[Question]")
    assert text.rstrip().endswith('"[[C]]" for a tie.')


def test_blog_answer_file_lookup(tmp_path):
    from vicuna.errors import EvalUsageError
    from vicuna.eval.records import find_answer_file

    assert find_answer_file(BLOG, "gpt35").name == "answer_gpt35.jsonl"
    with pytest.raises(EvalUsageError, match="no answers for model 'nobody'"):
        find_answer_file(BLOG, "nobody")
    # MT-bench style reference file used as an answer file
    assert load_answers(MT / "reference_answer" / "gpt-4.jsonl")[101][0].startswith("If you have just overtaken")
    json.loads((MT / "question.jsonl").read_text().splitlines()[0])


NEED_REF = {"math", "reasoning", "coding"}  # FastChat's NEED_REF_CATS for MT-bench


def fill(template: str, fields: dict[str, str]) -> str:
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


@pytest.mark.parametrize("protocol", ["mt-bench-single", "mt-bench-pairwise"])
def test_mt_bench_prompt_choice_and_filling_are_fastchats(protocol):
    setup = resolve_setup(protocol=protocol, judge_prompts=PROMPTS / "fastchat_judge_prompts.jsonl")
    single = setup.mode == "single"
    questions = load_questions(MT / "question.jsonl")
    gpt4 = load_references(MT / "reference_answer" / "gpt-4.jsonl")
    fake = {m: {q.question_id: [f"{m} one {q.question_id}", f"{m} two {q.question_id}"] for q in questions}
            for m in ("x", "y")}
    jobs, missing = build_jobs(questions, fake, setup.mode, baseline=None if single else "y", swap=setup.swap,
                               references=gpt4, reference_categories=NEED_REF, book=setup.book)
    assert missing == 0 and len(jobs) == 80 * 2 * 2  # single: 2 models x 2 turns; pairwise: 1 pair x 2 turns x 2 orders
    prefix, version = ("single", "v1") if single else ("pair", "v2")
    for j in jobs:  # gen_judgment.py's four judges, by category and turn
        ref = j.question.category in NEED_REF
        assert j.prompt.name == (f"{prefix}-math-v1" if ref else f"{prefix}-{version}") + ("-multi-turn" if j.turn == 2 else "")
        assert j.reference == (gpt4[j.question.question_id] if ref else None)
        assert (j.prompt.temperature, j.prompt.max_tokens) == (0.0, 2048)

    # What the judge receives: the file's template with FastChat's fields, verbatim.
    raw = {r["name"]: r for r in map(json.loads, (PROMPTS / "fastchat_judge_prompts.jsonl").read_text().splitlines())}
    for qid, turn in ((111, 1), (111, 2), (81, 1), (81, 2)):
        job = next(j for j in jobs if j.question.question_id == qid and j.turn == turn and j.order in (None, "BA"))
        q = job.question
        shown = [fake[m][qid] for m in job.positions]
        fields = {"question": q.turns[0], "question_1": q.turns[0], "question_2": q.turns[1]}
        if single:
            fields.update(answer=shown[0][0], answer_1=shown[0][0], answer_2=shown[0][1])
        else:
            fields.update(answer_a=shown[0][0], answer_b=shown[1][0], answer_a_1=shown[0][0], answer_a_2=shown[0][1],
                          answer_b_1=shown[1][0], answer_b_2=shown[1][1])
        if job.reference:
            fields.update(ref_answer_1=gpt4[qid][0], ref_answer_2=gpt4[qid][1])
        messages = setup.book.render(job.prompt, setup.mode, questions=q.turns[:turn],
                                     answers=[fake[m][qid][:turn] for m in job.positions], reference=job.reference)
        p = raw[job.prompt.name]
        assert messages == [{"role": "system", "content": p["system_prompt"]},
                            {"role": "user", "content": fill(p["prompt_template"], fields)}]
        assert "{" not in messages[1]["content"] or "{" in "".join(fields.values())


def test_mt_bench_protocol_needs_references_and_skips_later_turns():
    setup = resolve_setup(protocol="mt-bench-single", judge_prompts=PROMPTS / "fastchat_judge_prompts.jsonl")
    questions = load_questions(MT / "question.jsonl")
    fake = {"x": {q.question_id: ["a", "b", "c"] for q in questions}}
    no_inline = [q.question_id for q in questions if q.category in NEED_REF and not q.reference]
    assert no_inline  # the shared question file lacks some references: FastChat grades with gpt-4.jsonl
    with pytest.raises(EvalUsageError, match=rf"these have none .*{no_inline[0]}.*--reference"):
        build_jobs(questions, fake, "single", baseline=None, swap=False, references={}, reference_categories=NEED_REF,
                   book=setup.book)
    three = [q for q in questions if q.category == "writing"][:1]
    three[0].turns.append("And a third turn?")
    jobs, _ = build_jobs(three, fake, "single", baseline=None, swap=False, references={}, reference_categories=NEED_REF,
                         book=setup.book)
    assert [j.turn for j in jobs] == [1]  # FastChat judges turn 2 of two-turn questions only
    with pytest.raises(EvalUsageError, match="--protocol mt-bench-single needs --judge-prompts"):
        resolve_setup(protocol="mt-bench-single")
    with pytest.raises(EvalUsageError, match="pass its reviewer file"):
        resolve_setup(protocol="vicuna-blog", judge_prompts=PROMPTS / "vicuna_blog_prompts.jsonl")
    with pytest.raises(EvalUsageError, match="judges in mode single, not --mode pairwise"):
        resolve_setup(protocol="mt-bench-single", mode="pairwise", judge_prompts=PROMPTS / "fastchat_judge_prompts.jsonl")


def test_prompts_command_checks_fastchat_files(tmp_path):
    proc = run_cli("eval", "prompts", PROMPTS / "fastchat_judge_prompts.jsonl", check=True)
    assert "mt-bench prompts for mode single, pairwise" in proc.stdout
    assert len(re.findall(r"^(single|pair)-\S+  sha [0-9a-f]{12}$", proc.stdout, re.M)) == 8
    proc = run_cli("eval", "prompts", PROMPTS / "vicuna_blog_prompts.jsonl", "--judge-reviewers",
                   PROMPTS / "vicuna_blog_reviewers.jsonl", check=True)
    assert "general: gpt-4-0328-default  sha" in proc.stdout and "math: gpt-4-0328-math" in proc.stdout
    broken = tmp_path / "judge_prompts.jsonl"
    rows = [json.loads(x) for x in (PROMPTS / "fastchat_judge_prompts.jsonl").read_text().splitlines()]
    rows[0]["prompt_template"] += "\n{answer_c}"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("eval", "prompts", broken)
    assert proc.returncode == 2 and "prompt pair-v2 has a placeholder 'answer_c'" in proc.stderr
    rows[0]["prompt_template"] = rows[0]["prompt_template"].replace("\n{answer_c}", "")
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows if r["name"] != "pair-v2-multi-turn"))
    proc = run_cli("eval", "prompts", broken, check=True)  # the single-answer set is still complete
    assert "mt-bench prompts for mode single\n" in proc.stdout
    with pytest.raises(EvalUsageError, match="holds no prompts for --mode pairwise; it has: single"):
        resolve_setup(mode="pairwise", judge_prompts=broken)
