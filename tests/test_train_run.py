"""`vicuna train` end to end: output dir, bad input, resume after SIGKILL/SIGTERM, LoRA, FSDP, learning."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, run_cli
from vicuna.conversation import get_template, render_prompt, resolve_template, stop_token_ids
from vicuna.errors import TrainInputError
from vicuna.train.checkpoint import complete_checkpoints
from vicuna.train.config import load_recipe, make_config
from vicuna.train.trainer import train, write_model_card

ROOT = Path(__file__).resolve().parents[1]
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Say hello.", "Hello! How can I help you today?"),
      ("Add 2 and 3.", "2 + 3 = 5"),
      ("Who are you?", "I am a helpful assistant."),
      ("Name a color.", "Blue, like the sky."),
      ("What does the fox do?", "The quick brown fox jumps over the lazy dog."),
      ("Count to five.", "1 2 3 4 5"),
      ("Write a function that adds.", "def add(a, b): return a + b")]


def write_data(path: Path, n_repeat=3, multi_turn=True) -> Path:
    recs = []
    for r in range(n_repeat):
        for i, (q, a) in enumerate(QA):
            conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q}, {"from": "gpt", "value": a}]
            if multi_turn and i % 2:
                q2, a2 = QA[(i + 1) % len(QA)]
                conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
            recs.append({"id": f"{r}-{i}", "conversations": conv})
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.json")


def args_for(base, data, out, *extra):
    return ["train", "--model-path", base, "--data-path", data, "--output-dir", out, "--max-length", "128",
            "--learning-rate", "3e-3", "--per-device-batch-size", "2", "--seed", "7", *map(str, extra)]


def _cfg_from_args(args):
    from vicuna.cli import build_parser
    from vicuna.train.config import config_from_args

    return config_from_args(build_parser(["train"]).parse_args([str(a) for a in args]))


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


def complete(out):
    """Complete checkpoints, newest first."""
    return complete_checkpoints(Path(out))[0]


def log_rows(out):
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- output


def test_trained_model_dir_is_complete_and_loadable(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    p = run_cli(*args_for(tiny_model_dir, data_file, out, "--max-steps", 6, "--save-steps", 3,
                          "--conv-template", "llama-3"), check=True)
    assert "24/24 conversations kept" in p.stderr
    # the template is embedded in tokenizer_config.json, and eos ids are the template's stop ids
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "vicuna template: llama-3" in tok_cfg["chat_template"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert resolve_template(tokenizer=tok).name == "llama-3"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stop_token_ids(get_template("llama-3"), tok) and len(gen["eos_token_id"]) == 2
    meta = json.loads((out / "vicuna.json").read_text())
    assert meta["conv_template"] == "llama-3" and meta["data"]["kept"] == 24 and meta["train"]["steps"] == 6
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "real_token_share", "mfu"} <= rows[0].keys()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-3"]
    model = AutoModelForCausalLM.from_pretrained(out)  # loads as is; and the weights moved from the base
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    # a finished model is never overwritten without --force
    p = run_cli(*args_for(tiny_model_dir, data_file, out, "--max-steps", 6))
    assert p.returncode == 2 and "already holds a trained model" in p.stderr and "--force" in p.stderr


def test_help_explains_inputs_outputs_and_examples():
    p = run_cli("train", "--help", check=True)
    for s in ("--model-path", "--data-path", "--output-dir", "--lora", "torchrun", "Examples", "(default: 2048)"):
        assert s in p.stdout


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken_model_dir(tiny_model_dir, tmp_path_factory):
    """A model dir whose weights are garbage: only data errors may come before loading them."""
    d = tmp_path_factory.mktemp("broken")
    for f in Path(tiny_model_dir).iterdir():
        shutil.copy(f, d / f.name)
    (d / "model.safetensors").write_bytes(b"garbage")
    return d


def _cfg(base, data, out, **kw):
    return make_config(None, {"model_path": str(base), "data_path": str(data), "output_dir": str(out),
                              "max_length": 128, "max_steps": 1, **kw})


@pytest.mark.parametrize("content,msg", [
    (None, "no such file"),
    ("[]", "no records"),
    ('[{"prompt": "hi", "completion": "yo"}]', "wrong format"),
    ('[{"conversations": [{"from": "human", "value": "no answer"}]}]', "no usable conversation"),
    ('[{"conversations": [{"from": "human", "value": "q"}]}, {"conver', "malformed JSON"),
])
def test_bad_data_fails_before_the_model_is_loaded(broken_model_dir, tmp_path, content, msg):
    data = tmp_path / "d.json"
    if content is not None:
        data.write_text(content)
    with pytest.raises(TrainInputError, match=msg):
        train(_cfg(broken_model_dir, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exit_codes(broken_model_dir, data_file, tmp_path):
    p = run_cli(*args_for(broken_model_dir, tmp_path / "missing.json", tmp_path / "o"))
    assert p.returncode == 2 and "missing.json: no such file" in p.stderr and "Traceback" not in p.stderr
    # good data, broken weights: now the model load fails (exit 1), so data really came first
    p = run_cli(*args_for(broken_model_dir, data_file, tmp_path / "o"))
    assert p.returncode == 1 and "cannot load the model" in p.stderr


def test_max_length_beyond_positions_needs_rope_scaling(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(TrainInputError, match=r"beyond the model's 512 positions.*--rope-scaling linear:2"):
        train(_cfg(tiny_model_dir, data_file, tmp_path / "a", max_length=1024))
    # a tokenizer whose own chat template is not a registered one needs --conv-template
    from transformers import AutoTokenizer

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    tok = AutoTokenizer.from_pretrained(foreign)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (foreign / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(foreign, save_jinja_files=False)
    with pytest.raises(TrainInputError, match="pass --conv-template"):
        train(_cfg(foreign, data_file, tmp_path / "c"))
    out = train(_cfg(tiny_model_dir, data_file, tmp_path / "b", max_length=1024, rope_scaling="linear:2"))
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 1024


def test_bad_settings_are_clear(tmp_path):
    with pytest.raises(TrainInputError, match="unknown setting 'learning_rat'"):
        (tmp_path / "r.yaml").write_text("learning_rat: 1e-3\n")
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(TrainInputError, match="--data-path is required"):
        make_config({"model_path": "x", "output_dir": "o"})
    with pytest.raises(TrainInputError, match="lr_scheduler"):
        make_config({"model_path": "x", "output_dir": "o", "data_path": "d", "lr_scheduler": "step"})


def test_vicuna_recipes_have_the_vicuna_hyperparameters():
    for name in ("vicuna-7b", "vicuna-13b"):
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        cfg = make_config(r, {"data_path": "d.json", "output_dir": "o"})
        assert (cfg.learning_rate, cfg.num_epochs, cfg.lr_scheduler, cfg.warmup_ratio, cfg.weight_decay,
                cfg.max_length, cfg.fsdp, cfg.gradient_checkpointing) == (
            2e-5, 3, "cosine", 0.03, 0.0, 2048, "full_shard", True)
        assert cfg.per_device_batch_size * cfg.gradient_accumulation_steps * 8 == 128
    cfg = make_config(load_recipe(ROOT / "recipes" / "tiny-cpu.yaml"), {"data_path": "d.json", "output_dir": "o"})
    assert cfg.model_init["hidden_size"] and cfg.model_path is None


# ----------------------------------------------------------------------------- resume


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "vicuna", *map(str, args)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    common = ("--max-steps", 12, "--save-steps", 2, "--save-total-limit", 2, "--gradient-accumulation-steps", 2)
    ref = tmp_path / "ref"
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, ref, *common)))  # in-process: same code, faster

    out = tmp_path / "out"
    proc = _popen(args_for(tiny_model_dir, data_file, out, *common, "--throttle", 0.4))
    _wait_for(out / "checkpoint-6" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "vicuna.json").exists()
    done = {int(c.name.split("-")[1]) for c in complete(out)}
    assert done and 6 <= max(done) < 12
    # debris of a crash mid-save must be ignored: shards without a manifest, an empty checkpoint dir
    shutil.rmtree(out / "checkpoint-10", ignore_errors=True)
    shutil.copytree(out / f"checkpoint-{max(done)}", out / "checkpoint-10", ignore=shutil.ignore_patterns("manifest*"))
    (out / "checkpoint-99").mkdir()

    p = run_cli(*args_for(tiny_model_dir, data_file, out, *common), check=True)
    assert f"resumed from {out / f'checkpoint-{max(done)}'}" in p.stderr
    assert "checkpoint-99 is incomplete: no manifest.json" in p.stderr
    assert [c.name for c in complete(out)] == ["checkpoint-10", "checkpoint-8"]  # the debris was rewritten
    assert_same_weights(ref, out)
    a, b = log_rows(ref), log_rows(out)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["lr"] - y["lr"]) < 1e-12 for x, y in zip(a, b))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resumes(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    common = ("--max-steps", 8, "--save-steps", 0)
    proc = _popen(args_for(tiny_model_dir, data_file, out, *common, "--throttle", 0.3))
    _wait_for(out / "train_log.jsonl", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Run the same command again" in err
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and complete(out) == ckpts
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 8
    run_cli(*args_for(tiny_model_dir, data_file, out, *common), check=True)
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))
    assert (out / "vicuna.json").exists()


# ----------------------------------------------------------------------------- LoRA


def test_lora_adapter_is_saved_alone_and_loads_on_the_base(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "lora"
    args = args_for(tiny_model_dir, data_file, out, "--lora", "--lora-r", 4, "--lora-target", "q_proj,v_proj",
                    "--max-steps", 4, "--save-steps", 2, "--learning-rate", "5e-2", "--gradient-checkpointing",
                    "--no-packing")
    run_cli(*args, check=True)
    # the adapter's checkpoint (trainable weights + optimizer only) resumes to the same adapter
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train(_cfg_from_args([str(resumed) if a == out else a for a in args]))
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(any(t in k for t in ("q_proj", "v_proj")) for k in adapter)
    assert json.loads((out / "vicuna.json").read_text())["lora"] is True
    from vicuna.model import load_model

    base = load_model(tiny_model_dir, device="cpu")
    tuned = load_model(tiny_model_dir, device="cpu", lora=out)
    ids = torch.tensor([base.tokenizer("USER: hi ASSISTANT:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(base.model(ids).logits, tuned.model(ids).logits)
    # a LoRA checkpoint consolidates to an adapter folder in PEFT's own naming, which loads on the base
    run_cli("weights", "consolidate", out / "checkpoint-2", "-o", tmp_path / "step-2", check=True)
    assert load_file(str(tmp_path / "step-2" / "adapter_model.safetensors")).keys() == adapter.keys()
    load_model(tiny_model_dir, device="cpu", lora=tmp_path / "step-2")


# ----------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tiny_model_dir, data_file, tmp_path):
    common = ("--max-steps", 4, "--save-steps", 2)
    fsdp = tmp_path / "fsdp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vicuna.train", *args_for(tiny_model_dir, data_file, fsdp, *common, "--fsdp", "full_shard")[1:]]
    p = subprocess.run(torchrun, env={**cli_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    single = tmp_path / "single"
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, single, *common, "--gradient-accumulation-steps", 2)))
    a, b = log_rows(fsdp), log_rows(single)
    assert len(a) == len(b) == 4
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4
               for x, y in zip(a, b))
    assert_same_weights(fsdp, single, atol=1e-5)
    assert complete(fsdp) == [fsdp / "checkpoint-2"]
    from vicuna.model import load_model

    loaded = load_model(fsdp, device="cpu")
    assert loaded.template.name == "vicuna_v1.1"
    # an FSDP checkpoint resumes under FSDP to the same weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    cmd = [str(resumed) if str(a) == str(fsdp) else a for a in torchrun]
    p = subprocess.run(cmd, env={**cli_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    assert_same_weights(fsdp, resumed, atol=1e-6)
    # ... and in one process: DCP reshards the 2-rank checkpoint, the run ends on the same weights
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", one / "checkpoint-2")
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, one, *common, "--gradient-accumulation-steps", 2)))
    assert_same_weights(fsdp, one, atol=1e-5)
    # the 2-rank checkpoint consolidates to the weights of the single process's checkpoint at the same step
    for run in (fsdp, single):
        run_cli("weights", "consolidate", run / "checkpoint-2", "-o", run / "step-2", check=True)
    assert_same_weights(fsdp / "step-2", single / "step-2", atol=1e-5)


# ----------------------------------------------------------------------------- it learns


@pytest.mark.slow
def test_tiny_model_learns_the_conversations(tmp_path):
    """A fresh tiny LLaMA (tokenizer trained on the data) memorises the answers."""
    data = write_data(tmp_path / "qa.json", n_repeat=1, multi_turn=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model_init: {train_tokenizer: {kind: bpe, vocab_size: 400}, hidden_size: 64, num_layers: 2, num_heads: 4,"
        " max_position_embeddings: 128}\n"
        "conv_template: vicuna_v1.1\nmax_length: 128\nnum_epochs: 40\nlearning_rate: 1.0e-2\nwarmup_ratio: 0.05\n"
        "per_device_batch_size: 1\nsave_steps: 0\nlogging_steps: 10\n"
    )
    out = tmp_path / "out"
    run_cli("train", "--config", recipe, "--data-path", data, "--output-dir", out, check=True)
    rows = log_rows(out)
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"], (rows[0], rows[-1])
    from vicuna.model import load_model

    lm = load_model(out, device="cpu")
    tok, t = lm.tokenizer, lm.template
    right = 0
    for q, a in QA:
        prompt = render_prompt(t, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], tok)
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        gen = lm.model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=stop_token_ids(t, tok))
        right += tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip() == a
    assert right >= len(QA) - 1, right


# ----------------------------------------------------------------------------- save / log intervals


@pytest.mark.parametrize("save_steps,logging_steps", [(s, g) for s in (0, 1, 2, 4) for g in (1, 3, 5, 9)])
def test_every_save_and_log_interval_combination_finishes(tiny_model_dir, data_file, tmp_path, save_steps,
                                                          logging_steps):
    """A checkpoint (and the loss plot it refreshes) never depends on a log line having been written: a save
    before the first --logging-steps boundary used to crash on the missing train_log.jsonl."""
    out, total = tmp_path / "out", 5
    train(_cfg(tiny_model_dir, data_file, out, max_steps=total, save_steps=save_steps, logging_steps=logging_steps,
               save_total_limit=10, per_device_batch_size=2))
    assert [r["step"] for r in log_rows(out)] == sorted({*range(logging_steps, total + 1, logging_steps), total})
    saved = sorted(int(c.name.split("-")[1]) for c in complete(out))
    assert saved == (list(range(save_steps, total, save_steps)) if save_steps else [])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "vicuna.json").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_model_card_beside_the_trained_model(tiny_model_dir, data_file, tmp_path, lora):
    import yaml

    out = tmp_path / "out"
    train(_cfg(tiny_model_dir, data_file, out, max_steps=3, lora=lora, per_device_batch_size=2))
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == Path(tiny_model_dir).name  # a name, never a local path
    assert str(tiny_model_dir) not in text
    assert front["library_name"] == ("peft" if lora else "transformers") and "sft" in front["tags"]
    meta = json.loads((out / "vicuna.json").read_text())
    assert f"| {Path(data_file).name} | 24 | 24 | {meta['data']['tokens']} |" in text
    assert "Steps: 3" in text and f"final loss: {meta['train']['final_loss']}" in text
    assert ("| lora_r | 8 |" in text) == lora and "## Evaluation" not in text
    (out / "report.md").write_text("# Report\n\nheld-out exact rate 0.75\n")  # an evaluation written later
    write_model_card(out)
    assert "## Evaluation" in (out / "README.md").read_text() and "exact rate 0.75" in (out / "README.md").read_text()


def test_base_model_name_is_never_a_local_path(tmp_path):
    from vicuna.train.trainer import base_model_name

    assert base_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    d = tmp_path / "smol"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert base_model_name(str(d)) == "smol"
    (d / "vicuna.json").write_text(json.dumps({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert base_model_name(str(d)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name(None) is None
