"""The llama.cpp backend's own parts: request mapping, refusals, and that its prompt is the one
the Hugging Face model gets. (Its OpenAI conformance runs in tests/test_serve.py, once per backend.)"""

from __future__ import annotations

import sys

import pytest

from vicuna.errors import UsageError
from vicuna.generation import SamplingParams
from vicuna.model import ModelLoadError
from vicuna.errors import ServeError
from vicuna.serve.engine import EngineConfig
from vicuna.serve.engine.llamacpp import LlamaCppEngine, completion_body, parse_chunk
from vicuna.serve.launch import ModelConfig


def smollm2_gguf():
    from vicuna.weights.gguf import WeightsError, default_gguf

    try:
        return default_gguf()
    except WeightsError as e:
        pytest.skip(str(e))


def test_completion_body_maps_our_settings():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1, presence_penalty=0.5,
                       max_new_tokens=9, seed=2**40 + 5, stop=("###",), logprobs=0)
    b = completion_body([1, 2, 3], p)
    assert b["prompt"] == [1, 2, 3] and b["n_predict"] == 9 and b["stream"] is True
    assert b["samplers"] == ["penalties", "temperature", "top_k", "top_p"]  # temperature first, as HF/vLLM
    assert b["min_p"] == 0.0 and b["top_k"] == 0 and b["repeat_penalty"] == 1.1 and b["repeat_last_n"] > 10**6
    assert b["seed"] == 5 and b["stop"] == ["###"] and b["n_probs"] == 1  # the chosen token's logprob needs 1
    assert b["cache_prompt"] is True and completion_body([1], p, cache_prompt=False)["cache_prompt"] is False
    assert "seed" not in completion_body([1], SamplingParams()) and "n_probs" not in completion_body([1], SamplingParams())


def test_parse_chunk_maps_logprobs_usage_and_errors():
    chunk = {"choices": [{"text": " Paris", "finish_reason": None, "logprobs": {"content": [
        {"id": 7, "token": " Paris", "logprob": -0.25, "top_logprobs": [{"token": " Paris", "logprob": -0.25},
                                                                        {"token": " the", "logprob": -2.0}]}]}}]}
    text, reason, lps, count = parse_chunk(chunk, 1)
    assert (text, reason, count) == (" Paris", None, None)
    assert lps == [{"token": " Paris", "logprob": -0.25, "top": [(" Paris", -0.25)]}]
    assert parse_chunk(chunk, None)[2] is None  # not asked for: not returned
    final = {"choices": [{"text": "", "finish_reason": "stop"}], "usage": {"completion_tokens": 8}}
    assert parse_chunk(final, None) == ("", "stop", None, 8)
    with pytest.raises(ServeError, match="too long") as e:
        parse_chunk({"error": {"code": 400, "message": "too long", "type": "invalid_request_error"}}, None)
    assert e.value.status == 400


@pytest.mark.parametrize("extra,match", [({"lora": "a"}, "--lora"), ({"load_8bit": True}, "--load-8bit"),
                                         ({"dtype": "float16"}, "--dtype"), ({"device": "cuda"}, "--device"),
                                         ({"num_gpus": 2}, "--num-gpus")])
def test_options_llamacpp_would_ignore_are_refused(tmp_path, extra, match):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(UsageError, match=match):
        LlamaCppEngine.load(ModelConfig(model_path=str(f), backend="llamacpp", **extra), EngineConfig())


def test_wrong_files_get_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="takes a .gguf file"):
        LlamaCppEngine.load(ModelConfig(model_path=str(tiny_model_dir), backend="llamacpp"), EngineConfig())
    (tmp_path / "x.gguf").write_text("not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppEngine.load(ModelConfig(model_path=str(tmp_path / "x.gguf"), backend="llamacpp"), EngineConfig())


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"\.\[llamacpp\]"):
        LlamaCppEngine.load(ModelConfig(model_path=str(f), backend="llamacpp"), EngineConfig())


def test_cli_refuses_a_folder_for_llamacpp_without_a_traceback(tiny_model_dir):
    from conftest import run_cli

    p = run_cli("serve", "--backend", "llamacpp", "--model-path", tiny_model_dir, "--port", "1")
    assert p.returncode == 1 and "takes a .gguf file" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("serve", "--backend", "vllm", "--port", "1")
    assert p.returncode == 2 and "needs --model-path" in p.stderr


