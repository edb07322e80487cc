"""Hostile input files (issue 19's probe, the file part): every one is a clear error or a counted skip.

Each file is built here and fed to `vicuna data stats` and `vicuna data merge` (in-process, as
the CLI runs them), to training's reader and to the evaluation's. Asserted: the exit code the
docs promise (0 done, 2 bad input), the message, the counts, and that no output — complete,
partial or temporary — is left behind by a command that failed.
"""

from __future__ import annotations

import codecs
import json
import signal

import pytest

from vicuna.cli import main
from vicuna.errors import EvalUsageError, TrainInputError
from vicuna.eval.records import read_records as eval_records
from vicuna.train.dataset import DataStats, load_conversations

GOOD = [{"id": f"g{i}", "conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"ho {i}"}]}
        for i in range(3)]
ARRAY = json.dumps(GOOD).encode()
LINES = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD)
HUGE = {"id": "huge", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x" * 5_000_000}]}
DEEP = b"[" * 100_000 + b"]" * 100_000
PRETTY = json.dumps(GOOD[0], indent=2).encode()


def ok(good: int, bad: int):
    return ("ok", good, bad)


def error(message: str):
    return ("error", 2, message)


CORPUS = {
    # JSON arrays
    "empty.json": (b"", error("the file is empty")),
    "blank.json": (b" \n\t ", error("expected a JSON array")),
    "bom.json": (codecs.BOM_UTF8 + ARRAY, ok(3, 0)),
    "utf16.json": (json.dumps(GOOD).encode("utf-16"), error("expected a JSON array")),
    "object.json": (json.dumps(GOOD[0]).encode(), error("use the .jsonl extension")),
    "number.json": (b"42", error("expected a JSON array")),
    "open.json": (b"[", ok(0, 1)),
    "truncated.json": (ARRAY[:-30], ok(2, 1)),
    "nul_in_string.json": (ARRAY.replace(b"hi 1", b"hi\x001"), ok(2, 1)),
    "nul_padding.json": (ARRAY + b"\x00" * 4096, ok(3, 0)),
    "two_arrays.json": (json.dumps(GOOD[:1]).encode() + json.dumps(GOOD[1:]).encode(),
                        error("more records after the closing ']'")),
    "wrong_types.json": (json.dumps([GOOD[0], "a string", 7, None, [1, 2], {"id": 1.5, "conversations": "x"},
                                     {"conversations": [{"from": "alien", "value": "x"}]},
                                     {"conversations": [{"from": "human", "value": 3}]},
                                     {"id": {"a": 1}, "conversations": []}]).encode(), ok(1, 8)),
    "deep.json": (b"[" + json.dumps(GOOD[0]).encode() + b"," + DEEP + b"," + json.dumps(GOOD[1]).encode() + b"]",
                  ok(2, 1)),
    "huge.json": (json.dumps([HUGE]).encode(), ok(1, 0)),
    "bad_utf8.json": (ARRAY.replace(b"ho 2", b"ho \xff\xfe2"), ok(2, 1)),
    "lone_surrogate.json": (ARRAY.replace(b"ho 2", b"ho \\ud8002"), ok(3, 0)),
    "trailing_comma.json": (ARRAY[:-1] + b",]", ok(3, 0)),
    "missing_comma.json": (ARRAY.replace(b"}]}, {", b"}]}\n{", 1), ok(3, 0)),
    "bad_first_turn.json": (json.dumps(GOOD, indent=2).encode().replace(b"hi 0", b"hi\x010"), ok(2, 1)),
    # JSON lines
    "bom.jsonl": (codecs.BOM_UTF8 + LINES, ok(3, 0)),
    "crlf.jsonl": (LINES.replace(b"\n", b"\r\n"), ok(3, 0)),
    "blank_lines.jsonl": (LINES.replace(b"\n", b"\n\n  \n"), ok(3, 0)),
    "nul_line.jsonl": (LINES.replace(b"\n", b"\n\x00\x00\n", 1), ok(3, 1)),
    "torn.jsonl": (LINES[:-20], ok(2, 1)),
    "array.jsonl": (ARRAY + b"\n", ok(0, 1)),
    "pretty.jsonl": (PRETTY + b"\n", ok(0, sum(1 for ln in PRETTY.splitlines() if ln.strip()))),
    "huge_line.jsonl": (json.dumps(HUGE).encode() + b"\n", ok(1, 0)),
    "bad_utf8.jsonl": (LINES.replace(b"ho 1", b"ho \xc3\x281"), ok(2, 1)),
    # not a records file at all
    "data.csv": (b"id,text\n1,hi\n", error("unknown extension")),
}


@pytest.fixture(autouse=True)
def keep_sigterm():
    """`main` makes SIGTERM raise (to clean up); give pytest its own handler back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_file(tmp_path, capsys, name):
    content, (kind, *expect) = CORPUS[name]
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()

    stats_code, stats_err = run(capsys, "data", "stats", src, "--no-lang", "--json", out / "stats.json")
    merge_code, merge_err = run(capsys, "data", "merge", src, "-o", out / "merged.jsonl")
    if kind == "error":
        code, message = expect
        for got, err in ((stats_code, stats_err), (merge_code, merge_err)):
            assert got == code and message in err and "Traceback" not in err, err
        assert files_in(out) == []  # nothing written, not even half
        with pytest.raises(TrainInputError, match=message):
            load_conversations(src, DataStats())
        with pytest.raises(EvalUsageError, match=message):
            eval_records(src)
        return

    good, bad = expect
    assert (stats_code, merge_code) == (0, 0), stats_err + merge_err
    assert files_in(out) == ["merged.jsonl", "stats.json"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["samples"], stats["bad_records"]) == (good, bad)
    assert len((out / "merged.jsonl").read_text(encoding="utf-8").splitlines()) == good
    if good:
        assert len(load_conversations(src, DataStats())) == good
    else:
        with pytest.raises(TrainInputError, match="no usable conversation|wrong format"):
            load_conversations(src, DataStats())
    if bad:
        with pytest.raises(EvalUsageError, match=f"{name}: record"):
            eval_records(src)
    else:
        assert len(eval_records(src)) == good


def test_hostile_paths(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_bytes(ARRAY)
    (tmp_path / "dir.json").mkdir()
    taken = tmp_path / "taken.jsonl"
    taken.write_text("precious\n")
    cases = [
        (["data", "merge", tmp_path / "missing.json", "-o", tmp_path / "a.jsonl"], "no such file"),
        (["data", "merge", tmp_path / "dir.json", "-o", tmp_path / "a.jsonl"], "no such file"),
        (["data", "merge", src, "-o", tmp_path / "nowhere" / "a.jsonl"], "does not exist"),
        (["data", "merge", src, "-o", src, "--force"], "also given as an input"),
        (["data", "merge", src, "-o", taken], "pass --force"),
        (["data", "merge", src, "-o", tmp_path / "dir.json", "--force"], "is a directory"),
        (["data", "merge", src, "-o", tmp_path / "a.txt"], "unknown extension"),
    ]
    for argv, message in cases:
        code, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert files_in(tmp_path) == ["dir.json", "in.json", "taken.jsonl"] and taken.read_text() == "precious\n"
