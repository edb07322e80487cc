"""Generation core: stops never leak, UTF-8 safe streaming, sampling settings."""

import pytest
import torch

from vicuna.conversation import encode, render_prompt
from vicuna.generation import (
    logprob_token_bytes, logprob_token_text,
    ContextLengthError, GenerationError, IncrementalDetokenizer, SamplingParams, Sequence, StopStringMatcher,
    fit_max_new_tokens, generate, generate_stream,
)
from vicuna.model import load_model


def test_stop_string_split_across_deltas_never_leaks():
    m = StopStringMatcher(["</end>", "###"])
    emitted = []
    for piece in ["Hello <", "/e", "nd", "> more"]:
        out, hit = m.feed(piece)
        emitted.append(out)
        if hit:
            break
    assert "".join(emitted) == "Hello " and hit
    assert all("<" not in e for e in emitted)


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop():
    m = StopStringMatcher(["###"])
    assert m.feed("a #") == ("a ", False)
    assert m.feed("# b") == ("## b", False)  # "## b" cannot start "###" any more: released
    m = StopStringMatcher(["###"])
    assert m.feed("a ##") == ("a ", False)
    assert m.feed("x") == ("##x", False)
    assert m.flush() == ""


@pytest.mark.parametrize("text", ["你好，世界", "emoji 😀🎉 mixed 漢字", "café naïve 🦙"])
def test_incremental_detokenization_never_emits_half_a_character(any_tokenizer, text):
    tok = any_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas).strip() == text


def byte_tokens(tokenizer, data: bytes) -> list[int]:
    """Ids of the byte-level BPE's single-byte tokens (bytes 0xa1-0xff except 0xad map to the same code point)."""
    assert all(b >= 0xa1 and b != 0xad for b in data)
    ids = tokenizer.convert_tokens_to_ids([chr(b) for b in data])
    assert tokenizer.unk_token_id not in ids
    return ids


def test_invalid_utf8_is_emitted_as_replacement_after_at_most_four_tokens(bpe_tokenizer):
    """A model emitting bytes that never form a character still streams (issue 13 #5)."""
    ids = byte_tokens(bpe_tokenizer, b"\xff" * 10) + bpe_tokenizer.convert_tokens_to_ids(["a"])
    detok = IncrementalDetokenizer(bpe_tokenizer)
    deltas = [detok.push(i) for i in ids]
    for i in range(len(ids) - 4):  # the i-th bad byte is out by the time 3 more tokens have come
        assert "".join(deltas[:i + 4]).count("\ufffd") >= i + 1
    assert deltas[0] == deltas[1] == deltas[2] == ""  # still a possible character: held
    assert "".join(deltas) + detok.flush() == "\ufffd" * 10 + "a"
    assert detok.read - detok.prefix <= IncrementalDetokenizer.MAX_HOLD  # the decoded window stays short


