"""`vicuna weights`: delta round trips, error paths, convert, LoRA merge, fix-tokens, verify.

Everything runs through the CLI on tiny models saved to disk — in-process
(``vicuna.cli.main``) to spare a torch import per call, and as a real
subprocess where the exit code and stderr of the process are the point.
Results are read back with safetensors / transformers, not our own reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file


def vicuna(*args, check: bool = False):
    """`vicuna ARGS` in this process; returns what run_cli returns (returncode, stdout, stderr)."""
    from vicuna.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    proc = SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"vicuna {' '.join(map(str, args))} failed ({rc}):\n{proc.stderr}")
    return proc


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if any(m in p.name for m in (".tmp-", ".old-", ".partial"))]


def finetune(src: Path, dst: Path, *, seed: int, scale: float = 0.01, extra_tokens=(), independent=False,
             dtype=torch.float32) -> Path:
    """A 'fine-tuned' copy of src: small updates (or, independent=True, fresh random weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
        model.resize_token_embeddings(len(tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if independent:
                p.copy_(noise * p.std().clamp_min(1e-3))
            else:
                p.add_(noise * scale)
    model.to(dtype).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    return Path(tiny_model_dir)


@pytest.fixture(scope="module")
def target_dir(base_dir, tmp_path_factory):
    """A fine-tune of the base with two added tokens (extra embedding and lm_head rows)."""
    return finetune(base_dir, tmp_path_factory.mktemp("w") / "target", seed=1, extra_tokens=["<extra_a>", "<extra_b>"])


@pytest.fixture(scope="module")
def delta_dir(base_dir, target_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "delta"
    proc = vicuna("weights", "make-delta", "--base", base_dir, "--target", target_dir, "--delta", out,
                   "--max-shard-size", "200KB", check=True)
    assert "bit for bit" in proc.stdout and "no delta in their dtype" not in proc.stdout, proc.stdout
    assert "2 extra rows" in proc.stdout
    return out


# ---------------------------------------------------------------------------- delta round trips


@pytest.mark.parametrize("low_mem", [True, False], ids=["low-mem", "plain"])
def test_delta_round_trip_is_bit_exact_in_float32_with_extra_vocab_rows(base_dir, target_dir, delta_dir, tmp_path,
                                                                      low_mem):
    out = tmp_path / "applied"
    args = ["weights", "apply-delta", "--base", base_dir, "--delta", delta_dir, "--target", out]
    run_cli(*args, *(["--low-mem"] if low_mem else []), check=True)
    want, got = read_weights(target_dir), read_weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert bits_equal(want[name], got[name]), name
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == read_weights(base_dir)["model.embed_tokens.weight"].shape[0] + 2
    # the delta carries the target's tokenizer and config; sharding follows the delta's (several shards + index)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["vocab_size"] == emb.shape[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == emb.shape[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_input_embeddings().weight, want["model.embed_tokens.weight"])


def test_delta_is_the_difference_and_extra_rows_are_stored_as_is(base_dir, target_dir, delta_dir):
    base, target, delta = read_weights(base_dir), read_weights(target_dir), read_weights(delta_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(delta[name], target[name] - base[name])
    rows = base["lm_head.weight"].shape[0]
    assert torch.equal(delta["lm_head.weight"][rows:], target["lm_head.weight"][rows:])
    assert len(list(delta_dir.glob("*.safetensors"))) > 1


@pytest.fixture(scope="module")
def f16_pair(base_dir, tmp_path_factory):
    """(base, target) in float16 with independent weights: t - b is inexact for many values."""
    w = tmp_path_factory.mktemp("f16")
    vicuna("weights", "convert", "--dtype", "float16", base_dir, w / "base16", check=True)
    return w / "base16", finetune(base_dir, w / "target16", seed=2, independent=True, dtype=torch.float16)


def test_float16_round_trip_is_exact_with_corrections_and_within_rounding_without(f16_pair, tmp_path):
    """make-delta stores the values t - b cannot carry exactly, so apply-delta is bit for bit; base + delta
    alone (FastChat's apply) stays within rounding."""
    base16, target16 = f16_pair
    delta = tmp_path / "delta16"
    proc = vicuna("weights", "make-delta", "--base", base16, "--target", target16, "--delta", delta, "--low-mem",
                   check=True)
    assert "bit for bit" in proc.stdout and "values have no delta in their dtype" in proc.stdout, proc.stdout
    want, base = read_weights(target16), read_weights(base16)
    out = tmp_path / "out16"
    proc = vicuna("weights", "apply-delta", "--base", base16, "--delta", delta, "--target", out, "--low-mem",
                  check=True)
    assert "set exactly from the delta's corrections" in proc.stdout
    got = read_weights(out)
    assert all(bits_equal(want[k], got[k]) for k in want)
    assert not (out / "delta_corrections.safetensors").exists()  # the target is a plain model folder

    (delta / "delta_corrections.safetensors").unlink()  # a plain target - base delta, as FastChat writes them
    out = tmp_path / "out16-plain"
    vicuna("weights", "apply-delta", "--base", base16, "--delta", delta, "--target", out, "--low-mem", check=True)
    got = read_weights(out)
    inexact = 0
    for name, t in want.items():
        g, b = got[name], base[name]
        assert g.dtype == torch.float16
        err = (g.float() - t.float()).abs()
        # two float16 roundings: of d = t - b (|d| <= |t| + |b|) and of the sum (~|t|)
        bound = torch.finfo(torch.float16).eps * (2 * t.float().abs() + b.float().abs()) + 2**-24
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
        inexact += int((err > 0).sum())
    assert inexact > 0  # the test exercises rounding, not only exact cases


def test_interrupted_make_delta_keeps_the_corrections_of_finished_shards(f16_pair, tmp_path, monkeypatch):
    from vicuna.weights.checkpoint import Checkpoint

    base16, target16 = f16_pair
    real_get, calls = Checkpoint.get, []

    def flaky_get(self, name):
        calls.append(name)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_get(self, name)

    delta = tmp_path / "delta"
    args = ["weights", "make-delta", "--base", base16, "--target", target16, "--delta", delta, "--low-mem",
            "--max-shard-size", "50KB"]
    monkeypatch.setattr(Checkpoint, "get", flaky_get)
    assert vicuna(*args).returncode == 130
    assert list((tmp_path / ".delta.partial").glob("*.safetensors"))  # some shards finished before Ctrl+C
    monkeypatch.setattr(Checkpoint, "get", real_get)
    assert "resumed:" in vicuna(*args, check=True).stdout
    out = tmp_path / "out"
    vicuna("weights", "apply-delta", "--base", base16, "--delta", delta, "--target", out, "--low-mem", check=True)
    want, got = read_weights(target16), read_weights(out)
    assert all(bits_equal(want[k], got[k]) for k in want)


def test_apply_delta_reads_old_bin_checkpoints(base_dir, delta_dir, target_dir, tmp_path):
    old = tmp_path / "llama-bin"
    old.mkdir()
    torch.save(read_weights(base_dir), old / "pytorch_model.bin")
    shutil.copy(base_dir / "config.json", old / "config.json")
    out = tmp_path / "from-bin"
    vicuna("weights", "apply-delta", "--base", old, "--delta", delta_dir, "--target", out, "--low-mem", check=True)
    want, got = read_weights(target_dir), read_weights(out)
    assert all(bits_equal(want[k], got[k]) for k in want)


def test_interrupted_apply_delta_resumes_from_finished_shards(base_dir, delta_dir, target_dir, tmp_path,
                                                              monkeypatch):
    from vicuna.weights.checkpoint import Checkpoint

    real_get, calls = Checkpoint.get, []

    def flaky_get(self, name):
        calls.append(name)
        if len(calls) == 25:
            raise KeyboardInterrupt  # Ctrl+C in the middle of the run
        return real_get(self, name)

    def args(target, shard_size="100KB"):
        return ["weights", "apply-delta", "--base", base_dir, "--delta", delta_dir, "--target", target, "--low-mem",
                "--max-shard-size", shard_size]

    out = tmp_path / "out"
    monkeypatch.setattr(Checkpoint, "get", flaky_get)
    assert vicuna(*args(out)).returncode == 130
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    finished = {f.name: f.stat().st_ino for f in partial.glob("*.safetensors")}
    assert finished and list(partial.glob("*.part"))  # some shards done, one cut short

    monkeypatch.setattr(Checkpoint, "get", real_get)
    proc = vicuna(*args(out), check=True)
    assert "resumed:" in proc.stdout
    for name, inode in finished.items():  # finished shards were kept, not rewritten
        assert (out / name).stat().st_ino == inode
    want, got = read_weights(target_dir), read_weights(out)
    assert want.keys() == got.keys() and all(bits_equal(want[k], got[k]) for k in want)
    assert no_leftovers(tmp_path) == [] and not list(out.glob(".*"))

    # a leftover from other settings is not mixed in
    monkeypatch.setattr(Checkpoint, "get", flaky_get)
    calls.clear()
    assert vicuna(*args(tmp_path / "out2", "150KB")).returncode == 130
    monkeypatch.setattr(Checkpoint, "get", real_get)
    proc = vicuna(*args(tmp_path / "out2", "200KB"), check=True)
    assert "resumed:" not in proc.stdout
    got = read_weights(tmp_path / "out2")
    assert all(bits_equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("low_mem", [True, False], ids=["low-mem", "plain"])
def test_apply_delta_with_tied_weights_in_bin_files_adds_once(tmp_path, low_mem):
    """Old .bin files store tied embeddings/lm_head as one storage; in-place adds must not run twice."""
    for name, seed in (("base", 0), ("delta", 1)):
        (tmp_path / name).mkdir()
        w = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
        torch.save({"embed.weight": w, "lm_head.weight": w, "norm.weight": torch.ones(4)},
                   tmp_path / name / "pytorch_model.bin")
    out = tmp_path / "out"
    vicuna("weights", "apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta", "--target", out,
           *(["--low-mem"] if low_mem else []), check=True)
    base = torch.load(tmp_path / "base" / "pytorch_model.bin")
    delta = torch.load(tmp_path / "delta" / "pytorch_model.bin")
    got = read_weights(out)
    for k in ("embed.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(got[k], base[k] + delta[k]), k


# ---------------------------------------------------------------------------- errors leave nothing behind


def _assert_clean_failure(proc, target: Path, *needles: str, code: int = 2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)
    assert not target.exists()
    assert no_leftovers(target.parent) == []


def test_shape_mismatch_names_the_tensor(base_dir, delta_dir, tmp_path):
    bad = tmp_path / "bad-delta"
    shutil.copytree(delta_dir, bad)
    shard = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = load_file(bad / shard[name])
    tensors[name] = torch.zeros(64, 32)
    save_file(tensors, bad / shard[name], metadata={"format": "pt"})
    target = tmp_path / "out"
    proc = vicuna("weights", "apply-delta", "--base", base_dir, "--delta", bad, "--target", target, "--low-mem")
    _assert_clean_failure(proc, target, "shape mismatch", repr(name), "[64, 64]", "[64, 32]")


def test_missing_shard_names_the_file(base_dir, delta_dir, tmp_path):
    bad = tmp_path / "bad-delta"
    shutil.copytree(delta_dir, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    target = tmp_path / "out"
    proc = vicuna("weights", "apply-delta", "--base", base_dir, "--delta", bad, "--target", target)
    _assert_clean_failure(proc, target, victim.name, "missing")


def test_truncated_shard_names_the_file(base_dir, delta_dir, tmp_path):
    bad = tmp_path / "bad-delta"
    shutil.copytree(delta_dir, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "out"
    proc = run_cli("weights", "apply-delta", "--base", base_dir, "--delta", bad, "--target", target, "--low-mem")
    _assert_clean_failure(proc, target, victim.name, "truncated")


def test_failure_midway_leaves_no_partial_output(tiny_model_dir, tmp_path):
    """The last tensor overflows float16: shards were already being written when it fails."""
    src = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, src)
    tensors = load_file(src / "model.safetensors")
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last] * 0 + 1e6
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    target = tmp_path / "out"
    proc = vicuna("weights", "convert", "--dtype", "float16", "--max-shard-size", "100KB", src, target)
    _assert_clean_failure(proc, target, repr(last), "bfloat16", code=1)


def test_existing_target_needs_force(base_dir, delta_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    args = ["weights", "apply-delta", "--base", base_dir, "--delta", delta_dir, "--target", target, "--low-mem"]
    proc = vicuna(*args)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (target / "keep.txt").read_text() == "mine"
    vicuna(*args, "--force", check=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors.index.json").exists()
    assert no_leftovers(tmp_path) == []
    proc = vicuna("weights", "apply-delta", "--base", base_dir, "--delta", delta_dir, "--target", delta_dir / "x")
    assert proc.returncode == 2 and "must not" in proc.stderr


# ---------------------------------------------------------------------------- convert, merge-lora


def test_convert_bfloat16_then_back(tiny_model_dir, tmp_path):
    bf = tmp_path / "bf16"
    vicuna("weights", "convert", "--dtype", "bfloat16", tiny_model_dir, bf, check=True)
    src, got = read_weights(tiny_model_dir), read_weights(bf)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)) for k in src)
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    assert (bf / "tokenizer.json").exists() and (bf / "chat_template.jinja").exists()
    back = tmp_path / "fp32"
    vicuna("weights", "convert", "--dtype", "float32", bf, back, check=True)
    assert all(torch.equal(read_weights(back)[k], got[k].float()) for k in src)


def test_merge_lora_matches_peft_outputs(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    merged = tmp_path / "merged"
    vicuna("weights", "merge-lora", "--base", tiny_model_dir, "--lora", adapter, "--target", merged, check=True)
    assert not (merged / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    got = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        want, out, before = ref(ids).logits, got(ids).logits, plain(ids).logits
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(out, before, atol=1e-3)  # the adapter changed something
    proc = vicuna("weights", "merge-lora", "--base", tiny_model_dir, "--lora", tiny_model_dir,
                  "--target", tmp_path / "x")
    assert proc.returncode == 2 and "adapter_config.json" in proc.stderr


# ---------------------------------------------------------------------------- fix-tokens


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_fix_tokens_repairs_wrong_generation_eos(model_copy):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_copy)
    wrong = tok.convert_tokens_to_ids("Ġthe") if "Ġthe" in tok.get_vocab() else 100
    _edit_json(model_copy / "generation_config.json", eos_token_id=wrong)
    proc = vicuna("weights", "fix-tokens", model_copy, "--check")
    assert proc.returncode == 1 and "eos_token_id" in proc.stdout, proc.stdout
    assert GenerationConfig.from_pretrained(model_copy).eos_token_id == wrong  # --check wrote nothing
    proc = vicuna("weights", "fix-tokens", model_copy, check=True)
    assert f"eos_token_id {wrong} -> {tok.eos_token_id}" in proc.stdout
    assert GenerationConfig.from_pretrained(model_copy).eos_token_id == tok.eos_token_id
    proc = vicuna("weights", "fix-tokens", model_copy, "--check")
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout


def test_fix_tokens_fills_blank_bos_eos_and_config_ids(model_copy):
    from transformers import AutoTokenizer

    _edit_json(model_copy / "tokenizer_config.json", bos_token="", eos_token="")
    _edit_json(model_copy / "config.json", pad_token_id=7, vocab_size=999)  # its bos/eos ids stay right
    proc = vicuna("weights", "fix-tokens", model_copy, "--check")
    assert proc.returncode == 1
    vicuna("weights", "fix-tokens", model_copy, check=True)
    tok = AutoTokenizer.from_pretrained(model_copy)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    cfg = json.loads((model_copy / "config.json").read_text())
    assert cfg["pad_token_id"] == tok.pad_token_id != 7 and cfg["vocab_size"] == 512
    assert vicuna("weights", "fix-tokens", model_copy, "--check").returncode == 0


def test_fix_tokens_writes_the_chosen_chat_template(model_copy):
    from transformers import AutoTokenizer

    from vicuna.conversation import get_template, resolve_template

    (model_copy / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(model_copy).chat_template is None
    proc = vicuna("weights", "fix-tokens", model_copy, "--check")
    assert proc.returncode == 1 and "--conv-template" in proc.stdout  # the folder name tells nothing
    vicuna("weights", "fix-tokens", model_copy, "--conv-template", "chatml", check=True)
    tok = AutoTokenizer.from_pretrained(model_copy)
    assert tok.chat_template == get_template("chatml").to_jinja()
    assert resolve_template(tokenizer=tok).name == "chatml"
    # chatml ends turns with <|im_end|>: it joins EOS among the stop ids
    eos = json.loads((model_copy / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert vicuna("weights", "fix-tokens", model_copy, "--check").returncode == 0


def test_fix_tokens_reports_tokenizer_larger_than_embedding_and_resizes_on_request(model_copy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_copy)
    tok.add_tokens(["<added_pad>"])
    tok.save_pretrained(model_copy)
    before = read_weights(model_copy)
    proc = vicuna("weights", "fix-tokens", model_copy)
    assert proc.returncode == 1
    assert "513 tokens" in proc.stdout and "512 rows" in proc.stdout and "<added_pad>" in proc.stdout
    assert read_weights(model_copy)["lm_head.weight"].shape[0] == 512  # weights untouched without the flag

    vicuna("weights", "fix-tokens", model_copy, "--resize-embeddings", check=True)
    after = read_weights(model_copy)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == (513, 64)
        assert torch.equal(after[name][:512], before[name])
        assert torch.allclose(after[name][512], before[name].mean(0))
    assert all(torch.equal(after[k], before[k]) for k in before if "embed" not in k and "lm_head" not in k)
    assert json.loads((model_copy / "config.json").read_text())["vocab_size"] == 513
    assert vicuna("weights", "fix-tokens", model_copy, "--check").returncode == 0
    assert no_leftovers(model_copy.parent) == []
    vicuna("weights", "verify", model_copy, "--no-checksum", check=True)  # loads and runs with 513 rows


# ---------------------------------------------------------------------------- verify


def test_verify_reports_shards_checksums_and_forward(delta_dir, tmp_path, base_dir):
    out = tmp_path / "applied"
    vicuna("weights", "apply-delta", "--base", base_dir, "--delta", delta_dir, "--target", out, "--low-mem",
            "--max-shard-size", "300KB", check=True)
    proc = vicuna("weights", "verify", out, "--json", check=True)
    r = json.loads(proc.stdout)
    weights = read_weights(out)
    assert r["parameters"] == sum(t.numel() for t in weights.values())
    assert r["dtypes"] == {"float32": r["parameters"]}
    files = sorted(out.glob("*.safetensors"))
    assert [s["file"] for s in r["shards"]] == [f.name for f in files] and len(files) >= 2
    for s, f in zip(r["shards"], files):
        assert s["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and s["bytes"] == f.stat().st_size
    assert r["forward"]["logits_shape"][-1] == 514 and r["forward"]["prompt"] == "chat template"
    human = vicuna("weights", "verify", out, "--no-checksum", check=True).stdout
    assert "forward:    ok" in human and f"{r['parameters']:,}" in human


def test_verify_fails_on_nan_weights(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    proc = vicuna("weights", "verify", model_copy)
    assert proc.returncode == 1 and "NaN" in proc.stderr and "Traceback" not in proc.stderr
