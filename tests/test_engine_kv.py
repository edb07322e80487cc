"""The HF engine's paged KV cache, its scheduler and its fault isolation, on a tiny random LLaMA.

Outputs are compared with plain one-request generation (`vicuna.generation.generate`), so every test
here fails if batching, paging or preemption changes what a request gets.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import chat_ids, wait_idle

from vicuna.conversation import encode, render_prompt
from vicuna.generation import SamplingParams, generate, sampling_params
from vicuna.model import load_model
from vicuna.serve.model_client import LocalClient
from vicuna.errors import InvalidRequest, ServeError
from vicuna.serve.engine import EngineConfig, HFEngine
from vicuna.errors import UsageError
from vicuna.serve.engine.kv import KVCacheError, KVPlan, KVShape, gpu_budget
from vicuna.serve.engine.scheduler import BlockPool
from vicuna.sizes import parse_size
from vicuna.serve.openai_api import create_app
from vicuna.serve.server import ServerThread




def alone(loaded, ids, n, **sampling):
    params = SamplingParams(**{"temperature": 0, **sampling}, max_new_tokens=n, ignore_eos=True)
    return generate(loaded.model, loaded.tokenizer, ids, params)[0]


def budget_for(loaded, tokens):
    """A --kv-cache-memory that holds ``tokens`` tokens (plus the reserved block) at block size 16."""
    shape = KVShape.of(loaded.model.config, next(loaded.model.parameters()).dtype)
    return str((tokens + 16) * shape.bytes_per_token)


async def collect(engine, ids, params):
    return "".join([d.text async for d in engine.stream(ids, params)])


# ---------------------------------------------------------------------- sizing


def test_parse_size_and_errors():
    # one rule for the whole project, Hugging Face's and accelerate's: KiB/MiB/GiB are powers of 1024,
    # K/M/G (with or without B) powers of 1000
    assert parse_size("4GiB") == parse_size("4 gib") == 4 * 1024 ** 3
    assert parse_size("4G") == parse_size("4gb") == parse_size("4GB") == 4 * 10 ** 9
    assert parse_size("512MiB") == 512 * 1024 ** 2 and parse_size("512MB") == 512 * 10 ** 6
    assert parse_size("1.5K") == 1500 and parse_size("1.5KiB") == 1536 and parse_size("1000") == 1000
    for bad in ("lots", "4 parsecs", "", "-1G", "0", "4GiBB"):
        with pytest.raises(UsageError, match="memory size"):
            parse_size(bad)
    with pytest.raises(KVCacheError, match="raise --kv-cache-memory"):
        KVPlan.for_budget(KVShape(30, 3, 64, 4), 1000)


def test_serve_refuses_an_unreadable_or_too_small_budget_with_exit_2(tiny_model_dir):
    from conftest import run_cli

    for size, says in (("lots", "cannot read 'lots' as a memory size"), ("1KiB", "raise --kv-cache-memory")):
        out = run_cli("serve", "--model-path", str(tiny_model_dir), "--kv-cache-memory", size, "--port", "0")
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_block_allocator_all_or_nothing_and_reuses_freed_blocks_first():
    a = BlockPool(5, caching=False)
    first = a.allocate(3)
    assert sorted(first) == [1, 2, 3] and a.num_free == 2  # block 0 is never handed out
    assert a.allocate(3) is None and a.num_free == 2  # nothing taken when it does not fit
    a.free(first)
    assert a.allocate(3) == first  # the blocks just freed (already touched memory) come back first
    assert a.allocate(2) == [4, 5] and a.allocate(1) is None


def test_vicuna_7b_on_a_24_gb_gpu_is_served_with_the_default_budget():
    """Meta device: no memory is used; the shapes, the budget and the engine's limits are real."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vicuna.model import LoadedModel

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = 24 * 1024 ** 3
    free = total - weights - 600 * 1024 ** 2  # the weights and the CUDA context are already there
    budget = gpu_budget(free, total)
    shape = KVShape.of(config, torch.float16)
    assert shape.bytes_per_token == 512 * 1024  # 32 layers x 2 x 4096 x 2 bytes
    plan = KVPlan.for_budget(shape, budget)
    # 12.6 GiB of weights leave ~8.5 GiB of cache: ~17k tokens, i.e. 4 full 4096-token conversations or
    # 33 of 512 tokens at once (docs/serving.md's table comes from the same functions)
    assert 16_500 <= plan.tokens <= 18_000, plan.tokens
    assert plan.sequences(4096) == 4 and plan.sequences(512) == 33

    loaded = LoadedModel(model=model, tokenizer=None, template=None, name="vicuna-7b", path="-", device="meta",
                         context_length=4096)
    engine = HFEngine(loaded, EngineConfig(kv_cache_memory=str(budget)))  # pools on meta: shapes only
    assert engine.max_model_len == 4096  # a full-context request fits the budget
    assert engine.kv_plan.num_blocks == plan.num_blocks
    assert engine._kv.k[0].shape == ((plan.num_blocks + 1) * 16, 32, 128)


