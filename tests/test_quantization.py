"""--quantization int8: the int8 layer against a float reference, the real model's quality, the flag end to end."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from torch import nn

from conftest import cli_server, run_cli
from vicuna.quantize import PACKED_MAX_ROWS, Int8Linear, quantize_int8

PASSAGE = ("The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre museum and the river "
           "Seine. Many people visit the city every year to see its museums, parks and old buildings, and to eat "
           "in its restaurants and cafes.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, so the dequantize path
@pytest.mark.parametrize("rows", [1, 5, PACKED_MAX_ROWS + 3])  # the last: prefill-sized, dequantize path
def test_int8_linear_equals_dequantized_reference(dtype, in_features, rows):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24, bias=True).to(dtype)
    q = Int8Linear.from_linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (24,)
    x = torch.randn(1, rows, in_features, dtype=dtype)
    reference = x.double() @ q.dequantized(torch.float64).T + linear.bias.double()
    y = q(x)
    assert y.dtype == dtype and y.shape == (1, rows, 24)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: output rounding (8 mantissa bits)
    assert (y.double() - reference).abs().max() <= tolerance * reference.abs().max()
    expected_packed = in_features % 16 == 0 and rows <= PACKED_MAX_ROWS
    assert q.uses_packed_kernel(x) == expected_packed
    # and the quantization itself is close to the float weights: half a step per row (a whole one in bf16,
    # whose scales are themselves rounded to 8 bits)
    step = q.scales.double()[:, None] * (0.5 if dtype == torch.float32 else 1.0)
    assert ((q.dequantized(torch.float64) - linear.weight.double()).abs() <= step + 1e-6).all()


def test_quantize_replaces_the_decoder_projections_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = model.config.num_hidden_layers
    assert quantize_int8(model) == 7 * layers
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Int8Linear)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 7 * layers


def _perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.mark.slow
def test_real_model_int8_quality(real_model_dir):
    """SmolLM2 with int8 projections (float32 activations, so only the weights differ) answers "Paris"
    greedily, and its perplexity on a short passage stays within 2% of the float32 model's."""
    from vicuna.model import load_model

    int8 = load_model(real_model_dir, device="cpu", dtype="float32", quantization="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 7 * 30
    float32 = load_model(real_model_dir, device="cpu", dtype="float32")
    base, quant = _perplexity(float32.model, float32.tokenizer, PASSAGE), _perplexity(int8.model, int8.tokenizer,
                                                                                       PASSAGE)
    assert abs(quant - base) / base < 0.02, (base, quant)
    prompt = int8.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = int8.model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = int8.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_serve_quantization_int8_over_http(tiny_model_dir):
    with cli_server("serve", "--model-path", tiny_model_dir, "--quantization", "int8", "--kv-cache-memory", "64MiB",
                    "--dtype", "float32") as server:
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"model": tiny_model_dir.name, "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert "int8 weight-only quantization" in server.log.read_text()


@pytest.mark.parametrize("args, message", [
    (["--quantization", "int4"], "invalid choice: 'int4'"),
    (["--quantization", "int8", "--lora", "some-adapter"], "merge the adapter first"),
    (["--quantization", "int8", "--backend", "llamacpp"], "for the hf backend"),
])
def test_serve_bad_quantization_exits_2(tiny_model_dir, args, message):
    proc = run_cli("serve", "--model-path", tiny_model_dir, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_chat_takes_quantization(tiny_model_dir):
    proc = run_cli("chat", "--model-path", tiny_model_dir, "--quantization", "int8", "--max-new-tokens", "4",
                   input="hi\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
