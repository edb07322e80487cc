"""merge / sample / train-test / convert / identity, and the CLI's help and errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from vicuna.data.clean import Cleaner
from vicuna.data.corpora import chatterbot_dir, convert
from vicuna.data.identity import identity_conversations
from vicuna.data.ops import merge_files, sample_file, train_test_split
from vicuna.errors import DataError
from vicuna.files import read_records


def rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                    {"from": "gpt", "value": f"a{i}"}]} for i in range(n)]


def load(path) -> list:
    return [obj for _, obj in read_records(path)]


def test_merge_mixed_formats_and_duplicate_ids(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps(rows("x", 3)))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows("x", 2) + rows("y", 2)) + "not json\n")
    counts = merge_files([str(a), str(b)], str(tmp_path / "m.jsonl"))
    assert [r["id"] for r in load(tmp_path / "m.jsonl")] == ["x0", "x1", "x2", "x0", "x1", "y0", "y1"]
    assert counts["duplicate_ids"] == 2 and counts["bad_records"] == 1
    merge_files([str(a), str(b)], str(tmp_path / "u.json"), unique_ids=True)
    assert [r["id"] for r in load(tmp_path / "u.json")] == ["x0", "x1", "x2", "y0", "y1"]
    with pytest.raises(DataError, match="line 5"):
        merge_files([str(b)], str(tmp_path / "s.json"), strict=True)


def test_sample_is_uniform_deterministic_and_ordered(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows("s", 200)))
    sample_file(str(src), str(tmp_path / "a.json"), 50, seed=1)
    sample_file(str(src), str(tmp_path / "b.json"), 50, seed=1)
    sample_file(str(src), str(tmp_path / "c.json"), 50, seed=2)
    a, b, c = (load(tmp_path / f"{x}.json") for x in "abc")
    assert a == b and a != c and len(a) == 50
    idx = [int(r["id"][1:]) for r in a]
    assert idx == sorted(idx) and len(set(idx)) == 50
    assert min(idx) < 50 and max(idx) > 150  # drawn from the whole file, not a prefix
    sample_file(str(src), str(tmp_path / "all.json"), 1000, seed=0)
    assert len(load(tmp_path / "all.json")) == 200


def test_train_test_split(tmp_path):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows("t", 300)))
    n_train, n_test = train_test_split(str(src), test_fraction=0.1, seed=3)
    train, test = load(tmp_path / "data_train.json"), load(tmp_path / "data_test.json")
    assert (n_train, n_test) == (270, 30) == (len(train), len(test))
    ids_train, ids_test = {r["id"] for r in train}, {r["id"] for r in test}
    assert not ids_train & ids_test and len(ids_train | ids_test) == 300
    with pytest.raises(DataError, match="--force"):
        train_test_split(str(src), test_fraction=0.1, seed=3)
    train_test_split(str(src), test_fraction=0.1, seed=3, force=True)
    assert load(tmp_path / "data_test.json") == test  # same seed, same split
    with pytest.raises(DataError, match="between 0 and 1"):
        train_test_split(str(src), test_fraction=1.5, train_out=str(tmp_path / "x.json"))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(rows("z", 5)))
    assert train_test_split(str(tiny), test_fraction=0.01) == (4, 1)  # never an empty test set


def test_convert_alpaca(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "", "output": "no instruction"},
        {"instruction": "Bad output", "output": 3},
    ]))
    assert convert("alpaca", str(src), str(tmp_path / "o.json")) == 2
    out = load(tmp_path / "o.json")
    assert out[0] == {"id": "alpaca_1", "conversations": [
        {"from": "human", "value": "Translate to French.\n\nGood morning"}, {"from": "gpt", "value": "Bonjour"}]}
    assert out[1]["conversations"][0]["value"] == "Name a colour."
    with pytest.raises(DataError, match="record 3"):
        convert("alpaca", str(src), str(tmp_path / "p.json"), strict=True)


def test_convert_chatterbot_installed_corpus(tmp_path):
    if not chatterbot_dir().is_dir():
        pytest.skip("chatterbot-corpus is not installed")
    out = tmp_path / "cb.jsonl"
    proc = run_cli("data", "convert", "--from", "chatterbot", "-o", out)
    assert proc.returncode == 0, proc.stderr
    convs = load(out)
    assert len(convs) > 1500
    for c in convs:
        roles = [t["from"] for t in c["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
        assert all(t["value"].strip() for t in c["conversations"])
    ai = next(c for c in convs if c["conversations"][0]["value"] == "What is AI?")
    assert ai["id"].startswith("chatterbot_ai_")
    # a custom directory with a broken file and an odd-length conversation
    d = tmp_path / "yml"
    d.mkdir()
    (d / "a.yml").write_text("conversations:\n- - Hi\n  - Hello!\n  - How are you?\n- - lonely line\n")
    (d / "b.yml").write_text("conversations: [unclosed\n")
    assert convert("chatterbot", str(d), str(tmp_path / "d.json")) == 1
    assert load(tmp_path / "d.json")[0]["conversations"] == [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]


def test_identity(tmp_path):
    convs = identity_conversations("Zorro", "Acme Research")
    assert 300 <= len(convs) <= 500
    assert len({c["id"] for c in convs}) == len(convs)
    text = json.dumps(convs)
    assert "Zorro" in text and "Acme Research" in text and "Vicuna" not in text and "LMSYS" not in text
    questions = {c["conversations"][-2]["value"] for c in convs}
    assert {"Who are you?", "Who created you?", "Are you ChatGPT?"} <= questions | {
        c["conversations"][0]["value"] for c in convs}
    for c in convs:
        assert [t["from"] for t in c["conversations"]] == ["human", "gpt"] * (len(c["conversations"]) // 2)
    # valid training data: the cleaner accepts everything except the ChatGPT/OpenAI denials
    cleaner = Cleaner()
    dropped = {cleaner.clean(c, 0).reason for c in convs} - {"kept"}
    assert dropped == {"blocked_words"}
    out = tmp_path / "id.json"
    proc = run_cli("data", "identity", "-o", out, "--name", "Zorro", "--org", "Acme Research")
    assert proc.returncode == 0 and load(out) == convs


def test_cli_help_and_usage_errors(tmp_path):
    proc = run_cli("data", "--help")
    assert proc.returncode == 0
    for verb in ("clean", "filter", "split", "stats", "merge", "sample", "train-test", "convert", "identity"):
        assert verb in proc.stdout
    proc = run_cli("data", "clean", "--help")
    assert "example:" in proc.stdout and "--workers" in proc.stdout and "Copy code" in proc.stdout
    proc = run_cli("data", "clean", tmp_path / "missing.json", "-o", tmp_path / "o.json")
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "x.txt"
    bad.write_text("[]")
    proc = run_cli("data", "sample", bad, "-o", tmp_path / "o.json", "-n", "3")
    assert proc.returncode == 2 and "unknown extension" in proc.stderr
