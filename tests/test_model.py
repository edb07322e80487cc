"""Model loading: the happy path, LoRA, and a clear error for each broken directory."""

import json
import shutil

import pytest
import torch

from vicuna.errors import ModelLoadError
from vicuna.model import cpu_has_native_bf16, load_model


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_load_tiny_model(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    assert lm.template.name == "vicuna_v1.1"  # from the chat_template saved with the tokenizer
    assert lm.stop_token_ids == [lm.tokenizer.eos_token_id]
    auto = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # a float32 checkpoint, --dtype auto
    assert lm.device == "cpu" and lm.context_length == 512 and lm.model.dtype == auto
    assert lm.name == tiny_model_dir.name and lm.num_parameters > 0
    assert load_model(tiny_model_dir, conv_template="chatml", dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(tiny_model_dir, dtype="float32").model.dtype == torch.float32


def test_auto_dtype_is_16_bit_where_the_hardware_computes_it(monkeypatch):
    """--dtype auto: bfloat16 on CPUs with AVX512-BF16 or AMX (half the bytes per decode step), float32 on others
    (where torch emulates bfloat16), and what the flag says when given."""
    import vicuna.model as model

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert model.resolve_dtype("auto", "cpu") == want
        assert model.resolve_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert model.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert model.resolve_dtype("auto", "mps") == torch.float16


def test_sentencepiece_model_loads(sp_model_dir):
    lm = load_model(sp_model_dir)
    assert type(lm.tokenizer).__name__ == "LlamaTokenizer" and lm.template.name == "vicuna_v1.1"


def test_unknown_model_without_template_is_an_error(model_copy):
    cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_copy / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="cannot tell which conversation template.*--conv-template"):
        load_model(model_copy)
    assert load_model(model_copy, conv_template="alpaca").template.name == "alpaca"


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no_config", "no config.json"),
    ("no_weights", "no weights in"),
    ("missing_shard", "missing: model-00002-of-00002.safetensors"),
    ("truncated", "cannot read the weights"),
    ("vocab", "tokenizer has 513 tokens but the model's embedding has only 512 rows"),
    ("no_eos", "no EOS token"),
])
def test_broken_directories_give_specific_errors(model_copy, breakage, message):
    path = model_copy
    if breakage == "missing":
        path = model_copy / "nope"
    elif breakage == "no_config":
        (model_copy / "config.json").unlink()
    elif breakage == "no_weights":
        (model_copy / "model.safetensors").unlink()
    elif breakage == "missing_shard":
        (model_copy / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}
        (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
        (model_copy / "model-00001-of-00002.safetensors").write_bytes(b"")
    elif breakage == "truncated":
        data = (model_copy / "model.safetensors").read_bytes()
        (model_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "vocab":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_copy)
        tok.add_special_tokens({"additional_special_tokens": ["<extra_pad>"]})
        tok.save_pretrained(model_copy)
    elif breakage == "no_eos":
        cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
        cfg["eos_token"] = None
        (model_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_device_and_quantisation_errors(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="--load-8bit needs a CUDA GPU"):
        load_model(tiny_model_dir, load_8bit=True)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
            load_model(tiny_model_dir, device="cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")


def test_lora_adapter_is_loaded_on_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; make the adapter matter
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 20]])
    expected = peft_model(ids).logits
    lm = load_model(tiny_model_dir, lora=tmp_path / "adapter", dtype="float32")
    plain = load_model(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(plain.model(ids).logits, expected, atol=1e-3)
        # on a bfloat16 base (what --dtype auto gives on GPUs and bf16 CPUs) the float32 adapter runs too
        half = load_model(tiny_model_dir, lora=tmp_path / "adapter", dtype="bfloat16").model(ids).logits
        assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), expected, atol=0.1)
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_model(tiny_model_dir, lora=tmp_path)
    with pytest.raises(ModelLoadError, match="is a LoRA adapter; pass its base"):
        load_model(tmp_path / "adapter")


def test_model_defaults_come_from_generation_config(model_copy):
    """Stops: EOS + template + generation_config eos_token_id (int or list); sampling: what the file sets."""
    from vicuna.model import model_defaults

    path = model_copy / "generation_config.json"
    cfg = json.loads(path.read_text())
    lm = load_model(model_copy)
    eos = lm.tokenizer.eos_token_id
    d = model_defaults(model_copy, lm.tokenizer, lm.template)
    assert d.stop_token_ids == (eos,) and (d.temperature, d.top_p, d.top_k) == (0.7, 1.0, 0)  # nothing shipped
    path.write_text(json.dumps({**cfg, "eos_token_id": [eos, 17, 23], "temperature": 0.6, "top_p": 0.9,
                                "top_k": 20, "repetition_penalty": 1.1}))
    d = model_defaults(model_copy, lm.tokenizer, lm.template)
    assert d.stop_token_ids == (eos, 17, 23)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    path.write_text(json.dumps({**cfg, "eos_token_id": 31, "do_sample": False, "temperature": 0.6}))
    d = model_defaults(model_copy, lm.tokenizer, lm.template)
    assert d.stop_token_ids == (eos, 31) and d.temperature == 0.0  # do_sample false: greedy
    path.write_text(json.dumps({**cfg, "top_p": 7}))  # out of range: ignored with a warning, not every request a 400
    assert model_defaults(model_copy, lm.tokenizer, lm.template).top_p == 1.0
    assert load_model(model_copy).defaults.stop_token_ids == (eos,)
