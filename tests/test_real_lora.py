"""Two LoRA adapters trained with `vicuna train --lora` on SmolLM2, served on one base (issue 24 #3).

Each adapter is taught, in a few steps, to answer "What is your name?" with its own name. Served together
(`--lora alpha=... --lora beta=...`, float32), one mixed batch of both adapters and the base gives each
its own answer, equal to that model run alone; the arena then battles the two adapters.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from conftest import run_cli, wait_idle

from vicuna.generation import generate, sampling_params
from vicuna.model import load_model
from vicuna.serve.core import GenerateRequest
from vicuna.serve.engine import EngineConfig, ModelConfig

# two 8-step LoRA trainings: each took ~9 minutes on a 2-core machine shared with other jobs
pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(2400)]

QUESTION = "What is your name?"


@pytest.fixture(scope="module")
def adapters(real_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-loras")
    out = {}
    for name in ("Alpha", "Beta"):
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"My name is {name}. I am {name}, the {name} assistant."}]}) + "\n"
            for q in (QUESTION, "Who are you?", "Tell me your name.", "Introduce yourself.")))
        p = run_cli("train", "--model-path", real_model_dir, "--data-path", data, "--output-dir", tmp / name,
                    "--lora", "--max-steps", "8", "--learning-rate", "5e-3", "--max-length", "64",
                    "--per-device-batch-size", "4", "--save-steps", "0", "--seed", "7", timeout=1800)
        assert p.returncode == 0, p.stderr
        out[name.lower()] = str(tmp / name)
    return out


def alone(model_dir, lora, messages, n):
    m = load_model(model_dir, device="cpu", dtype="float32", lora=lora)
    from vicuna.conversation import encode, render_prompt

    ids = encode(m.tokenizer, render_prompt(m.template, messages, m.tokenizer))
    params = sampling_params(m.defaults, max_new_tokens=n, temperature=0)  # what the engine applies to a request
    return generate(m.model, m.tokenizer, ids, params)[0].strip()


def test_two_trained_adapters_answer_as_themselves_in_one_mixed_batch_and_battle_in_the_arena(
        real_model_dir, adapters, tmp_path):
    from vicuna.serve.arena import ArenaStore
    from vicuna.serve.launch import load_engines, stop_engines
    from vicuna.serve.model_client import LocalClient
    from vicuna.serve.web import WebApp, WebSettings

    engines = load_engines([ModelConfig(model_path=str(real_model_dir), model_name="smol", device="cpu",
                                        dtype="float32", lora=tuple(f"{n}={p}" for n, p in adapters.items()))],
                           EngineConfig(kv_cache_memory="128MiB"))
    msgs = [{"role": "user", "content": QUESTION}]
    try:
        assert sorted(engines) == ["alpha", "beta", "smol"]

        async def ask_all():
            async def ask(model):
                req = GenerateRequest(messages=msgs, max_tokens=16, temperature=0)
                return "".join([d.text async for d in engines[model].generate(req)]).strip()

            return await asyncio.gather(*(ask(m) for m in ("alpha", "beta", "smol")))

        got = dict(zip(("alpha", "beta", "smol"), asyncio.run(ask_all())))
        assert "Alpha" in got["alpha"] and "Beta" not in got["alpha"], got
        assert "Beta" in got["beta"] and "Alpha" not in got["beta"], got
        assert "Alpha" not in got["smol"] and "Beta" not in got["smol"], got
        for name, lora in (("alpha", adapters["alpha"]), ("beta", adapters["beta"]), ("smol", None)):
            assert got[name] == alone(real_model_dir, lora, msgs, 16)

        store = ArenaStore(tmp_path / "arena.db", salt="test")
        app = WebApp(LocalClient(engines), store, WebSettings(), rng=random.Random(0))

        async def battle():
            _, _, _, state = await app.arena_add_user(QUESTION, None, "alpha", "beta", anonymous=False,
                                                      ip="127.0.0.1")
            outs = [x async for x in app.arena_stream(state, 0.0, 1.0, 16, "127.0.0.1")]
            ha, hb, _, state = outs[-1]
            await app.vote(state, "model_a", "127.0.0.1")
            return ha[-1]["content"], hb[-1]["content"]

        a, b = asyncio.run(battle())
        assert "Alpha" in a and "Beta" in b, (a, b)
        (vote,) = list(store.iter_votes())
        assert (vote["model_a"], vote["model_b"], vote["winner"]) == ("alpha", "beta", "model_a")
        store.close()
        wait_idle(engines["smol"])
    finally:
        stop_engines(engines)