@pytest.mark.real_model
def test_prompt_text_and_ids_match_the_hf_model_and_llama_cpp(real_model_dir):
    """Our template path gives the GGUF's vocabulary the same prompt text and ids as the HF folder
    (imported from the same GGUF), and llama.cpp's own tokenizer agrees on the ids."""
    xllamacpp = pytest.importorskip("xllamacpp", reason="needs the xllamacpp wheel (.[llamacpp])")
    import httpx

    from vicuna.conversation import encode, render_prompt
    from vicuna.model import load_model
    from vicuna.serve.engine.llamacpp import load_gguf_tokenizer

    gguf = smollm2_gguf()
    hf = load_model(real_model_dir, device="cpu")
    tok, meta = load_gguf_tokenizer(gguf)
    from vicuna.conversation import resolve_template

    template = resolve_template(None, tok, model_name=str(gguf), model_type=meta["architecture"])
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ünïcödé 😀\n\n  spaces"},
              {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "def f(x): return x"}]]
    p = xllamacpp.CommonParams()
    p.model.path, p.hostnames, p.port, p.verbosity, p.n_ctx = str(gguf), ["127.0.0.1"], 0, -1, 512
    server = xllamacpp.Server(p)  # port 0: it binds one the OS picks and says which in listening_address
    try:
        for msgs in convs:
            text = render_prompt(template, msgs, tok)
            assert text == render_prompt(hf.template, msgs, hf.tokenizer)
            ids = encode(tok, text)
            assert ids == encode(hf.tokenizer, text)
            theirs = httpx.post(server.listening_address + "/tokenize", timeout=60,
                                json={"content": text, "add_special": False, "parse_special": True}).json()
            assert theirs["tokens"] == ids
    finally:
        del server


@pytest.mark.real_model
def test_default_gguf_gets_the_default_models_sampling_and_the_kv_budget():
    """No --model-path: the default model's GGUF, sampled as its HF import ships it (greedy, penalty 1.2),
    with the llama.cpp KV pool sized by --kv-cache-memory."""
    pytest.importorskip("xllamacpp", reason="needs the xllamacpp wheel (.[llamacpp])")
    smollm2_gguf()
    engine = LlamaCppEngine.load(ModelConfig(backend="llamacpp"), EngineConfig(kv_cache_memory="16MiB",
                                                                              max_model_len=256, max_batch_size=4))
    try:
        d = engine.defaults
        assert (d.temperature, d.repetition_penalty) == (0.0, 1.2) and 2 in d.stop_token_ids
        from vicuna.serve.engine.llamacpp import gguf_metadata

        per_token = gguf_metadata(smollm2_gguf())["kv_bytes_per_token"]
        assert engine.kv_cells == min(256 * 4, (16 << 20) // per_token) < 256 * 4  # the budget binds
        assert engine.info()["model"] == "SmolLM2-135M-Instruct"
    finally:
        engine.stop()


def test_constraints_map_to_llamacpps_fields_and_regex_is_refused():
    from vicuna.errors import InvalidRequest
    from vicuna.serve import structured

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert structured.llamacpp_fields(structured.constraint("json_schema", schema, "guided_json")) == {
        "json_schema": schema}
    assert structured.llamacpp_fields(structured.constraint("choice", ["a", "b"], "guided_choice")) == {
        "grammar": 'root ::= "a" | "b"'}
    with pytest.raises(InvalidRequest, match="regex") as e:
        structured.llamacpp_fields(structured.constraint("regex", "a+", "guided_regex"))
    assert e.value.param == "guided_regex"


@pytest.mark.real_model
@pytest.mark.slow
def test_structured_outputs_and_forced_tool_calls_through_llamacpp():
    """The core structured-output and tool checks with --backend llamacpp (llama.cpp applies the grammar)."""
    import json

    import httpx
    from openai import OpenAI
    from pydantic import BaseModel, Field

    from conftest import api_server

    pytest.importorskip("xllamacpp", reason="needs the xllamacpp wheel (.[llamacpp])")
    smollm2_gguf()

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=30)

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}
    engine = LlamaCppEngine.load(ModelConfig(backend="llamacpp"), EngineConfig(kv_cache_memory="64MiB",
                                                                              max_model_len=512, max_batch_size=2))
    engine.start()
    try:
        for url in api_server(engine):
            c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
            parse = getattr(c.chat.completions, "parse", None) or c.beta.chat.completions.parse
            r = parse(model="tiny", messages=[{"role": "user", "content": "A pet as JSON."}], response_format=Pet,
                      max_tokens=48, temperature=0)
            assert isinstance(r.choices[0].message.parsed, Pet)
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Yes or no?"}],
                                          max_tokens=4, extra_body={"guided_choice": ["yes", "no"]})
            assert r.choices[0].message.content in ("yes", "no")
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                          tools=[tool], tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=48, temperature=0)
            assert r.choices[0].message.tool_calls, r.choices[0]
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
            assert set(json.loads(call.function.arguments)) == {"city"}
            bad = httpx.post(url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "guided_regex": "a+"}, timeout=60)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"
            assert httpx.post(url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        engine.stop()