def test_a_character_after_invalid_bytes_still_comes_out_whole(bpe_tokenizer):
    good = "好".encode()  # e5 a5 bd: three byte tokens
    ids = byte_tokens(bpe_tokenizer, b"\xff\xff\xff" + good + b"\xe5\xa5")  # ends in half a character
    detok = IncrementalDetokenizer(bpe_tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "\ufffd\ufffd\ufffd好"  # the trailing half is held (it may still complete)
    assert detok.flush() == "\ufffd"  # at the end it is released as a replacement character


def scripted_run(tokenizer, text, params):
    """Feed the tokens of `text` through a Sequence as if a model produced them."""
    seq = Sequence(tokenizer, [1], params)
    deltas = []
    for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(seq.append(i))
        if seq.finished:
            break
    if not seq.finished:
        deltas.append(seq.finish("abort"))
    return seq, deltas


def test_sequence_stop_string_and_eos(bpe_tokenizer):
    tok = bpe_tokenizer
    seq, deltas = scripted_run(tok, "Hello there ### Human: next", SamplingParams(stop=("###",)))
    assert seq.text == "Hello there " and seq.finish_reason == "stop"
    assert all("#" not in d for d in deltas)
    seq, _ = scripted_run(tok, "Hello</s> never", SamplingParams(stop_token_ids=(tok.eos_token_id,)))
    assert seq.text == "Hello" and seq.finish_reason == "stop"
    seq, _ = scripted_run(tok, "one two three four five six", SamplingParams(max_new_tokens=3))
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3
    seq, _ = scripted_run(tok, "Hello</s> more", SamplingParams(stop_token_ids=(tok.eos_token_id,), ignore_eos=True))
    assert seq.finish_reason == "abort" and "more" in seq.text


def test_chat_answers_drop_the_leading_separator_space(bpe_tokenizer):
    seq, deltas = scripted_run(bpe_tokenizer, "  Hello there", SamplingParams(strip_leading=True))
    assert seq.text == "Hello there" and "".join(deltas) == seq.text
    seq, _ = scripted_run(bpe_tokenizer, "  Hello there", SamplingParams())
    assert seq.text == "  Hello there"


def test_sampling_rules(bpe_tokenizer):
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    seq = Sequence(bpe_tokenizer, [0], SamplingParams(temperature=0))
    assert seq.sample(logits) == 1
    seq = Sequence(bpe_tokenizer, [0], SamplingParams(temperature=0, frequency_penalty=1.0))
    seq.append(1)
    assert seq.sample(logits) == 2  # the repeated token is penalised
    seq = Sequence(bpe_tokenizer, [1], SamplingParams(temperature=0, repetition_penalty=2.0))
    assert seq.sample(logits) == 2  # token 1 is in the prompt
    # top_k=1 behaves like greedy whatever the temperature; top_p tiny likewise
    for params in (SamplingParams(temperature=5, top_k=1, seed=0), SamplingParams(temperature=5, top_p=0.01, seed=0)):
        assert {Sequence(bpe_tokenizer, [0], params.with_(seed=s)).sample(logits) for s in range(20)} == {1}
    draws = {Sequence(bpe_tokenizer, [0], SamplingParams(temperature=5, seed=s)).sample(logits) for s in range(50)}
    assert len(draws) > 2
    seq = Sequence(bpe_tokenizer, [0], SamplingParams(temperature=0, logprobs=2))
    seq.sample(logits)
    assert seq.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert len(seq.logprobs[0].top) == 2


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"top_k": -2}, "top_k"), ({"logprobs": 50}, "top_logprobs"),
])
def test_bad_sampling_params_name_the_param(kwargs, param):
    with pytest.raises(GenerationError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and str(e.value).startswith(f"{param} must be")
    assert f"got {next(iter(kwargs.values()))!r}" in str(e.value)


def test_context_fitting():
    assert fit_max_new_tokens(100, None, 512, default=1000) == 412
    assert fit_max_new_tokens(100, 50, 512) == 50
    with pytest.raises(ContextLengthError, match="maximum context length is 512 tokens.*requested 612 tokens"):
        fit_max_new_tokens(100, 512, 512)
    with pytest.raises(ContextLengthError):
        fit_max_new_tokens(600, None, 512)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_generate_stream_on_a_real_model(lm):
    ids = encode(lm.tokenizer, render_prompt(lm.template, [{"role": "user", "content": "Hello"}], lm.tokenizer))
    greedy = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=tuple(lm.stop_token_ids))
    events = list(generate_stream(lm.model, lm.tokenizer, ids, greedy))
    assert events[-1].finish_reason in ("stop", "length") and events[-1].prompt_tokens == len(ids)
    text = "".join(e.text for e in events)
    assert text == generate(lm.model, lm.tokenizer, ids, greedy)[0]  # deterministic
    # the streamed ids equal transformers' own greedy generate
    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=events[-1].completion_tokens, do_sample=False,
                            eos_token_id=lm.stop_token_ids, pad_token_id=lm.tokenizer.pad_token_id)
    assert lm.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True) == text
    sampled = greedy.with_(temperature=1.0, seed=7)
    assert generate(lm.model, lm.tokenizer, ids, sampled) == generate(lm.model, lm.tokenizer, ids, sampled)
    others = {generate(lm.model, lm.tokenizer, ids, sampled.with_(seed=s))[0] for s in range(4)}
    assert len(others) > 1
    with pytest.raises(ContextLengthError):
        next(generate_stream(lm.model, lm.tokenizer, ids, greedy.with_(max_new_tokens=600), context_length=512))


@pytest.mark.parametrize("kwargs, param", [
    ({"repetition_penalty": 1.585e-39}, "repetition_penalty"), ({"repetition_penalty": 1e6}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": float("inf")}, "top_p"),
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"top_k": 1.5}, "top_k"), ({"max_new_tokens": True}, "max_tokens"),
])
def test_sampling_values_outside_sane_ranges_are_refused(kwargs, param):
    """A repetition penalty of 1.6e-39 turns logits into inf and would poison a whole batch (issue 19)."""
    with pytest.raises(GenerationError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_sampling_params_take_model_defaults_unless_the_request_sets_them():
    from vicuna.generation import ModelDefaults, sampling_params

    shipped = ModelDefaults(stop_token_ids=(2, 7), stop_strs=("###",), temperature=0.0, top_p=0.9, top_k=40,
                            repetition_penalty=1.2)
    p = sampling_params(shipped, max_new_tokens=8)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.9, 40, 1.2)
    assert p.stop_token_ids == (2, 7) and p.stop == ("###",)
    p = sampling_params(shipped, max_new_tokens=8, temperature=0.5, top_p=1.0, top_k=0, repetition_penalty=1.0,
                        stop=["END", "###"])
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.5, 1.0, 0, 1.0)
    assert p.stop == ("END", "###") and p.stop_token_ids == (2, 7)  # a request adds stops, never removes the model's
    assert sampling_params(ModelDefaults(), max_new_tokens=1).temperature == 0.7  # FastChat's default
    with pytest.raises(GenerationError) as e:
        sampling_params(shipped, max_new_tokens=8, repetition_penalty=0.0)
    assert e.value.param == "repetition_penalty"


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_logprob_tokens_that_are_part_of_a_character_are_named_by_their_bytes(request, which):
    """The completions API keys top_logprobs by token text: byte tokens all decoded to "\ufffd" and collided."""
    tok = request.getfixturevalue(which)
    ids = encode(tok, "a 龘 b")  # a character neither tiny vocabulary holds
    names = [logprob_token_text(tok, i) for i in ids]
    partial = [n for n in names if n.startswith("bytes:")]
    assert len(partial) >= 2, names
    assert b"".join(bytes(logprob_token_bytes(n)) for n in names if n.startswith("bytes:")) == "龘".encode()
    assert all("\ufffd" not in n for n in names), names