def test_a_request_beyond_the_budget_is_a_clear_400_and_the_server_goes_on(loaded):
    engine = HFEngine(loaded, EngineConfig(kv_cache_memory=budget_for(loaded, 96))).start()
    assert engine.max_model_len == 96 < loaded.context_length  # the budget, not the model, limits requests
    try:
        with ServerThread(create_app(LocalClient({"tiny": engine}))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            msgs = [{"role": "user", "content": "hello"}]
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=msgs, max_tokens=90)
            assert e.value.code == "context_length_exceeded" and "96" in e.value.message
            r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5,
                                               extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 5
    finally:
        engine.stop()


# ---------------------------------------------------------------------- blocks come back


def test_blocks_are_freed_on_finish_abort_and_disconnect(loaded):
    engine = HFEngine(loaded, EngineConfig(block_size=4, kv_cache_memory=budget_for(loaded, 2048))).start()
    total = engine.stats().kv_blocks
    ids = chat_ids(loaded, "tell me a story")
    try:
        async def finish_and_abort():
            done = await collect(engine, ids, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
            stream = engine.stream(ids, SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True))
            used_while_running = None
            async for i, _ in _enumerate(stream):
                if i == 5:
                    used_while_running = total - engine.stats().kv_blocks_free
                    break
            await stream.aclose()  # the consumer goes away: the engine aborts the request
            return done, used_while_running

        done, used = asyncio.run(finish_and_abort())
        assert done == alone(loaded, ids, 30)
        assert used >= (len(ids) + 5) // 4  # the running request held its blocks...
        s = wait_idle(engine)
        assert s.kv_blocks_free == total and s.requests_aborted == 1  # ...and all came back

        with ServerThread(create_app(LocalClient({"tiny": engine}))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=400, stream=True, extra_body={"ignore_eos": True})
            for i, _ in enumerate(stream):
                if i == 4:
                    break
            assert engine.stats().kv_blocks_free < total
            stream.close()  # the HTTP client disconnects mid-stream
            s = wait_idle(engine)
            assert s.kv_blocks_free == total and s.requests_aborted == 2
    finally:
        engine.stop()


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


# ---------------------------------------------------------------------- preemption


def test_preempted_requests_resume_and_equal_running_alone(loaded):
    """Six requests want ~6 x 90 tokens of cache; it holds 256. Rows are preempted when blocks run out,
    recomputed when readmitted, and every stream, greedy or seeded, is exactly what it is alone."""
    engine = HFEngine(loaded, EngineConfig(block_size=8, kv_cache_memory=budget_for(loaded, 256))).start()
    prompts = [chat_ids(loaded, "word " * (1 + 2 * i)) for i in range(6)]
    settings = [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)] * 3
    try:
        async def run_all():
            return await asyncio.gather(*(
                collect(engine, ids, SamplingParams(**s, max_new_tokens=70, ignore_eos=True))
                for ids, s in zip(prompts, settings)))

        got = asyncio.run(run_all())
        s = wait_idle(engine)
    finally:
        engine.stop()
    assert s.preemptions >= 1, s
    assert s.kv_blocks_free == s.kv_blocks
    for ids, kw, text in zip(prompts, settings, got):
        assert text == alone(loaded, ids, 70, **kw)


