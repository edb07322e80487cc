"""`vicuna data pairs`: preference pairs from a real arena database and from every preference file format."""

import json

from conftest import run_cli
from vicuna.data.pairs import export_pairs
from vicuna.serve.arena import ArenaStore

SYS = {"role": "system", "content": "Be brief."}


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _battle(store, n, conv_a, conv_b, winner, *, void=None):
    """What the web arena stores for one round: both sides' conversations, then the vote."""
    for cid, model, msgs in ((f"{n}-a", "alpha", conv_a), (f"{n}-b", "beta", conv_b)):
        store.save_conversation(cid, mode="battle", model=model, messages=msgs)
    store.add_vote(mode="battle", model_a="alpha", model_b="beta", conv_a=f"{n}-a", conv_b=f"{n}-b", winner=winner,
                   anonymous=True, void_reason=void)


def read_pairs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_arena_database_votes_ties_void_and_multi_turn(tmp_path):
    db = tmp_path / "arena.db"
    store = ArenaStore(db)
    _battle(store, 1, [_u("2+2?"), _a("4")], [_u("2+2?"), _a("5")], "model_a")
    _battle(store, 2, [SYS, _u("capital of France?"), _a("Lyon")], [SYS, _u("capital of France?"), _a("Paris")],
            "model_b")
    _battle(store, 3, [_u("hi"), _a("hello")], [_u("hi"), _a("hey")], "tie")
    _battle(store, 4, [_u("hi"), _a("bad")], [_u("hi"), _a("worse")], "tie (bothbad)")
    _battle(store, 5, [_u("secret?"), _a("yes")], [_u("secret?"), _a("no")], "model_a", void="identity leak")
    # multi-turn: each side saw its own first answer; the prompt is the winner's history
    _battle(store, 6, [_u("name a fruit"), _a("apple"), _u("another"), _a("pear")],
            [_u("name a fruit"), _a("kiwi"), _u("another"), _a("kiwi again")], "model_a")
    _battle(store, 7, [_u("same?"), _a("same")], [_u("same?"), _a("same")], "model_a")
    _battle(store, 8, [_u("empty?"), _a("   ")], [_u("empty?"), _a("full")], "model_b")
    _battle(store, 9, [_u("q1"), _a("x")], [_u("q2"), _a("y")], "model_a")
    store.close()

    out = tmp_path / "pairs.jsonl"
    report = export_pairs([str(db)], str(out), report_path=str(tmp_path / "r.json"))
    pairs = read_pairs(out)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("4", "5"), ("Paris", "Lyon"), ("pear", "kiwi again")]
    assert pairs[1]["prompt"] == [SYS, _u("capital of France?")]
    assert pairs[1]["model_chosen"] == "beta" and pairs[1]["model_rejected"] == "alpha"
    assert pairs[2]["prompt"] == [_u("name a fruit"), _a("apple"), _u("another")]
    assert all(p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["role"] == "user" for p in pairs)
    assert report["dropped"] == {"tie": 1, "both_bad": 1, "void_vote": 1, "identical_answers": 1, "empty_answer": 1,
                                 "prompts_differ": 1}
    assert report["written"] == 3 and report["records"] == 9
    assert json.loads((tmp_path / "r.json").read_text())["dropped"] == report["dropped"]


def test_every_file_format_and_bad_records_counted_alone(tmp_path):
    records = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},  # TRL standard
        {"prompt": [_u("Add 1 and 1.")], "chosen": [_a("2")], "rejected": [_a("3")]},  # TRL conversational
        {"prompt": "Color of sky?", "chosen": [_u("Color of sky?"), _a("blue")],  # UltraFeedback-binarized
         "rejected": [_u("Color of sky?"), _a("green")], "score_chosen": 9, "score_rejected": 2},
        {"chosen": [SYS, _u("Dog sound?"), _a("woof")], "rejected": [SYS, _u("Dog sound?"), _a("moo")]},  # implicit
        {"conversations": [{"from": "human", "value": "Cat sound?"}, {"from": "gpt", "value": "meow"},  # ShareGPT
                           {"from": "human", "value": "louder"}],
         "chosen": {"from": "gpt", "value": "MEOW"}, "rejected": {"from": "gpt", "value": "woof"}},
        {"question_id": "q9", "model_a": "m1", "model_b": "m2", "winner": "model_b",  # FastChat arena dump
         "conversation_a": [_u("Tea or coffee?"), _a("neither")], "conversation_b": [_u("Tea or coffee?"), _a("tea")]},
        {"prompt": "dup", "chosen": "same", "rejected": "same"},
        {"prompt": "blank", "chosen": "", "rejected": "x"},
        {"prompt": "no answers"},  # bad: neither format
        {"prompt": "x", "chosen": 5, "rejected": "y"},  # bad: chosen of the wrong type
        ["not", "an", "object"],  # bad
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},  # duplicate of the first
    ]
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    out = tmp_path / "pairs.jsonl"
    report = export_pairs([str(src)], str(out))
    pairs = read_pairs(out)
    got = [(p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert got == [
        ([_u("Say hi.")], "Hi!", "No."),
        ([_u("Add 1 and 1.")], "2", "3"),
        ([_u("Color of sky?")], "blue", "green"),
        ([SYS, _u("Dog sound?")], "woof", "moo"),
        ([_u("Cat sound?"), _a("meow"), _u("louder")], "MEOW", "woof"),
        ([_u("Tea or coffee?")], "tea", "neither"),
    ]
    assert report["dropped"] == {"identical_answers": 1, "empty_answer": 1}
    assert report["duplicates"] == 1
    bad = report["bad_records"][str(src)]
    assert bad["count"] == 4 and bad["reasons"] == {"malformed_record": 4}
    assert [e["line"] for e in bad["examples"]] == [9, 10, 11, 13]


def test_cli_writes_atomically_and_refuses_bad_input(tmp_path):
    src = tmp_path / "prefs.json"
    src.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    out = tmp_path / "pairs.jsonl"
    p = run_cli("data", "pairs", src, "-o", out, check=True)
    assert "wrote 1 pairs from 1 records" in p.stderr and len(read_pairs(out)) == 1
    before = out.read_bytes()
    p = run_cli("data", "pairs", src, "-o", out)  # never overwritten without --force
    assert p.returncode == 2 and "--force" in p.stderr and out.read_bytes() == before
    not_db = tmp_path / "garbage.db"
    not_db.write_bytes(b"not sqlite at all" * 10)
    p = run_cli("data", "pairs", not_db, "-o", tmp_path / "x.jsonl")
    assert p.returncode == 2 and "garbage.db" in p.stderr and not (tmp_path / "x.jsonl").exists()
    p = run_cli("data", "pairs", tmp_path / "missing.jsonl", "-o", tmp_path / "y.jsonl")
    assert p.returncode == 2 and "no such file" in p.stderr
    useless = tmp_path / "useless.jsonl"  # only identical or empty answers: a clear error, no output
    useless.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n"
                       + json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n")
    p = run_cli("data", "pairs", useless, "-o", tmp_path / "z.jsonl")
    assert p.returncode == 2 and "no preference pairs" in p.stderr and "identical_answers 1" in p.stderr
    assert "empty_answer 1" in p.stderr and not (tmp_path / "z.jsonl").exists()
    p = run_cli("data", "pairs", "--help", check=True)
    assert "example:" in p.stdout and "Ties, both-bad votes" in p.stdout
