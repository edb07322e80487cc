"""Training data: reading, masks through packing/collation, bin packing, packed loss, accumulation."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vicuna.conversation import IGNORE_INDEX, TEMPLATES, get_template
from vicuna.errors import TrainInputError
from vicuna.train.dataset import (
    DataStats, Sample, collate, load_conversations, pack_best_fit, plan_epoch, record_to_messages, tokenize_dataset,
)
from vicuna.train.trainer import Dist, accumulate_gradients

ANSWERS = [["I am fine, 你好 😀", "Paris."], ["def add(a, b): return a + b"], ["1 2 3", "quick brown fox", "(and)"]]


def sharegpt(answers_per_conv):
    recs = []
    for n, answers in enumerate(answers_per_conv):
        conv = [{"from": "system", "value": "Be nice."}] if n % 2 else []
        for i, a in enumerate(answers):
            conv += [{"from": "human", "value": f"question {n}.{i}?"}, {"from": "gpt", "value": a}]
        recs.append({"id": str(n), "conversations": conv})
    return recs


def target_runs(tokenizer, batch):
    """Decode each run of consecutive trained targets, row by row."""
    runs = []
    for row in batch["targets"].tolist():
        cur = []
        for t in row + [IGNORE_INDEX]:
            if t != IGNORE_INDEX:
                cur.append(t)
            elif cur:
                runs.append(tokenizer.decode(cur, skip_special_tokens=False))
                cur = []
    return runs


# ----------------------------------------------------------------------------- reading


def test_reads_sharegpt_json_and_messages_jsonl(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(sharegpt(ANSWERS)))
    convs = load_conversations(p)
    assert [[m["content"] for m in c if m["role"] == "assistant"] for c in convs] == ANSWERS
    assert convs[1][0] == {"role": "system", "content": "Be nice."}
    q = tmp_path / "b.jsonl"
    q.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": a}]}) for a in "xyz") + "\n\n")
    assert [c[1]["content"] for c in load_conversations(q)] == ["x", "y", "z"]


def test_bad_records_are_skipped_and_counted(tmp_path):
    recs = sharegpt(ANSWERS) + [
        {"id": "no-key"},
        {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                           {"from": "gpt", "value": "c"}]},  # roles do not alternate (as in `data clean`)
        "not an object",
    ]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs))
    stats = DataStats()
    convs = load_conversations(p, stats)
    assert stats.records == 8 and len(convs) == 3 and sum(stats.skipped.values()) == 5
    from vicuna.tiny import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world"] * 5, vocab_size=300)
    samples = tokenize_dataset(convs, tok, get_template("vicuna_v1.1"), 512, stats=stats)
    assert len(samples) == 3 == stats.kept
    assert any("alternate" in r for r in stats.skipped) and "5 skipped" in stats.summary()


def test_sharegpt_quirks_are_normalised():
    # leading assistant turn and trailing user turn carry nothing to learn
    msgs = record_to_messages({"conversations": [
        {"from": "gpt", "value": "hello?"}, {"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"},
        {"from": "human", "value": "unanswered"}]})
    assert msgs == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("content,msg", [
    (None, "no such file"),
    ("", "the file is empty"),
    ("[]", "no records"),
    ('{"a": 1}', "expected a JSON array"),
    ('[{"text": "hi"}]', "wrong format"),
    ('[{"conversations": [{"from": "human", "value": "q"}]}, {"conver', r"no usable conversation .*1 malformed JSON"),
    ('{"conversations": []}\n{"conversations": []}', "use the .jsonl extension"),
    ('[{"conversations": [{"from": "human", "value": "q"}]}]', "no usable conversation"),
])
def test_bad_files_are_clear_errors(tmp_path, content, msg):
    p = tmp_path / "data.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(TrainInputError, match=msg):
        load_conversations(p)


def test_truncate_or_drop_long_samples(bpe_tokenizer):
    sys_ = {"role": "system", "content": "Be brief."}
    convs = [[sys_, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox " * 200}],
             [sys_, {"role": "user", "content": "fox " * 200}, {"role": "assistant", "content": "ok"}],
             [sys_, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    t = get_template("vicuna_v1.1")
    stats = DataStats()
    samples = tokenize_dataset(convs, bpe_tokenizer, t, 64, stats=stats)
    # truncated at the end; the second lost all its answer tokens, so it is skipped
    assert [len(s) for s in samples][0] == 64 and stats.truncated == 2 and len(samples) == 2
    assert stats.skipped["no assistant token left after truncation"] == 1
    stats = DataStats()
    samples = tokenize_dataset(convs, bpe_tokenizer, t, 64, drop_long=True, stats=stats)
    assert len(samples) == 1 and stats.dropped_long == 2 and "2 too long and dropped" in stats.summary()


# ----------------------------------------------------------------------------- masks, through packing


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_packed_targets_are_exactly_assistant_outputs(name, any_tokenizer, tmp_path):
    """Every trained target in a packed batch, decoded, is an assistant answer followed by its end token."""
    tok, t = any_tokenizer, get_template(name)
    p = tmp_path / "d.json"
    p.write_text(json.dumps(sharegpt(ANSWERS)))
    samples = tokenize_dataset(load_conversations(p), tok, t, 1024)
    rows = pack_best_fit([len(s) for s in samples], 1024)
    assert len(rows) == 1  # all three samples share one row
    batch = collate(samples, [rows[0]], tok.pad_token_id)
    end = t.stop_token_strings(tok.eos_token)[-1]
    sep = " " if t.assistant_end == " {eos}" else ""
    expected = [f"{a}{sep}{end}" for j in rows[0] for a in ANSWERS[j]]
    assert [r.strip() for r in target_runs(tok, batch)] == expected
    # targets are the next input token within a sample, never across a sample boundary
    ids, tgt, pos = batch["input_ids"][0], batch["targets"][0], batch["position_ids"][0]
    for k in range(len(ids) - 1):
        if tgt[k] != IGNORE_INDEX:
            assert tgt[k] == ids[k + 1] and pos[k + 1] == pos[k] + 1
    ends = [k for k in range(1, len(pos)) if pos[k] == 0]
    assert all(tgt[k - 1] == IGNORE_INDEX for k in ends)
    assert batch["target_tokens"] == sum(1 for s in samples for x in s.labels[1:] if x != IGNORE_INDEX)


def test_padding_collation_masks_and_counts(bpe_tokenizer):
    s = [Sample([5, 6, 7], [IGNORE_INDEX, 6, 7]), Sample([8, 9], [IGNORE_INDEX, 9])]
    b = collate(s, [[0], [1]], pad_id=3, packed=False)  # padded to the longest row only
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["targets"].tolist() == [[6, 7, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert (b["real_tokens"], b["computed_tokens"], b["target_tokens"]) == (5, 6, 3)
    p = collate(s, [[0, 1]], pad_id=3)
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and "attention_mask" not in p


# ----------------------------------------------------------------------------- bin packing


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=200), st.integers(64, 200))
def test_best_fit_packs_everything_within_capacity(lengths, cap):
    rows = pack_best_fit(lengths, cap)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    # no two rows could be merged: best fit never opens a row while another had room
    loads = sorted(sum(lengths[i] for i in r) for r in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > cap


def test_epoch_plans_are_deterministic_and_cover_the_data():
    samples = [Sample([1] * n, [IGNORE_INDEX] * n) for n in (5, 9, 3, 7, 2, 8, 1, 6)]
    rows = pack_best_fit([len(s) for s in samples], 10)
    for mode in ("packing", "dynamic"):
        a = plan_epoch(samples, mode, 2, epoch=0, seed=1, packed_rows=rows)
        assert a == plan_epoch(samples, mode, 2, epoch=0, seed=1, packed_rows=rows)
        assert a != plan_epoch(samples, mode, 2, epoch=1, seed=1, packed_rows=rows)
        assert sorted(j for mb in a for r in mb for j in r) == list(range(len(samples)))
    # length grouping: dynamic micro-batches hold neighbours in length
    dyn = plan_epoch(samples, "dynamic", 2, epoch=0, seed=1)
    with pytest.raises(ValueError, match="unknown batching mode"):  # the dead max_length mode is gone
        plan_epoch(samples, "max_length", 2, epoch=0, seed=1)
    assert all(abs(len(samples[mb[0][0]]) - len(samples[mb[-1][0]])) <= 2 for mb in dyn)


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def tiny_samples(bpe_tokenizer):
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}"},
              {"role": "assistant", "content": "the quick brown fox " * k}]
             for i, k in enumerate([1, 3, 2, 5, 1, 4, 2, 2, 6, 1, 3, 2, 1, 2, 4, 3])]
    return tokenize_dataset(convs, bpe_tokenizer, get_template("vicuna_v1.1"), 256)


def _model(tok, seed=0):
    from vicuna.tiny import make_tiny_llama

    m = make_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    m.config._attn_implementation = "sdpa"
    return m


def _token_losses(model, batch):
    kw = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    logits = model(**kw, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="none").view(batch["targets"].shape)


def test_packed_loss_equals_per_sample_losses(bpe_tokenizer, tiny_samples):
    """Packing changes nothing: no attention crosses a sample boundary."""
    torch.manual_seed(0)
    model = _model(bpe_tokenizer).eval()
    row = list(range(6))
    pad = bpe_tokenizer.pad_token_id
    with torch.no_grad():
        packed = _token_losses(model, collate(tiny_samples, [row], pad))[0]
        sums, means, n = [], [], []
        off = 0
        for j in row:
            b = collate(tiny_samples, [[j]], pad)
            alone = _token_losses(model, b)[0]
            mine = packed[off:off + len(tiny_samples[j])]
            off += len(tiny_samples[j])
            assert torch.allclose(mine, alone, atol=1e-5)
            sums.append(alone.sum())
            n.append(b["target_tokens"])
            means.append(alone.sum() / b["target_tokens"])
    # the step loss is the token-weighted mean of the samples' losses ...
    packed_loss = packed.sum() / sum(n)
    assert abs(packed_loss - sum(sums) / sum(n)) < 1e-5
    # ... and with equal token counts, exactly the plain average of per-sample losses
    eq = [j for j in range(len(tiny_samples)) if sum(x != IGNORE_INDEX for x in tiny_samples[j].labels) == n[0]]
    if len(eq) >= 2:
        with torch.no_grad():
            pl = _token_losses(model, collate(tiny_samples, [eq], pad)).sum() / (n[0] * len(eq))
            singles = [_token_losses(model, collate(tiny_samples, [[j]], pad)).sum() / n[0] for j in eq]
        assert abs(pl - sum(singles) / len(singles)) < 1e-5
    # and a model that ignored the boundaries would see a different loss
    with torch.no_grad():
        fused = collate(tiny_samples, [row], pad)
        fused["position_ids"] = torch.arange(fused["input_ids"].shape[1])[None]
        assert not torch.allclose(_token_losses(model, fused)[0], packed, atol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_gradient_accumulation_4x2_equals_one_step_of_8(bpe_tokenizer, tiny_samples, packed):
    pad = bpe_tokenizer.pad_token_id
    if packed:
        rows = pack_best_fit([len(s) for s in tiny_samples], 64)[:8]
    else:
        rows = [[j] for j in range(8)]
    assert len(rows) == 8
    d = Dist(device=torch.device("cpu"))
    grads, losses = [], []
    for mbs in ([rows[i:i + 2] for i in range(0, 8, 2)], [rows]):
        model = _model(bpe_tokenizer)
        batches = [collate(tiny_samples, mb, pad, packed=packed) for mb in mbs]
        loss_sum, counts = accumulate_gradients(model, batches, d)
        losses.append(loss_sum.item() / counts[0].item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert grads[0].abs().sum() > 0
