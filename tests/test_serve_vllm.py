"""The vLLM backend's mapping, on CPU: vLLM cannot be installed here, so its engine is a fake
with vLLM's documented shapes (cumulative ``RequestOutput``s, ``{token_id: Logprob}`` per token,
``abort(request_id)``); everything of ours around it is real, down to the OpenAI client."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from dataclasses import dataclass

import openai
import pytest

from vicuna.errors import UsageError
from vicuna.generation import SamplingParams
from vicuna.model import load_model
from vicuna.serve.engine import EngineConfig
from vicuna.sizes import parse_size
from vicuna.serve.engine.vllm import OutputReader, VLLMEngine, engine_args, logprob_entries, sampling_kwargs
from vicuna.serve.launch import ModelConfig, local_app

GiB = 1 << 30


def test_every_option_is_mapped_or_refused(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    m = ModelConfig(model_path="/m", backend="vllm", num_gpus=2, dtype="bfloat16", max_gpu_memory="20GiB",
                    load_8bit=True, lora=str(adapter), trust_remote_code=True)
    args = engine_args(m, EngineConfig(max_batch_size=48, max_model_len=4096), gpu_memory_bytes=80 * GiB)
    assert args == {"model": "/m", "tokenizer": "/m", "tensor_parallel_size": 2, "dtype": "bfloat16",
                    "max_model_len": 4096, "max_num_seqs": 48, "trust_remote_code": True,
                    "enable_prefix_caching": True, "gpu_memory_utilization": 0.25, "quantization": "fp8", "enable_lora": True, "max_loras": 1,
                    "max_lora_rank": 16}
    plain = engine_args(ModelConfig(model_path="/m", backend="vllm"), EngineConfig())
    assert not {"gpu_memory_utilization", "quantization", "enable_lora"} & set(plain)
    no_cache = engine_args(ModelConfig(model_path="/m", backend="vllm"), EngineConfig(prefix_caching=False))
    assert no_cache["enable_prefix_caching"] is False  # --no-prefix-caching
    for bad, match in [({"device": "cpu"}, "CUDA"), ({"threads": 4}, "--threads"),
                       ({"max_gpu_memory": "200GiB"}, "more than the GPU")]:
        with pytest.raises(UsageError, match=match):
            engine_args(ModelConfig(model_path="/m", backend="vllm", **bad), EngineConfig(), 80 * GiB)
    with pytest.raises(UsageError, match="needs --model-path"):
        ModelConfig(backend="vllm")


@pytest.mark.parametrize("text,size", [("20GiB", 20 * GiB), ("512MB", 512_000_000), ("1.5g", int(1.5e9)),
                                       ("1000", 1000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "5 parsecs"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_sampling_kwargs_carry_logprobs_stops_and_seed():
    p = SamplingParams(temperature=0.5, top_k=0, max_new_tokens=7, seed=3, stop=("x",), stop_token_ids=(2,),
                       logprobs=4)
    kw = sampling_kwargs(p)
    assert kw["logprobs"] == 4 and kw["top_k"] == -1 and kw["stop"] == ["x"] and kw["stop_token_ids"] == [2]
    assert (kw["seed"], kw["max_tokens"], kw["temperature"]) == (3, 7, 0.5)


# ---------------------------------------------------------------- fakes of vLLM's output shapes


@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class Completion:
    text: str
    token_ids: list
    logprobs: list | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    outputs: list
    finished: bool


def outputs(pieces, k=None, reason="length"):
    """Cumulative outputs for ``pieces`` (one token each), with top-k logprobs when ``k``."""
    text, ids, lps = "", [], []
    for i, piece in enumerate(pieces):
        text, ids = text + piece, ids + [100 + i]
        if k is not None:
            lps.append({100 + i: Logprob(-0.5, 2, piece), 7: Logprob(-0.1, 1, "top")})
        last = i == len(pieces) - 1
        yield RequestOutput([Completion(text, list(ids), list(lps) if k is not None else None,
                                        reason if last else None)], last)


def test_output_reader_strips_leading_space_and_maps_logprobs():
    read = OutputReader(strip_leading=True, logprobs=1, prompt_tokens=5)
    deltas = [read(o) for o in outputs([" ", " Hi", " there"], k=1)]
    assert [d.text for d in deltas] == ["", "Hi", " there"]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3
    assert deltas[1].logprobs == [{"token": " Hi", "logprob": -0.5, "top": [("top", -0.1)]}]
    raw = [OutputReader(False, None, 5)(o) for o in outputs([" a"])]
    assert raw[0].text == " a" and raw[0].logprobs is None


def test_logprob_entries_rank_the_top_and_keep_the_chosen_token():
    lps = [{5: Logprob(-2.0, 3, "c"), 1: Logprob(-0.2, 1, "a"), 2: Logprob(-1.0, 2, "b")}]
    assert logprob_entries([5], lps, 0, 2) == [{"token": "c", "logprob": -2.0, "top": [("a", -0.2), ("b", -1.0)]}]


class FakeVLLM:
    """vLLM's AsyncLLMEngine as far as we use it: generate(prompt, params, request_id, lora_request), abort."""

    def __init__(self):
        self.calls, self.aborted = [], []

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.calls.append((prompt, params, lora_request))
        for out in outputs([" The", " answer", " is", " 42"], k=params.kw["logprobs"],
                           reason="stop"):
            await asyncio.sleep(0)
            yield out

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model_dir):
    vllm = types.ModuleType("vllm")

    class VSampling:
        def __init__(self, **kw):
            self.kw = kw

    vllm.SamplingParams = VSampling
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    loaded = load_model(tiny_model_dir, device="cpu")
    fake = FakeVLLM()
    engine = VLLMEngine(fake, name="v", tokenizer=loaded.tokenizer, template=loaded.template, context_length=512,
                        config=EngineConfig(), defaults=loaded.defaults)
    return engine, fake


