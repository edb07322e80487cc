"""The real-model tier: the default model (SmolLM2-135M-Instruct) through chat, the API and the web UI.

One `vicuna serve --web` process with no --model-path (what a newcomer runs) serves the API tests
(official openai client) and the real-browser test; the in-process model is loaded once per
session (conftest ``real_model``). Generations are short: this model decodes ~10 tokens/s here.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import cli_server, run_cli

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."  # greedy, as the model card's Q4_1 GGUF answers here


def test_chat_with_no_model_path_answers_with_the_default_model():
    """What `make chat` does for a newcomer: no flags, the real default model, greedy by its own config."""
    proc = run_cli("chat", "--max-new-tokens", "24", input=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Using the default model SmolLM2-135M-Instruct" in proc.stderr
    assert proc.stdout.strip() == ANSWER


def test_generation_config_eos_ids_stop_every_path(real_model_dir, tmp_path):
    """`eos_token_id: [2, id(" Paris")]` in generation_config.json: chat and the engine stop before Paris."""
    from transformers import AutoTokenizer

    model = tmp_path / "stops-at-paris"
    model.mkdir()
    for f in real_model_dir.iterdir():  # the weights by link: only the small JSON files change
        (model / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, model / f.name)
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    (paris,) = tok(" Paris", add_special_tokens=False)["input_ids"]
    cfg = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, paris]}))

    proc = run_cli("chat", "--model-path", model, "--max-new-tokens", "24", input=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is"

    import asyncio

    from vicuna.model import load_model
    from vicuna.serve.core import GenerateRequest
    from vicuna.serve.engine import EngineConfig, HFEngine

    engine = HFEngine(load_model(model, device="cpu"), EngineConfig(max_batch_size=2, max_model_len=256)).start()

    async def ask():
        req = GenerateRequest(messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
        return [d async for d in engine.generate(req)]

    try:
        deltas = asyncio.run(ask())
    finally:
        engine.stop()
    assert "".join(d.text for d in deltas) == "The capital of France is" and deltas[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def default_process(tmp_path_factory):
    """`vicuna serve --web` with no --model-path: the default model, API and web UI on one port."""
    tmp = tmp_path_factory.mktemp("real-serve")
    with cli_server("serve", "--web", "--arena-db", tmp / "arena.db", "--max-batch-size", "4", "--max-model-len",
                    "2048", "--default-max-tokens", "32", ready=("/health", "/"), timeout=300,
                    log=tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def default_server(default_process):
    return default_process.url


@pytest.fixture(scope="module")
def client(default_server):
    from openai import OpenAI

    return OpenAI(base_url=default_server + "/v1", api_key="unused", max_retries=0, timeout=300)


def expected(real_model, messages, max_new_tokens=24):
    """(answer, prompt tokens, completion tokens) computed in-process, greedy, with the model's defaults."""
    from vicuna.conversation import encode, render_prompt
    from vicuna.generation import generate, sampling_params

    ids = encode(real_model.tokenizer, render_prompt(real_model.template, messages, real_model.tokenizer))
    params = sampling_params(real_model.defaults, max_new_tokens=max_new_tokens, strip_leading=True)
    text, finish, completion = generate(real_model.model, real_model.tokenizer, ids, params)
    return text, len(ids), completion, finish


def test_the_default_server_runs_in_16_bit_where_the_cpu_computes_it(client, default_process, real_model):
    """--dtype auto: bfloat16 on a CPU with AVX512-BF16/AMX (half the bytes per decode step), else float32; the
    log says which. The in-process model of these tests loads the same way, so their answers compare."""
    import torch

    from vicuna.model import cpu_has_native_bf16

    client.models.list()  # up
    want = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert f"loaded SmolLM2-135M-Instruct on cpu in {want}" in default_process.log.read_text()
    assert real_model.model.dtype == getattr(torch, want)


def test_api_chat_non_stream_answers_with_exact_usage(client, real_model):
    (model,) = [m.id for m in client.models.list().data]
    assert model == "SmolLM2-135M-Instruct"
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24)
    text, prompt_tokens, completion_tokens, finish = expected(real_model, messages)
    assert reply.choices[0].message.content == text == ANSWER
    assert reply.choices[0].finish_reason == "stop" == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens


def test_api_stream_with_usage_and_n2(client, real_model):
    messages = [{"role": "system", "content": "You are a concise geography tutor."},
                {"role": "user", "content": "Name the capital of Italy."}]
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want, prompt_tokens, completion_tokens, _ = expected(real_model, messages, 16)
    assert text == want and "Rome" in text
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # it streamed

    # n=2 sampled with seeds: two choices, each a coherent (non-empty, decodable) answer, usage summed
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[
        {"role": "user", "content": QUESTION}], max_tokens=12, n=2, temperature=0.7, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content.strip() for c in reply.choices)
    assert reply.usage.completion_tokens >= 2 and reply.usage.prompt_tokens == expected(
        real_model, [{"role": "user", "content": QUESTION}], 1)[1]


def test_web_ui_chat_answers_with_the_real_model(default_server, artifacts_dir):
    from test_web_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is needed for the browser test: `make browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(default_server + "/")
        page.wait_for_function("document.querySelector('#chat-model input')?.value?.startsWith('SmolLM2')")
        # Sliders untouched, "Model defaults" ticked: the engine samples as the import shipped (greedy,
        # repetition penalty 1.2), so the answer is the model's one greedy answer. (Typing a temperature
        # raced the checkbox's untick in CI: the send could carry the unticked box with the old slider.)
        page.get_by_text("Parameters").first.click()  # the chat tab's sampling accordion
        assert page.get_by_label("Model defaults").first.is_checked()
        page.locator("#chat-input textarea").fill(QUESTION)
        page.locator("#chat-send").click()
        page.wait_for_function(
            "document.querySelectorAll('#chat-bot [data-testid=\"bot\"]').length"
            " && !document.querySelector('#chat-status').innerText.includes('answering')")
        answer = page.locator("#chat-bot [data-testid='bot']").last.inner_text().strip()
        page.screenshot(path=str(artifacts_dir / "web_chat_real_model.png"))
        browser.close()
    assert "Paris" in answer, answer
