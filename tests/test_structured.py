"""Structured outputs and tool calling on the real model (SmolLM2-135M-Instruct, float32) through the
official ``openai`` SDK and LangChain: constrained JSON / regex / choice / grammar, forced and parsed tool
calls, streaming, mixed batches, and the 400s of hostile requests."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from conftest import api_server

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model32(real_model_dir):
    """float32: batched rows equal solo ones exactly (16-bit kernels round differently per batch shape)."""
    from vicuna.model import load_model

    return load_model(real_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(model32):
    from vicuna.serve.engine import EngineConfig, HFEngine

    e = HFEngine(model32, EngineConfig(max_batch_size=8, kv_cache_memory="128MiB", max_model_len=1024)).start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def url(engine):
    yield from api_server(engine)


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    color: Color


class Owner(BaseModel):
    name: str = Field(max_length=12)
    pet: Pet


class Shopping(BaseModel):
    items: list[str] = Field(min_length=1, max_length=3)


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    unit: Literal["c", "f"]


class TimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tz: str = Field(max_length=20)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": WeatherArgs.model_json_schema()}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": TimeArgs.model_json_schema()}}
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}


# ---------------------------------------------------------------------- structured outputs


@pytest.mark.parametrize("model", [Pet, Owner, Shopping])
def test_parse_returns_valid_pydantic_objects(client, model):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="tiny", messages=ask(f"Describe a {model.__name__.lower()} as JSON."), response_format=model,
              max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # ended because the grammar was complete
    assert isinstance(choice.message.parsed, model)  # the SDK validated it against the model's schema


def test_json_object_parses(client):
    r = client.chat.completions.create(model="tiny", messages=ask("Give me a JSON object about cats."),
                                       response_format={"type": "json_object"}, max_tokens=48, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a JSON prefix that starts an object
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_regex_choice_and_grammar_honoured(client):
    r = client.chat.completions.create(model="tiny", messages=ask("What is the date today?"), max_tokens=16,
                                       temperature=0, extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(model="tiny", messages=ask("Sentiment of 'I love it'?"), max_tokens=8,
                                       temperature=0.9, seed=3, extra_body={"structured_outputs": {"choice": choices}})
    assert r.choices[0].message.content in choices
    r = client.chat.completions.create(model="tiny", messages=ask("Say yes or no."), max_tokens=8, temperature=0,
                                       extra_body={"guided_grammar": 'root ::= ("yes" | "no") "!"'})
    assert r.choices[0].message.content in ("yes!", "no!")


def test_completions_honour_guided_choice(client):
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": ["blue", "green"]})
    assert r.choices[0].text in ("blue", "green")


@pytest.mark.slow
def test_mixed_batch_unconstrained_rows_equal_their_solo_outputs(engine):
    """Rows with different grammars and rows with none decode in the same steps; the free rows' tokens are
    exactly what they are alone (float32, greedy)."""
    import asyncio

    from vicuna.serve import structured
    from vicuna.serve.core import GenerateRequest

    free = [GenerateRequest(messages=ask(q), max_tokens=12, temperature=0) for q in ("Name a fruit.", "Hi!")]
    bound = [GenerateRequest(messages=ask("Pick one."), max_tokens=12, temperature=0,
                             constraint=structured.constraint("choice", ["alpha", "beta"], "guided_choice")),
             GenerateRequest(messages=ask("A pet as JSON."), max_tokens=40, temperature=0,
                             constraint=structured.constraint("json_schema", Pet.model_json_schema(), "guided_json"))]

    async def run(reqs):
        async def one(r):
            return "".join([d.text async for d in engine.generate(r)])
        return await asyncio.gather(*(one(r) for r in reqs))

    solo = [asyncio.run(run([r]))[0] for r in free]
    before = engine.stats().decode_steps
    mixed = asyncio.run(run([free[0], bound[0], free[1], bound[1]]))
    assert engine.stats().mask_steps > 0 and engine.stats().decode_steps > before
    assert [mixed[0], mixed[2]] == solo
    assert mixed[1] in ("alpha", "beta")
    Pet.model_validate_json(mixed[3])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"type": "object", "properties": 5}}, "guided_json"),
    ({"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json"),
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"guided_regex": "a{5}{5}"}, "guided_regex"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_hostile_requests_are_400_naming_the_field_and_the_server_keeps_serving(url, body, param):
    payload = {"model": "tiny", "messages": ask("hi"), "max_tokens": 4, **body}
    r = httpx.post(url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    ok = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": ask("hi"), "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_compiled_grammars_are_cached_by_schema(engine):
    from vicuna.serve import structured

    cache = engine.grammars
    c = structured.constraint("json_schema", {"type": "object", "properties": {"q": {"type": "integer"}}}, "x")
    first = cache.compile(c)
    hits = cache.hits
    assert cache.compile(dict(c, value=json.loads(json.dumps(c["value"])))) is first
    assert cache.hits == hits + 1


# ---------------------------------------------------------------------- tool calling


@pytest.mark.slow
def test_tool_choice_required_and_named_give_schema_valid_calls(client):
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        r = client.chat.completions.create(model="tiny", messages=ask("What's the weather in Paris?"),
                                           tools=[WEATHER, TIME], tool_choice=choice, max_tokens=48, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls and c.message.tool_calls[0].id.startswith("call_")
        for call in c.message.tool_calls:  # the arguments validate against the function's schema
            ARGS[call.function.name].model_validate_json(call.function.arguments)
        if name:
            assert [t.function.name for t in c.message.tool_calls] == [name]


@pytest.mark.slow
def test_full_tool_round_trip(client):
    messages = ask("What's the weather in Paris?")
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=48,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "sunny"})}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=16, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_streamed_tool_calls_assembled_by_the_sdk_stream_helper(client):
    stream_ = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with stream_(model="tiny", messages=ask("Weather in Rome?"), tools=[WEATHER], tool_choice=choice,
                     parallel_tool_calls=False, max_tokens=48, temperature=0) as s:
            for _ in s:
                pass
            done = s.get_final_completion()
        c = done.choices[0]
        assert c.finish_reason == "tool_calls"
        call = c.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id
        WeatherArgs.model_validate_json(call.function.arguments)


def test_auto_parses_hermes_calls_and_plain_text_stays_content():
    from vicuna.serve import tools

    p = tools.ToolPlan(mode="auto", tools=[WEATHER])
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    content, calls, reason = tools.complete(text, "stop", p)
    assert content == "Let me check." and reason == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert tools.complete("Just words.", "stop", p) == ("Just words.", None, "stop")
    # a required array cut by max_tokens keeps its complete calls
    cut = '[{"name": "get_time", "arguments": {"tz": "UTC"}}, {"name": "get_wea'
    _, calls, reason = tools.complete(cut, "length", tools.ToolPlan(mode="required", tools=[TIME]))
    assert [c["function"]["name"] for c in calls] == ["get_time"] and reason == "length"
    # streamed: content goes out at once, the call is held and sent whole at the end
    s = tools.ToolStream(p)
    out = [s.feed(piece) for piece in re.findall(r".{1,5}", text, re.S)]
    assert "".join(c for c, _ in out).strip() == "Let me check." and not any(k for _, k in out)
    rest, calls = s.finish()
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    # the other formats
    _, calls = tools.parse_tool_calls('[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "UTC"}}]')
    assert calls[0]["function"]["name"] == "get_time"
    _, calls = tools.parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}')
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}


def test_tool_fallback_prompt_for_templates_without_tool_support(real_model):
    from vicuna.conversation import render_prompt

    msgs = ask("Weather?") + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"}]
    text = render_prompt(real_model.template, msgs, real_model.tokenizer, tools=[WEATHER])
    assert "<tools>" in text and '"get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert "<tool_response>\n21C\n</tool_response>" in text


# ---------------------------------------------------------------------- LangChain


@pytest.mark.slow
def test_langchain_bind_tools_and_with_structured_output(url):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="tiny", base_url=url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=48, max_retries=0)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    WeatherArgs.model_validate(msg.tool_calls[0]["args"])
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)
