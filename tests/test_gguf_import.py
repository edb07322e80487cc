"""`vicuna weights import-gguf`: a GGUF file becomes a normal Hugging Face folder."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def _gguf(path, arch: str) -> None:
    """A tiny GGUF file declaring ``arch`` (header, metadata and one tensor), written with the gguf package."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.real_model
def test_imported_default_model_is_a_plain_hf_folder(real_model_dir, real_model):
    from safetensors import safe_open

    cfg = json.loads((real_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    with safe_open(real_model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # stored once: tied
    m = real_model.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    gen = json.loads((real_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["do_sample"] is False
    tok = real_model.tokenizer
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert real_model.stop_token_ids == [2]


@pytest.mark.real_model
def test_cli_import_in_bfloat16_refuses_to_overwrite_without_force(real_model_dir, tmp_path):
    from vicuna.weights.gguf import default_gguf

    src = default_gguf()
    out = tmp_path / "smol-bf16"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run_cli("weights", "import-gguf", src, "-o", out)
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    proc = run_cli("weights", "import-gguf", src, "-o", out, "--dtype", "bfloat16", "--force", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "dequantizing to bfloat16" in proc.stderr  # progress goes to stderr
    assert "tied embeddings" in proc.stdout and "stop ids [2]" in proc.stdout
    assert not (out / "keep.txt").exists() and not list(tmp_path.glob(".smol-bf16*"))  # replaced whole, no leftovers

    from safetensors import safe_open

    from vicuna.model import load_model

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    lm = load_model(out, device="cpu", dtype="bfloat16")
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert lm.tokenizer.chat_template == json.loads(
        (real_model_dir / "tokenizer_config.json").read_text()).get("chat_template", lm.tokenizer.chat_template)


def test_unsupported_architecture_is_named(tmp_path):
    _gguf(tmp_path / "enc.gguf", "bert")
    proc = run_cli("weights", "import-gguf", tmp_path / "enc.gguf", "-o", tmp_path / "out")
    assert proc.returncode == 1
    assert "architecture 'bert'" in proc.stderr and "--backend llamacpp" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_inputs_are_usage_errors(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    proc = run_cli("weights", "import-gguf", tmp_path / "x.gguf", "-o", tmp_path / "out")
    assert proc.returncode == 2 and "not a GGUF file" in proc.stderr
    proc = run_cli("weights", "import-gguf", tmp_path / "missing.gguf", "-o", tmp_path / "out")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("weights", "import-gguf", tmp_path / "x.gguf")
    assert proc.returncode == 2 and "-o DIR" in proc.stderr
    proc = run_cli("weights", "import-gguf", "--default", "-o", tmp_path / "out")
    assert proc.returncode == 2 and "give no FILE or -o" in proc.stderr


def test_end_of_turn_tokens_of_the_chat_template_join_eos(bpe_tokenizer):
    """A Llama-3-style model whose GGUF EOS is <|end_of_text|> still stops on the template's <|eot_id|>."""
    from vicuna.weights.gguf import end_of_turn_ids

    tok = bpe_tokenizer
    vocab = tok.get_vocab()
    if "<|eot_id|>" not in vocab:
        pytest.skip("the test tokenizer lacks <|eot_id|>")
    old = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
        assert end_of_turn_ids(tok) == [tok.eos_token_id, vocab["<|eot_id|>"]]
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert end_of_turn_ids(tok) == [tok.eos_token_id]
    finally:
        tok.chat_template = old
