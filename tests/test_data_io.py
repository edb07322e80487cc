"""Streaming readers and atomic writers: bad input is reported with its place and skipped."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vicuna.data import DataError
from vicuna.data import io as dio
from vicuna.data.io import RecordError, RecordWriter, atomic_write_records, read_records

GOOD = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def records(path):
    return list(read_records(path))


def test_json_and_jsonl_roundtrip(tmp_path):
    data = [dict(GOOD, id=str(i)) for i in range(5)] + [{"id": "ü", "conversations": [], "x": "日本 😀"}]
    for name in ("a.json", "a.jsonl"):
        path = tmp_path / name
        assert atomic_write_records(path, data) == len(data)
        assert [obj for _, obj in records(path)] == data
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == data  # a real JSON array
    empty = tmp_path / "e.json"
    atomic_write_records(empty, [])
    assert json.loads(empty.read_text()) == [] and records(empty) == []


def test_jsonl_bad_lines_are_reported_and_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n"
        + b'{"id": "broken", \n'
        + b"\n"  # blank lines are not records
        + b'{"id": "latin1", "conversations": [], "v": "caf\xe9"}\n'
        + b"[1, 2]\n"
        + json.dumps(dict(GOOD, id="last")).encode() + b"\n"
    )
    got = records(path)
    assert [n for n, _ in got] == [1, 2, 4, 5, 6]
    assert isinstance(got[1][1], RecordError) and got[1][1].line == 2 and "malformed JSON" in got[1][1].reason
    assert isinstance(got[2][1], RecordError) and "invalid UTF-8" in got[2][1].reason and got[2][1].line == 4
    assert got[3][1] == [1, 2]  # valid JSON, not an object: the caller decides
    assert got[4][1]["id"] == "last"


def test_json_array_recovers_after_a_malformed_record(tmp_path):
    good = [json.dumps(dict(GOOD, id=str(i)), indent=1) for i in range(4)]
    bad = '{"id": "x", "conversations": [{"from": "human" "value": "missing comma"}]}'
    text = "[\n" + ",\n".join(good[:2] + [bad] + good[2:]) + "\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text)
    got = records(path)
    ok = [obj["id"] for _, obj in got if not isinstance(obj, RecordError)]
    errs = [obj for _, obj in got if isinstance(obj, RecordError)]
    assert ok == ["0", "1", "2", "3"]
    assert len(errs) == 1 and errs[0].record == 3
    assert errs[0].line == text[: text.index('"value": "missing')].count("\n") + 1


def test_json_array_invalid_utf8_spoils_only_its_record(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"id": "1", "conversations": []}, {"id": "\xff\xfe", "conversations": []},\n'
                     b'{"id": "3", "conversations": []}]')
    got = records(path)
    assert [n for n, _ in got] == [1, 2, 3]
    assert isinstance(got[1][1], RecordError) and "invalid UTF-8" in got[1][1].reason
    assert got[2][1]["id"] == "3"


def test_json_array_streams_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "CHUNK", 64)  # records much larger than a chunk, numbers split across chunks
    data = [{"id": str(i), "n": 12345678901234567890 + i, "v": "x" * (i * 37)} for i in range(40)] + [3.25, 1e300]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data, indent=2))
    assert [obj for _, obj in records(path)] == data


def test_truncated_and_wrong_top_level(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"id": "1", "conversations": []}, {"id": "2", "conv')
    got = records(path)
    assert got[0][1]["id"] == "1" and isinstance(got[1][1], RecordError)
    path.write_text('{"id": "1"}\n{"id": "2"}\n')
    with pytest.raises(DataError, match="use the .jsonl extension"):
        records(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        records(path)
    with pytest.raises(DataError, match="unknown extension"):
        records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="cannot read"):
        records(tmp_path / "missing.json")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_readers_never_crash_on_arbitrary_bytes(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("fuzz")
    for name, prefix in (("f.jsonl", b""), ("f.json", b"[")):
        path = d / name
        path.write_bytes(prefix + blob)
        try:
            for n, obj in read_records(path):
                assert isinstance(n, int)
        except DataError:
            pass  # a file-level problem (e.g. not an array) is a clean error too


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("precious\n")
    with pytest.raises(DataError, match="--force"):
        RecordWriter(out)
    with pytest.raises(RuntimeError):
        with RecordWriter(out, force=True) as w:
            w.write(GOOD)
            raise RuntimeError("crash mid-way")
    assert out.read_text() == "precious\n"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # no temp file left behind
    with RecordWriter(out, force=True) as w:
        w.write(GOOD)
        w.write({"bad": "\ud800 lone surrogate"})  # still valid JSON (escaped), not a crash
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == GOOD and json.loads(lines[1]) == {"bad": "\ud800 lone surrogate"}
    with pytest.raises(DataError, match="also given as an input"):
        RecordWriter(out, force=True, inputs=[out])
    with pytest.raises(DataError, match="does not exist"):
        RecordWriter(tmp_path / "nope" / "x.json")
    assert oct(os.stat(out).st_mode & 0o777) != "0o600"  # normal permissions, not mkstemp's


def test_json_array_reader_memory_is_bounded(tmp_path, monkeypatch):
    """The reader holds about one chunk plus one record, never the file."""
    monkeypatch.setattr(dio, "CHUNK", 4096)
    path = tmp_path / "big.json"
    atomic_write_records(path, ({"id": str(i), "conversations": [], "pad": "y" * 300} for i in range(3000)))
    size = path.stat().st_size
    with open(path, "rb") as f:
        reader = dio._ArrayReader(f, str(path))
        peak, n = 0, 0
        for _, obj in reader:
            n += 1
            peak = max(peak, len(reader.buf))
    assert n == 3000 and size > 1_000_000
    assert peak < 4 * 4096, peak
