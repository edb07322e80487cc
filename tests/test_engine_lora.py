"""Many LoRA adapters on one base (issue 24 #3): flags, a mixed batch, runtime load/unload, the vLLM mapping.

Adapters here are built with peft directly on the tiny random LLaMA (random, non-zero LoRA weights, so each
changes the answers); the real-model adapters trained with `vicuna train` are in test_real_lora.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import chat_ids, wait_idle

from vicuna.errors import UsageError
from vicuna.generation import SamplingParams, generate
from vicuna.model import load_model
from vicuna.serve.engine import EngineConfig, HFEngine, ModelConfig
from vicuna.serve.launch import local_app
from vicuna.serve.server import ServerThread


def make_adapter(base_dir, out, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return {name: make_adapter(tiny_model_dir, tmp / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}




def alone(model_dir, ids, n, lora=None):
    """Greedy answer of one request on a model of its own: the base, or the base with one adapter applied."""
    m = load_model(model_dir, device="cpu", dtype="float32", lora=lora)
    text = generate(m.model, m.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0]
    return text.lstrip()  # as a chat answer is served


async def collect(engine, model, ids_or_text, n):
    from vicuna.serve.core import GenerateRequest

    req = GenerateRequest(messages=[{"role": "user", "content": ids_or_text}], max_tokens=n, temperature=0,
                          ignore_eos=True)
    return "".join([d.text async for d in engine.generate(req, adapter=model)])


def test_lora_flags_name_adapters_and_keep_the_bare_meaning():
    m = ModelConfig(model_path="/m", lora=("math=out/math", "code=/abs/code", "plain/dir"))
    assert m.lora_adapters == {"math": "out/math", "code": "/abs/code"} and m.applied_lora == "plain/dir"
    assert ModelConfig(model_path="/m", lora="one/dir").applied_lora == "one/dir"  # today's meaning
    assert ModelConfig(model_path="/m", lora=("a/b=c",)).applied_lora == "a/b=c"  # '=' inside a path
    with pytest.raises(UsageError, match="bare --lora"):
        ModelConfig(model_path="/m", lora=("x", "y"))
    with pytest.raises(UsageError, match="named alike"):
        ModelConfig(model_path="/m", lora=("a=x", "a=y"))


def test_the_serve_command_takes_repeated_lora_flags():
    from vicuna.cli import build_parser
    from vicuna.serve import launch

    args = build_parser().parse_args(["serve", "--model-path", "/m", "--lora", "a=/x", "--lora", "b=/y"])
    (m,) = launch.model_configs(args)
    assert m.lora_adapters == {"a": "/x", "b": "/y"} and m.applied_lora is None


def test_a_mixed_batch_equals_each_adapter_run_alone(tiny_model_dir, loaded, adapters):
    """Rows of two adapters and of the base decoded together (float32): each is what its model gives alone,
    and the adapters do change the answers. One base in memory: the adapters add only their own weights."""
    base_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    engine = HFEngine(load_model(tiny_model_dir, device="cpu", dtype="float32", model_name="tiny"),
                      EngineConfig(kv_cache_memory="64MiB"), adapters=adapters).start()
    lora_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "lora_" in n)
    total = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert total == base_bytes + lora_bytes and lora_bytes < base_bytes / 2
    questions = ["tell me a story", "what is two plus two", "hello"]
    try:
        async def run_all():
            jobs = [(model, q) for q in questions for model in (None, "alpha", "beta")]
            return jobs, await asyncio.gather(*(collect(engine, model, q, 24) for model, q in jobs))

        before = engine.stats().decode_steps
        jobs, got = asyncio.run(run_all())
        steps = engine.stats().decode_steps - before
        s = wait_idle(engine)
    finally:
        engine.stop()
    assert steps <= 30, steps  # nine streams of 24 tokens decoded together, not one adapter after another
    assert s.kv_blocks_free == s.kv_blocks
    by = dict(zip(jobs, got))
    for q in questions:
        ids = chat_ids(loaded, q)
        assert by[None, q] == alone(tiny_model_dir, ids, 24)
        assert by["alpha", q] == alone(tiny_model_dir, ids, 24, lora=adapters["alpha"])
        assert by["beta", q] == alone(tiny_model_dir, ids, 24, lora=adapters["beta"])
    assert len({by[m, q] for m in (None, "alpha", "beta") for q in questions}) == 9


def test_adapters_are_models_and_load_and_unload_at_runtime_behind_the_key(tiny_model_dir, adapters):
    from vicuna.serve.launch import ApiConfig, load_engines

    engines = load_engines([ModelConfig(model_path=str(tiny_model_dir), model_name="tiny", device="cpu",
                                        dtype="float32", lora=(f"alpha={adapters['alpha']}",))],
                           EngineConfig(kv_cache_memory="64MiB"))
    base = engines["tiny"]
    app = local_app(engines, ApiConfig(api_keys=("k",), allow_runtime_lora=True))
    try:
        with ServerThread(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["tiny", "alpha"]
            msgs = [{"role": "user", "content": "hello"}]

            def ask(model):
                return client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                                      extra_body={"ignore_eos": True}).choices[0].message.content

            alpha = ask("alpha")
            body = {"lora_name": "beta", "lora_path": adapters["beta"]}
            assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401  # behind the key
            auth = {"Authorization": "Bearer k"}
            r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth)
            assert r.status_code == 200 and "beta" in r.text, r.text
            assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
            beta = ask("beta")
            assert beta != alpha and ask("tiny") not in (alpha, beta)
            for bad, param in (({"lora_name": "beta", "lora_path": adapters["beta"]}, "lora_name"),
                               ({"lora_name": "gamma", "lora_path": str(tiny_model_dir / "nope")}, "lora_path")):
                r = httpx.post(url + "/v1/load_lora_adapter", json=bad, headers=auth)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=auth)
            assert r.status_code == 200, r.text
            assert [m.id for m in client.models.list().data] == ["tiny", "beta"]
            with pytest.raises(openai.NotFoundError):
                ask("alpha")
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=auth)
            assert r.status_code == 404
            assert ask("beta") == beta  # the others go on unchanged
            wait_idle(base)
            assert not any("alpha" in a for a in base.model.peft_config)  # its weights are gone too
    finally:
        base.stop()


def test_runtime_loading_is_off_unless_allowed(tiny_model_dir):
    from vicuna.serve.launch import ApiConfig, load_engines

    engines = load_engines([ModelConfig(model_path=str(tiny_model_dir), model_name="tiny", device="cpu")],
                           EngineConfig(kv_cache_memory="32MiB"))
    try:
        with ServerThread(local_app(engines, ApiConfig())) as url:
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
            assert r.status_code == 404 and "--allow-runtime-lora" in r.json()["error"]["message"]
    finally:
        engines["tiny"].stop()


def test_vllm_maps_many_adapters(tmp_path):
    from vicuna.serve.engine.vllm import engine_args, lora_requests

    dirs = {}
    for name, r in (("a", 8), ("b", 24), ("c", 4)):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": r}))
        dirs[name] = str(d)
    m = ModelConfig(model_path="/m", backend="vllm", lora=(f"a={dirs['a']}", f"b={dirs['b']}", dirs["c"]))
    args = engine_args(m, EngineConfig())
    assert args["enable_lora"] is True and args["max_loras"] == 3 and args["max_lora_rank"] == 32

    class FakeLoRARequest:  # vllm.lora.request.LoRARequest's positional fields
        def __init__(self, name, int_id, path):
            self.lora_name, self.lora_int_id, self.lora_path = name, int_id, path

    applied, named = lora_requests(m, FakeLoRARequest)
    assert applied.lora_path == dirs["c"] and {n: r.lora_path for n, r in named.items()} == {"a": dirs["a"],
                                                                                            "b": dirs["b"]}
    assert len({r.lora_int_id for r in (applied, *named.values())}) == 3  # vLLM keys adapters by these ids


def test_a_worker_registers_and_routes_its_adapters(tiny_model_dir, adapters):
    from vicuna.serve.launch import load_engine
    from vicuna.serve.worker import create_worker_app

    engine = load_engine(ModelConfig(model_path=str(tiny_model_dir), model_name="tiny", device="cpu",
                                     lora=(f"alpha={adapters['alpha']}",)), EngineConfig(kv_cache_memory="32MiB"))
    try:
        with ServerThread(create_worker_app(engine)) as url:
            assert httpx.get(url + "/worker_get_status").json()["model_names"] == ["tiny", "alpha"]
            body = {"request": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                                "ignore_eos": True}}
            answers = {}
            for model in ("tiny", "alpha"):
                r = httpx.post(url + "/worker_generate_stream", json={**body, "model": model})
                answers[model] = "".join(json.loads(x).get("text", "") for x in r.text.splitlines() if x.strip())
            assert answers["tiny"] != answers["alpha"]
            r = httpx.post(url + "/worker_generate_stream", json={**body, "model": "beta"})
            assert r.status_code == 404
    finally:
        engine.stop()