def test_vllm_engine_through_our_api_returns_logprobs_and_strips(fake_vllm):
    from vicuna.serve.server import ServerThread

    engine, fake = fake_vllm
    with ServerThread(local_app({"v": engine})) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="v", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                      top_logprobs=1, max_tokens=8)
        assert r.choices[0].message.content == "The answer is 42" and r.choices[0].finish_reason == "stop"
        assert [t.token for t in r.choices[0].logprobs.content] == [" The", " answer", " is", " 42"]
        assert r.choices[0].logprobs.content[0].top_logprobs[0].token == "top"
        assert r.usage.completion_tokens == 4
        prompt, params, _ = fake.calls[-1]
        assert prompt["prompt_token_ids"] and params.kw["logprobs"] == 1 and params.kw["max_tokens"] == 8
    s = engine.stats()
    assert (s.requests_finished, s.generated_tokens, s.running) == (1, 4, 0)


def test_vllm_request_closed_early_is_aborted_in_vllm(fake_vllm):
    from vicuna.serve.core import GenerateRequest

    engine, fake = fake_vllm

    async def first_only():
        stream = engine.generate(GenerateRequest(prompt="Hi", max_tokens=4))
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(first_only()).text == " The"
    assert len(fake.aborted) == 1 and engine.stats().requests_aborted == 1


def test_constraints_map_to_vllms_structured_outputs(fake_vllm, monkeypatch):
    """Our constraint becomes vLLM's StructuredOutputsParams on its SamplingParams (CPU: vLLM faked)."""
    from vicuna.serve import structured
    from vicuna.serve.core import GenerateRequest

    engine, fake = fake_vllm
    mod = types.ModuleType("vllm.sampling_params")

    class StructuredOutputsParams:
        def __init__(self, **kw):
            self.kw = kw

    mod.StructuredOutputsParams = StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", mod)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for kind, value, want in (("json_schema", schema, {"json": schema}), ("regex", "[0-9]+", {"regex": "[0-9]+"}),
                              ("choice", ["x", "y"], {"choice": ["x", "y"]}), ("json_object", None, {"json_object": True}),
                              ("grammar", 'root ::= "a"', {"grammar": 'root ::= "a"'})):
        req = GenerateRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                              constraint=structured.constraint(kind, value, "guided_x"))

        async def run():
            return [d async for d in engine.generate(req)]

        asyncio.run(run())
        _, params, _ = fake.calls[-1]
        assert params.kw["structured_outputs"].kw == want
