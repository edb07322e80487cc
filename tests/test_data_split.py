"""`vicuna data split | stats | filter` on real tokenizers and the shared ShareGPT sample."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA, run_cli

from vicuna.conversation import get_template, tokenize_conversation
from vicuna.data.filter import FilterConfig, filter_file
from vicuna.data.sharegpt import to_messages
from vicuna.data.split import split_file
from vicuna.errors import DataError

DUMMY = SHARED_DATA / "sharegpt_sample" / "dummy_conversation.json"
needs_sample = pytest.mark.skipif(not DUMMY.exists(), reason=f"shared data not available at {SHARED_DATA}")
TEMPLATE = get_template("vicuna_v1.1")


def save_tokenizer(tok, path):
    """Saved with TEMPLATE as its chat_template, as a trained model's tokenizer is (split then picks it)."""
    tok.chat_template = TEMPLATE.to_jinja()
    try:
        tok.save_pretrained(path)
    finally:
        tok.chat_template = None
    return path


@pytest.fixture
def tok_dir(tmp_path, any_tokenizer):
    return save_tokenizer(any_tokenizer, tmp_path / "tok")


def n_tokens(tok, sample) -> int:
    return len(tokenize_conversation(tok, TEMPLATE, to_messages(sample["conversations"])).input_ids)


def long_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog hello world python function number".split()
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 9)):
            turns.append({"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(1, 30)))})
            turns.append({"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
        sample = {"id": f"c{i}", "conversations": turns, "model": "gpt4"}
        if i % 5 == 0:
            sample["conversations"] = [{"from": "system", "value": "Be terse."}] + turns
        out.append(sample)
    return out


def test_split_fits_keeps_everything_and_packs_greedily(tmp_path, tok_dir, any_tokenizer):
    tok = any_tokenizer
    samples = long_conversations(40)
    inp, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rep.json"
    inp.write_text("".join(json.dumps(s) + "\n" for s in samples))
    # no single exchange is over the limit here (that case has its own test), but most samples need splitting
    def singles(s):
        sys_ = [t for t in s["conversations"] if t["from"] == "system"]
        body = s["conversations"][len(sys_):]
        return [n_tokens(tok, dict(s, conversations=sys_ + body[i:i + 2])) for i in range(0, len(body), 2)]

    max_len = max(max(singles(s)) for s in samples) + 5
    report = split_file(inp, out, tokenizer_path=str(tok_dir), max_length=max_len, report_path=str(rep))
    chunks = [json.loads(line) for line in out.read_text().splitlines()]
    by_id: dict[str, list] = {}
    for c in chunks:
        base, k = c["id"].rsplit("_", 1)
        by_id.setdefault(base, []).append((int(k), c))
    assert report.samples == 40 and report.chunks == len(chunks) and report.split_samples > 5
    for s in samples:
        parts = by_id[s["id"]]
        assert [k for k, _ in parts] == list(range(len(parts)))  # ids {id}_{k}, in order
        system = [t for t in s["conversations"] if t["from"] == "system"]
        body = []
        for _k, c in parts:
            assert n_tokens(tok, c) <= max_len  # measured independently, as training will see it
            assert c["model"] == "gpt4"
            assert c["conversations"][: len(system)] == system  # every chunk keeps the system message
            body += c["conversations"][len(system):]
        assert system + body == s["conversations"]  # nothing dropped, nothing reordered
        # greedy: the next exchange would not have fit into the previous chunk
        for (_, a), (_, b) in zip(parts, parts[1:]):
            grown = dict(a, conversations=a["conversations"] + b["conversations"][len(system):len(system) + 2])
            assert n_tokens(tok, grown) > max_len
    assert json.loads(rep.read_text())["events"] == {}


def test_last_exchange_is_never_lost(tmp_path, tok_dir, any_tokenizer):
    """FastChat's splitter dropped the final exchange when it was the one that overflowed."""
    a = "word " * 40
    sample = {"id": "s", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": a},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": a},
        {"from": "human", "value": "q3"}, {"from": "gpt", "value": a + " the end"},
    ]}
    two = dict(sample, conversations=sample["conversations"][:4])
    limit = n_tokens(any_tokenizer, two)  # exactly two exchanges fit
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps([sample]))
    split_file(inp, tmp_path / "o.json", tokenizer_path=str(tok_dir), max_length=limit)
    chunks = json.loads((tmp_path / "o.json").read_text())
    assert [c["id"] for c in chunks] == ["s_0", "s_1"]
    assert chunks[1]["conversations"][-1]["value"].endswith("the end")


def test_long_exchange_dropped_or_truncated_and_counted(tmp_path, tok_dir, any_tokenizer):
    big = " ".join(f"w{i}" for i in range(400))
    sample = {"id": "L", "conversations": [
        {"from": "human", "value": "short question"}, {"from": "gpt", "value": "short answer"},
        {"from": "human", "value": "now a long one"}, {"from": "gpt", "value": big},
        {"from": "human", "value": "and after"}, {"from": "gpt", "value": "fine"},
    ]}
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps([sample]))
    r = split_file(inp, tmp_path / "d.json", tokenizer_path=str(tok_dir), max_length=160, report_path=str(tmp_path / "d.r"))
    kept = json.loads((tmp_path / "d.json").read_text())
    values = [t["value"] for c in kept for t in c["conversations"]]
    assert big not in values and "fine" in values and "short answer" in values
    assert r.events == {"long_pair_dropped": 1}
    assert json.loads((tmp_path / "d.r").read_text())["examples"]["long_pair_dropped"] == ["L"]

    r = split_file(inp, tmp_path / "t.json", tokenizer_path=str(tok_dir), max_length=160, long_pair="truncate")
    chunks = json.loads((tmp_path / "t.json").read_text())
    assert r.events == {"long_pair_truncated": 1}
    cut = [c for c in chunks if c["conversations"][-1]["value"] != big and
           big.startswith(c["conversations"][-1]["value"]) and c["conversations"][0]["value"] == "now a long one"]
    assert len(cut) == 1 and len(cut[0]["conversations"][-1]["value"]) > 20
    for c in chunks:
        assert n_tokens(any_tokenizer, c) <= 160


