"""The one ShareGPT turn rule (`trim_turns`), and that `data split` and training use it as `data clean` does."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vicuna.data.clean import Cleaner
from vicuna.data.sharegpt import GPT, HUMAN, SYSTEM, BadSample, trim_turns
from vicuna.data.split import split_file
from vicuna.train.dataset import record_to_messages

TURNS = st.lists(st.builds(lambda r, i: {"from": r, "value": f"v{i}"}, st.sampled_from([HUMAN, GPT, SYSTEM]),
                           st.integers(0, 9)), max_size=8)


@given(TURNS)
def test_trim_turns_keeps_a_system_turn_and_complete_exchanges_only(turns):
    try:
        system, body, trimmed = trim_turns(turns)
    except BadSample as e:
        assert e.reason == "roles_not_alternating"
        # rejected only when no trimming could make the order right
        rest = turns[1:] if turns and turns[0]["from"] == SYSTEM else turns
        rest = rest[1:] if rest and rest[0]["from"] == GPT else rest
        assert any(t["from"] != (HUMAN, GPT)[i % 2] for i, t in enumerate(rest))
        return
    assert system in ([], turns[:1]) and all(t["from"] == SYSTEM for t in system)
    assert [t["from"] for t in body] == [HUMAN, GPT] * (len(body) // 2)  # alternating, ending on an answer
    start = len(system) + ("leading_gpt_dropped" in trimmed)
    assert turns[start:start + len(body)] == body  # a slice of the sample: nothing reordered or invented
    assert len(turns) == start + len(body) + ("trailing_human_dropped" in trimmed)


STRAY_SYSTEM = {"id": "s", "conversations": [{"from": "gpt", "value": "tail of an earlier answer"},
                                             {"from": "system", "value": "Be terse."},
                                             {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


def test_clean_split_and_training_reject_a_stray_system_turn_alike(tmp_path, bpe_tokenizer):
    """Only `clean` had the guard: `split` crashed (IndexError) and training kept the system turn."""
    assert Cleaner().clean(STRAY_SYSTEM, 1).reason == "roles_not_alternating"
    with pytest.raises(ValueError, match="system turn is only allowed first"):
        record_to_messages(STRAY_SYSTEM)
    tok_dir = tmp_path / "tok"
    bpe_tokenizer.save_pretrained(tok_dir)
    src, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    src.write_text(json.dumps(STRAY_SYSTEM) + "\n")
    split_file(str(src), str(out), tokenizer_path=str(tok_dir), max_length=512, report_path=str(report),
               conv_template="vicuna_v1.1")  # the tokenizer has no chat_template of its own
    assert out.read_text() == "" and json.loads(report.read_text())["bad_records"]["reasons"] == {
        "roles_not_alternating": 1}
