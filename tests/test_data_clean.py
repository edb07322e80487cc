"""`vicuna data clean` end to end: drop reasons, report, de-duplication, workers, bad input."""

from __future__ import annotations

import hashlib
import json

from conftest import run_cli

from vicuna.data.clean import CleanConfig, clean_file
from vicuna.data.synthetic import WRAP, corpus
from test_data_html import PYTHON


def conv(*pairs, sid, **extra):
    turns = []
    for role, value in pairs:
        turns.append({"from": role, "value": value})
    return {"id": sid, "conversations": turns, **extra}


ANSWER = WRAP.format("<p>Here is the function you asked for:</p>" + PYTHON)

RAW = [
    conv(("human", "Write a Fibonacci function in Python"), ("gpt", "1 / 1" + ANSWER), sid="ok_html", model="gpt4"),
    conv(("user", "2 / 2What is 2+2? Answer briefly."), ("chatgpt", WRAP.format("<p>2 + 2 = <strong>4</strong>.</p>")),
         sid="ok_aliases"),
    conv(("gpt", "leftover answer from earlier"), ("human", "Tell me a joke about cats please"),
         ("gpt", WRAP.format("<p>Why did the cat sit on the computer? To keep an eye on the mouse!</p>")),
         ("human", "another one?"), sid="ok_trimmed"),
    conv(("human", "Hello there, how are you?"), ("gpt", "Too many requests in 1 hour. Try again later."),
         sid="error_page"),
    conv(("human", "Who trained you, really?"), ("gpt", WRAP.format("<p>I was trained by OpenAI.</p>")),
         sid="blocked"),
    conv(("human", "Question one here?"), ("human", "Question two here?"), ("gpt", "Answer text."), sid="alternate"),
    conv(("human", "Is this empty?"), ("gpt", WRAP.format("<p></p>")), sid="empty"),
    conv(("human", "hi"), ("gpt", "yo"), sid="short"),
    conv(("human", "Write a Fibonacci function in Python"), ("gpt", ANSWER), sid="dup_content"),
    conv(("human", "Something else entirely, a new question"), ("gpt", "A new answer, long enough."), sid="ok_html"),
    {"id": "no_convs", "text": "hello"},
    conv(("human", "value is not a string"), ("gpt", 42), sid="bad_value"),
]