@pytest.mark.slow  # two CLI runs that import transformers
@needs_sample
def test_split_stats_cli_on_shared_sample(tmp_path, bpe_tokenizer):
    tok = save_tokenizer(bpe_tokenizer, tmp_path / "tok")
    out, rep = tmp_path / "split.jsonl", tmp_path / "split_report.json"
    proc = run_cli("data", "split", DUMMY, "-o", out, "--tokenizer", tok, "--max-length", "200", "--report", rep)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["samples"] == 500 and report["chunks"] > 500 and report["events"] == {}
    src = json.loads(DUMMY.read_text())
    chunks = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(len(s["conversations"]) for s in src) == sum(len(c["conversations"]) for c in chunks)

    plot, stats_json = tmp_path / "len.png", tmp_path / "stats.json"
    proc = run_cli("data", "stats", out, "--tokenizer", tok, "--max-length", "200", "--plot", plot, "--json", stats_json)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(stats_json.read_text())
    lengths = sorted(n_tokens(bpe_tokenizer, c) for c in chunks)
    assert stats["samples"] == len(chunks)
    assert stats["tokens_per_sample"]["max"] == lengths[-1] <= 200
    assert stats["longer_than_max_length"] == 0
    assert stats["languages"] == {"en": len(chunks)} and stats["models"] == {"unknown": len(chunks)}
    assert stats["turns_per_sample"]["min"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens per sample" in proc.stdout

    # the template alone must fit, or the error says so
    with pytest.raises(DataError, match="too small"):
        split_file(DUMMY, tmp_path / "x.json", tokenizer_path=str(tok), max_length=20)


LANG_SAMPLES = [
    ("en1", "How do I sort a list in Python?", "Use the sorted function, which returns a new list."),
    ("zh1", "如何在Python中对列表进行排序？我想知道最好的方法。", "你可以使用内置的排序函数，它会返回一个新的列表。"),
    ("de1", "Wie sortiere ich eine Liste in Python? Ich brauche Hilfe.",
     "Verwende die Funktion sorted, sie gibt eine neue Liste zurück."),
    ("fr1", "Comment trier une liste en Python ? Merci de m'aider.",
     "Utilisez la fonction sorted, qui renvoie une nouvelle liste."),
]


def test_filter_language_model_turns_chars_repetition(tmp_path):
    rows = [{"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, q, a in LANG_SAMPLES]
    rows[0]["model"] = "GPT-4"
    rows.append({"id": "rep", "model": "gpt4", "conversations": [
        {"from": "human", "value": "Give me a number please, a big one"}, {"from": "gpt", "value": "It is 1000000000000."}]})
    rows.append({"id": "loop", "conversations": [
        {"from": "human", "value": "Tell me a story about a dog and a cat"},
        {"from": "gpt", "value": "\n".join(["The dog barked at the cat."] * 8)}]})
    rows.append({"id": "multi", "conversations": [
        {"from": "human", "value": "Hi there, what is your favourite colour?"}, {"from": "gpt", "value": "Blue, I think."},
        {"from": "human", "value": "Why that colour exactly?"}, {"from": "gpt", "value": "It reminds me of the sea."}]})
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(rows, ensure_ascii=False))

    def ids(cfg, name):
        filter_file(inp, tmp_path / name, cfg)
        return [r["id"] for r in json.loads((tmp_path / name).read_text())]

    assert ids(FilterConfig(keep_lang=frozenset({"en", "zh"})), "a.json") == ["en1", "zh1", "rep", "loop", "multi"]
    assert ids(FilterConfig(skip_lang=frozenset({"zh", "de"})), "b.json") == ["en1", "fr1", "rep", "loop", "multi"]
    assert ids(FilterConfig(model="gpt4"), "c.json") == ["en1", "rep"]
    assert ids(FilterConfig(min_turns=4), "d.json") == ["multi"]
    assert ids(FilterConfig(max_chars=110), "e.json") == ["en1", "zh1", "rep", "multi"]
    assert ids(FilterConfig(reduce_repetition=True), "f.json") == ["en1", "zh1", "de1", "fr1", "multi"]
    # records are copied unchanged (ids stay as given, fields kept)
    assert json.loads((tmp_path / "c.json").read_text())[0] == rows[0]


@needs_sample
def test_filter_cli_report_counts_the_shared_sample(tmp_path):
    rep = tmp_path / "rep.json"
    proc = run_cli("data", "filter", DUMMY, "-o", tmp_path / "g.jsonl", "--keep-lang", "en", "--min-turns", "4",
                   "--report", rep)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    src = json.loads(DUMMY.read_text())
    expected = sum(len(s["conversations"]) >= 4 for s in src)
    assert report["kept"] == expected == len((tmp_path / "g.jsonl").read_text().splitlines())
    assert report["dropped"] == {"min_turns": 500 - expected}