def test_waiting_requests_start_as_blocks_free_up(loaded):
    """A budget for about two requests at a time: the others wait for blocks, none is refused or hangs."""
    engine = HFEngine(loaded, EngineConfig(block_size=16, kv_cache_memory=budget_for(loaded, 160))).start()
    prompts = [chat_ids(loaded, f"question {i}") for i in range(5)]
    try:
        async def run_all():
            return await asyncio.gather(*(
                collect(engine, ids, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
                for ids in prompts))

        got = asyncio.run(run_all())
    finally:
        engine.stop()
    assert got == [alone(loaded, ids, 40) for ids in prompts]


# ---------------------------------------------------------------------- batched prefill


@pytest.mark.parametrize("budget", [2048, None])
def test_prompts_arriving_together_are_prefilled_together_within_the_budget(loaded, budget):
    """Six prompts queued at once: one forward under a 2048-token prefill budget; under the CPU default (256
    tokens, padding included) as many forwards as the budget needs, each newcomer's first token sooner."""
    # no prefix cache: the prompts share a prefix, and the groups below are counted on whole prompts
    engine = HFEngine(loaded, EngineConfig(max_prefill_tokens=budget, prefix_caching=False)).start()
    prompts = [chat_ids(loaded, "hello " * (1 + 3 * i)) for i in range(6)]
    try:
        async def run_all():
            # queued before the engine thread wakes up: all six are admitted in the same iteration
            with engine._cv:
                streams = [engine.stream(ids, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
                           for ids in prompts]
                firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
                await asyncio.sleep(0.05)
            out = []
            for s, f in zip(streams, firsts):
                first = await f
                out.append(first.text + "".join([d.text async for d in s]))
            return out

        before = engine.stats().prefill_forwards
        got = asyncio.run(run_all())
        forwards = engine.stats().prefill_forwards - before
    finally:
        engine.stop()
    assert got == [alone(loaded, ids, 12) for ids in prompts]
    if budget == 2048:
        assert forwards == 1
    else:  # in arrival order, each group's width x rows within 256 tokens
        groups, rows, width = 1, 0, 0
        for ids in prompts:
            if rows and max(width, len(ids)) * (rows + 1) > 256:
                groups, rows, width = groups + 1, 0, 0
            rows, width = rows + 1, max(width, len(ids))
        assert forwards == groups > 1


# ---------------------------------------------------------------------- prefix cache


def test_prefix_cache_outputs_equal_running_alone_through_preemption_and_eviction(loaded):
    """Six requests sharing a long system text, twice over, in a cache that holds about three: rows are
    preempted and readmitted from their cached blocks, cached prefixes are evicted under pressure, later
    rounds hit the cache, and every stream is exactly what it is alone with no cache at all."""
    engine = HFEngine(loaded, EngineConfig(block_size=8, kv_cache_memory=budget_for(loaded, 320))).start()
    system = "you are a careful assistant " * 6
    prompts = [chat_ids(loaded, system + "word " * (1 + 2 * i)) for i in range(6)]
    settings = [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)] * 3
    try:
        async def run_all():
            return await asyncio.gather(*(
                collect(engine, ids, SamplingParams(**s, max_new_tokens=60, ignore_eos=True))
                for ids, s in zip(prompts, settings)))

        rounds = [asyncio.run(run_all()) for _ in range(2)]
        s = wait_idle(engine)
    finally:
        engine.stop()
    assert s.preemptions >= 1 and s.prefix_cache_evictions >= 1, s
    assert s.prefix_cache_hits >= 5 * len(prompts[0]) // 2, s  # most of every prompt after the first came cached
    assert s.kv_blocks_free == s.kv_blocks  # cached blocks are free blocks: nothing leaked
    for got in rounds:
        for ids, kw, text in zip(prompts, settings, got):
            assert text == alone(loaded, ids, 60, **kw)


def test_a_prefill_after_a_cached_prefix_gives_the_scores_of_a_full_prefill(loaded):
    """The runner alone, scores compared (the tiny model's greedy text is a weak witness): rows that start
    after cached blocks, beside a row with nothing cached, score as a full prefill of their context does."""
    import torch

    from vicuna.serve.engine.scheduler import Request

    engine = HFEngine(loaded, EngineConfig(block_size=4, kv_cache_memory=budget_for(loaded, 2048)))
    sched, runner = engine.scheduler, engine.runner
    shared = chat_ids(loaded, "a shared beginning " * 4)

    def admit(ids, caching=True):
        r = Request(ids, type("Seq", (), {"output_ids": []})(), cache_prefix=caching)
        sched.waiting.append(r)
        group, _ = sched.admit()
        assert group == [r]
        return r

    with torch.inference_mode():
        first = admit(shared)
        runner.prefill([first])
        first.length = len(shared)
        sched.running_added([first])
        rows = [admit(shared + chat_ids(loaded, "then this")), admit(shared[:-3] + [5, 6, 7, 8, 9]),
                admit(chat_ids(loaded, "unrelated"), caching=False)]
        assert [r.cached > 0 for r in rows] == [True, True, False]
        cached = runner.prefill(rows)
        for r, got in zip(rows, cached):
            full = admit(r.prompt_ids, caching=False)
            assert full.cached == 0
            torch.testing.assert_close(runner.prefill([full])[0], got, rtol=0, atol=1e-5)


def test_prefix_cache_off_and_on_give_the_same_chat_turns_and_metrics_count_hits(loaded):
    """A three-turn chat through the API with the cache on and off: the same answers; on, the later turns'
    history comes from the cache, and /metrics says how much."""
    answers, hits = {}, {}
    for caching in (True, False):
        engine = HFEngine(loaded, EngineConfig(prefix_caching=caching, kv_cache_memory="64MiB")).start()
        try:
            with ServerThread(create_app(LocalClient({"tiny": engine}))) as url:
                client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                msgs, got = [{"role": "system", "content": "be brief " * 20}], []
                for turn in ("hello there", "and then?", "one more"):
                    msgs.append({"role": "user", "content": turn})
                    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                       extra_body={"ignore_eos": True})
                    got.append(r.choices[0].message.content)
                    msgs.append({"role": "assistant", "content": got[-1]})
                metrics = httpx.get(url + "/metrics").text
        finally:
            engine.stop()
        answers[caching] = got
        line = next(x for x in metrics.splitlines() if x.startswith('vicuna_prefix_cache_hits_total{model="tiny"}'))
        hits[caching] = float(line.split()[-1])
        assert 'vicuna_prefix_cache_queries_total{model="tiny"}' in metrics
    assert answers[True] == answers[False]
    assert hits[True] >= 32 and hits[False] == 0  # the system text and earlier turns, in whole blocks