def write_jsonl(path, rows, broken_line: bytes | None = None):
    lines = [json.dumps(r).encode() for r in rows]
    if broken_line is not None:
        lines.insert(3, broken_line)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_clean_cli_end_to_end(tmp_path):
    raw = tmp_path / "raw.jsonl"
    write_jsonl(raw, RAW, broken_line=b'{"id": "broken" "conversations": []}')
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    out, report_path = tmp_path / "clean.json", tmp_path / "report.json"

    proc = run_cli("data", "clean", raw, "-o", out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert "kept 3 of 13 samples" in proc.stderr
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == digest  # input untouched

    kept = json.loads(out.read_text())
    assert [s["id"] for s in kept] == ["ok_html", "ok_aliases", "ok_trimmed"]
    first = kept[0]
    assert first["model"] == "gpt4"  # other fields survive
    assert first["conversations"][1]["value"].startswith(
        "Here is the function you asked for:\n\n```python\ndef fib(n):\n")
    assert "Copy code" not in out.read_text() and "1 / 1" not in out.read_text()
    assert kept[1]["conversations"] == [{"from": "human", "value": "What is 2+2? Answer briefly."},
                                        {"from": "gpt", "value": "2 + 2 = **4**."}]
    assert [t["from"] for t in kept[2]["conversations"]] == ["human", "gpt"]  # leading gpt + trailing human trimmed

    report = json.loads(report_path.read_text())
    assert report["records"] == 13 and report["kept"] == 3
    assert report["dropped"] == {
        "error_page": 1, "blocked_words": 1, "roles_not_alternating": 1, "empty_turn": 1, "too_short": 1,
        "duplicate_content": 1, "duplicate_id": 1, "missing_conversations": 1, "bad_turn": 1, "malformed_record": 1,
    }
    ex = report["examples"]
    assert ex["error_page"] == ["error_page"] and ex["blocked_words"] == ["blocked"]
    assert ex["duplicate_content"] == ["dup_content"] and ex["duplicate_id"] == ["ok_html"]
    assert ex["malformed_record"] == ["record 4 (line 4)"]
    bad = {b["reason"]: b for b in report["bad_records"]}
    assert bad["malformed_record"]["line"] == 4 and "malformed JSON" in bad["malformed_record"]["detail"]
    assert bad["bad_turn"]["record"] == bad["bad_turn"]["line"] == 13
    assert "must be a string" in bad["bad_turn"]["detail"]
    assert report["changes"]["leading_gpt_dropped"] == 1 and report["changes"]["trailing_human_dropped"] == 1

    # never overwrite without --force; cleaning the output again changes nothing
    again = run_cli("data", "clean", raw, "-o", out)
    assert again.returncode == 2 and "--force" in again.stderr
    out2 = tmp_path / "clean2.json"
    assert run_cli("data", "clean", out, "-o", out2).returncode == 0
    assert out2.read_bytes() == out.read_bytes()

    # --strict stops at the first bad record, names it, writes nothing
    strict_out = tmp_path / "strict.json"
    proc = run_cli("data", "clean", raw, "-o", strict_out, "--strict")
    assert proc.returncode == 2 and "line 4" in proc.stderr and "Traceback" not in proc.stderr
    assert not strict_out.exists()


def test_blocked_words_options(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([
        conv(("human", "Tell me about ChatGPT please"), ("gpt", "It is a chat assistant."), sid="a"),
        conv(("human", "Tell me about Bard please"), ("gpt", "It is another assistant."), sid="b"),
    ]))
    words = tmp_path / "words.txt"
    words.write_text("# my list\nbard\n\n")
    r = clean_file(raw, tmp_path / "o1.json", config=CleanConfig(blocked_words=("bard",)))
    assert r.kept == 1 and r.examples["blocked_words"] == ["b"]
    assert run_cli("data", "clean", raw, "-o", tmp_path / "o2.json", "--blocked-words", words).returncode == 0
    assert [s["id"] for s in json.loads((tmp_path / "o2.json").read_text())] == ["a"]
    assert run_cli("data", "clean", raw, "-o", tmp_path / "o3.json", "--no-blocked-words").returncode == 0
    assert len(json.loads((tmp_path / "o3.json").read_text())) == 2
    assert len(json.loads((tmp_path / "o1.json").read_text())) == 1


def test_workers_give_identical_output(tmp_path):
    raw = tmp_path / "syn.jsonl"
    rows = corpus(600, seed=7)
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r1 = clean_file(raw, tmp_path / "w1.jsonl", workers=1, batch_size=16, report_path=tmp_path / "r1.json")
    r2 = clean_file(raw, tmp_path / "w2.jsonl", workers=2, batch_size=16, report_path=tmp_path / "r2.json")
    assert (tmp_path / "w1.jsonl").read_bytes() == (tmp_path / "w2.jsonl").read_bytes()
    d1, d2 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in (1, 2))
    d1.pop("output"), d2.pop("output")
    assert d1 == d2
    assert r1.kept == r2.kept and 0.7 * len(rows) < r1.kept < len(rows)
    for reason in ("error_page", "blocked_words", "roles_not_alternating", "empty_turn", "duplicate_content"):
        assert r1.dropped[reason] > 0, reason
    out = [json.loads(line) for line in (tmp_path / "w1.jsonl").read_text().splitlines()]
    assert len({s["id"] for s in out}) == len(out)
    text = (tmp_path / "w1.jsonl").read_text()
    assert "markdown prose" not in text and "hljs" not in text and "<p>" not in text.replace("<p>Hello", "")
    assert '<div class=\\"' in text  # ...but HTML written inside code blocks survives
    assert "Copy code" not in text and "```python\\n" in text
