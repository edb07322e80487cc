"""Speculative decoding by prompt lookup (``--speculative ngram``): greedy outputs must equal plain decoding.

float32 throughout: the precision in which the engine promises batch-invariant greedy output."""

from __future__ import annotations

import asyncio

import pytest
from conftest import chat_ids, wait_idle

from vicuna.generation import SamplingParams, generate
from vicuna.serve.engine import EngineConfig, HFEngine
from vicuna.serve.engine.hf import ngram_draft




async def collect(engine, ids, params):
    return "".join([d.text async for d in engine.stream(ids, params)])


def run(loaded, prompts, settings, **config):
    engine = HFEngine(loaded, EngineConfig(kv_cache_memory="64MiB", **config)).start()
    try:
        async def run_all():
            return await asyncio.gather(*(collect(engine, ids, p) for ids, p in zip(prompts, settings)))

        got = asyncio.run(run_all())
        s = wait_idle(engine)
    finally:
        engine.stop()
    assert s.kv_blocks_free == s.kv_blocks  # rolled-back and extra blocks all given back
    return got, s


def test_ngram_draft_takes_what_followed_the_latest_earlier_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3, 1) == [7, 1]
    assert ngram_draft([5, 6, 7, 5], 3, 3, 1) == [6, 7, 5]  # falls back to n=1
    assert ngram_draft([1, 2, 3, 4], 4, 3, 1) == []
    assert ngram_draft([1, 2, 1], 4, 3, 2) == []  # no bigram recurs, and n=1 is below the minimum


def test_mixed_batch_equals_plain_decoding(loaded):
    """Greedy rows speculate, sampled and stop-string rows share the batch; every stream is what plain
    decoding gives, at a block size small enough that drafts cross block boundaries."""
    prompts = [chat_ids(loaded, t) for t in ("a b a b a b a b", "word " * 5, "one two one two", "x y z x y z")]
    plain_text = generate(loaded.model, loaded.tokenizer, prompts[2],
                          SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0]
    stop = plain_text[len(plain_text) // 2:len(plain_text) // 2 + 3].strip() or plain_text[-3:]
    settings = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True),
                SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=30, ignore_eos=True),
                SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=(stop,)),
                SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)]
    plain, s0 = run(loaded, prompts, settings, block_size=4)
    spec, s = run(loaded, prompts, settings, block_size=4, speculative="ngram", num_speculative_tokens=4)
    assert spec == plain
    assert s0.spec_draft_tokens == 0 and s.spec_draft_tokens > 0
    assert 0 <= s.spec_accepted_tokens <= s.spec_draft_tokens


def test_real_model_repeats_with_accepted_drafts_and_same_output(real_model):
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = chat_ids(real_model, f"Repeat this text exactly: {text}")
    settings = [SamplingParams(temperature=0, max_new_tokens=24)]
    plain, s0 = run(real_model, [ids], settings)
    spec, s = run(real_model, [ids], settings, speculative="ngram")
    assert spec == plain
    assert s.spec_accepted_tokens > 0, s
    assert s.decode_steps < s0.decode_steps


def test_metrics_count_drafts_and_bad_flags_are_named(loaded):
    import re

    import httpx
    import openai

    from vicuna.errors import UsageError
    from vicuna.serve.launch import ModelConfig, load_engine
    from vicuna.serve.model_client import LocalClient
    from vicuna.serve.openai_api import create_app
    from vicuna.serve.server import ServerThread

    engine = HFEngine(loaded, EngineConfig(kv_cache_memory="64MiB", speculative="ngram")).start()
    try:
        with ServerThread(create_app(LocalClient({"tiny": engine}))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b a b a b"}],
                                           max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
            text = httpx.get(url + "/metrics").text
        s = wait_idle(engine)
    finally:
        engine.stop()
    got = {name: float(v) for name, v in re.findall(
        r'^(vicuna_spec_decode_num_(?:draft|accepted)_tokens_total)\{model="tiny"\} (\S+)$', text, re.M)}
    assert got == {"vicuna_spec_decode_num_draft_tokens_total": s.spec_draft_tokens,
                   "vicuna_spec_decode_num_accepted_tokens_total": s.spec_accepted_tokens}, text
    assert s.spec_draft_tokens > 0

    for bad, says in ((dict(num_speculative_tokens=0), "must be >= 1"),
                      (dict(prompt_lookup_min=4, prompt_lookup_max=2), "above --prompt-lookup-max"),
                      (dict(speculative="eagle"), "use ngram")):
        with pytest.raises(UsageError, match=says):
            EngineConfig(speculative=bad.pop("speculative", "ngram"), **bad)
    with pytest.raises(UsageError, match="for the hf backend"):
        load_engine(ModelConfig(model_path="unused.gguf", backend="llamacpp"), EngineConfig(speculative="ngram"))