# ---------------------------------------------------------------------- one bad row


def test_a_row_whose_sampling_breaks_fails_alone(loaded):
    """issue 19 #1: a repetition_penalty that overflows the scores to inf/NaN must not abort the batch."""
    engine = HFEngine(loaded, EngineConfig()).start()
    good = chat_ids(loaded, "a long greedy answer please")
    bad_params = SamplingParams(temperature=1, seed=1, max_new_tokens=50)
    # past any validation (the engine must survive it by itself); 1.585e-39 overflows SmolLM2's scores, the
    # tiny model's are smaller: divided by 1e-45 any positive score is inf
    bad_params.repetition_penalty = 1e-45
    try:
        async def run_both():
            async def bad():
                await asyncio.sleep(0.05)  # the greedy stream is running by then
                try:
                    await collect(engine, chat_ids(loaded, "break it"), bad_params)
                except ServeError as e:
                    return e
                return None

            return await asyncio.gather(
                collect(engine, good, SamplingParams(temperature=0, max_new_tokens=80, ignore_eos=True)), bad())

        text, err = asyncio.run(run_both())
        s = wait_idle(engine)
    finally:
        engine.stop()
    assert isinstance(err, InvalidRequest) and err.status == 400, err
    assert err.param == "repetition_penalty" and "repetition_penalty" in err.message
    assert err.to_dict()["error"]["type"] == "invalid_request_error"
    assert text == alone(loaded, good, 80)  # the other stream got exactly what it gets alone
    assert s.kv_blocks_free == s.kv_blocks


def test_non_finite_model_scores_fail_only_that_row(loaded, monkeypatch):
    engine = HFEngine(loaded, EngineConfig()).start()
    good, poisoned = chat_ids(loaded, "fine"), chat_ids(loaded, "poison")
    forward = engine.runner._forward

    def poison_rows(ids, positions, mask, **kw):  # the model "overflows" for one row only
        logits = forward(ids, positions, mask, **kw)
        for i in range(ids.shape[0]):
            if ids[i, -1] == poisoned[-1] and positions[i, -1] == len(poisoned) - 1:
                logits[i, 3] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "_forward", poison_rows)
    try:
        async def run_both():
            async def bad():
                try:
                    await collect(engine, poisoned, SamplingParams(temperature=0, max_new_tokens=5))
                except ServeError as e:
                    return e

            return await asyncio.gather(
                collect(engine, good, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)), bad())

        text, err = asyncio.run(run_both())
    finally:
        engine.stop()
    assert err is not None and err.status == 500 and "non-finite" in err.message
    assert text == alone(loaded, good, 40)


# ---------------------------------------------------------------------- embeddings


def test_embeddings_run_in_chunks_while_a_stream_keeps_decoding(loaded):
    """issue 19 #3: 1,000 inputs must not stall the engine; decode steps run between embedding chunks."""
    engine = HFEngine(loaded, EngineConfig(max_embedding_inputs=1000, embedding_chunk_tokens=64)).start()
    texts = [f"input number {i}" for i in range(1000)]
    ids = chat_ids(loaded, "keep talking")
    try:
        async def run():
            stream = asyncio.ensure_future(collect(
                engine, ids, SamplingParams(temperature=0, max_new_tokens=150, ignore_eos=True)))
            while engine.stats().generated_tokens == 0:
                await asyncio.sleep(0.01)
            before = engine.stats().generated_tokens
            vectors, tokens = await engine.embed(texts)
            during = engine.stats().generated_tokens - before
            return vectors, tokens, during, await stream

        vectors, tokens, during, text = asyncio.run(run())
        single, _ = asyncio.run(engine.embed(texts[500:501]))
    finally:
        engine.stop()
    assert len(vectors) == 1000 and vectors[500] == pytest.approx(single[0], abs=1e-6)
    assert tokens == sum(len(loaded.tokenizer(t)["input_ids"]) for t in texts)
    assert during >= 20, during  # ~1000 x 4 tokens in chunks of 64: the stream decoded all along
    assert text == alone(loaded, ids, 150)


def test_embedding_caps_are_400s_naming_input(loaded):
    engine = HFEngine(loaded, EngineConfig(max_embedding_inputs=8, max_embedding_tokens=40)).start()
    try:
        with ServerThread(create_app(LocalClient({"tiny": engine}))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="tiny", input=["a"] * 9)
            assert e.value.param == "input" and "at most 8" in e.value.message
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="tiny", input=["many words in here " * 4] * 3)
            assert e.value.param == "input" and "at most 40 tokens" in e.value.message
            assert len(client.embeddings.create(model="tiny", input=["a"] * 8).data) == 8
            assert httpx.get(url + "/health").status_code == 200
    finally:
        engine.stop()


# ---------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    """SmolLM2 in float32 (batch invariance is promised there), loaded for this module."""
    return load_model(real_model_dir, device="cpu", dtype="float32")


@pytest.mark.real_model
def test_real_model_batched_greedy_and_a_poisoned_neighbour(real_model):
    """SmolLM2 in float32: four streams decoded together across 16-token blocks equal each alone, and the
    issue's repro (repetition_penalty 1.585e-39 beside a greedy stream) fails only the poisoned request."""
    engine = HFEngine(real_model, EngineConfig()).start()
    questions = ["What is the capital of France?", "Name three colours.", "Count to five.", "Say hello."]
    prompts = [chat_ids(real_model, q) for q in questions]
    greedy = sampling_params(real_model.defaults, max_new_tokens=24, temperature=0)  # the model's stop ids
    bad = sampling_params(real_model.defaults, max_new_tokens=8, temperature=1, seed=1)
    bad.repetition_penalty = 1.585e-39  # past the API's validation (the engine must not rely on it)
    try:
        async def run_all():
            async def poisoned():
                try:
                    await collect(engine, chat_ids(real_model, "Hi"), bad)
                except ServeError as e:
                    return e

            return await asyncio.gather(
                *(collect(engine, ids, greedy) for ids in prompts),
                poisoned())

        *texts, err = asyncio.run(run_all())
    finally:
        engine.stop()
    assert texts[0].startswith("The capital of France is Paris.")
    for ids, text in zip(prompts, texts):
        assert text == generate(real_model.model, real_model.tokenizer, ids, greedy)[0]
    assert isinstance(err, InvalidRequest) and err.param == "repetition_penalty"


@pytest.mark.real_model
def test_real_model_prefix_cache_gives_what_a_full_prefill_gives(real_model):
    """SmolLM2 in float32: the second turn of a chat, its history found in the prefix cache, answers
    exactly as a full prefill of it does."""
    engine = HFEngine(real_model, EngineConfig(kv_cache_memory="128MiB")).start()
    greedy = sampling_params(real_model.defaults, max_new_tokens=16, temperature=0)
    msgs = [{"role": "system", "content": "You are a helpful assistant who answers in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
    try:
        first = asyncio.run(collect(engine, encode(real_model.tokenizer, render_prompt(
            real_model.template, msgs, real_model.tokenizer)), greedy))
        msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
        ids = encode(real_model.tokenizer, render_prompt(real_model.template, msgs, real_model.tokenizer))
        before = engine.stats().prefix_cache_hits
        second = asyncio.run(collect(engine, ids, greedy))
        hit = engine.stats().prefix_cache_hits - before
    finally:
        engine.stop()
    assert hit >= 32, hit  # the system prompt and the first turn, in whole 16-token blocks
    assert second == generate(real_model.model, real_model.tokenizer, ids, greedy)[0]
