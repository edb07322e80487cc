"""Training at scale, on CPU: sharded checkpoints, their completeness and safety, resharding, consolidation,
memory per rank (measured against the dry-run estimate), guards.

Tiny models where behaviour matters and speed does; SmolLM2-135M for the memory figures.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cli_env, run_cli
from test_train_run import (_cfg_from_args, args_for, assert_same_weights, complete, log_rows, weights,
                            write_data)
from vicuna.errors import TrainError, TrainInputError
from vicuna.train.checkpoint import FILE_BYTES, MANIFEST, file_hash, problem
from vicuna.train.trainer import dry_run, train

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ("--max-steps", 5, "--save-steps", 2, "--save-total-limit", 2, "--gradient-accumulation-steps", 2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.json")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_file, tmp_path_factory):
    """The same 5-step run twice: checkpoints written in the background, and in the foreground."""
    root = tmp_path_factory.mktemp("runs")
    background, foreground = root / "async", root / "sync"
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, background, *SCHEDULE, "--async-save")))
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, foreground, *SCHEDULE)))
    return background, foreground


def test_background_saves_write_the_same_checkpoints(runs):
    background, foreground = runs
    assert [c.name for c in complete(background)] == ["checkpoint-4", "checkpoint-2"]
    assert_same_weights(background, foreground, atol=0)
    for name in ("checkpoint-2", "checkpoint-4"):
        a, b = (sorted((r / name / "state").glob("*.safetensors")) for r in runs)
        assert [f.name for f in a] == [f.name for f in b]
        for fa, fb in zip(a, b):
            ta, tb = load_file(str(fa)), load_file(str(fb))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_checkpoint_is_json_and_safetensors_listed_in_its_manifest(runs):
    ckpt = runs[0] / "checkpoint-4"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert files == set(manifest["files"]) | {MANIFEST}
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # nothing that gets unpickled
    for rel, meta in manifest["files"].items():
        assert (ckpt / rel).stat().st_size == meta["bytes"] and file_hash(ckpt / rel) == meta["xxh3_128"]
    shards = sorted((ckpt / "state").glob("*.safetensors"))
    keys = set().union(*(load_file(str(f)).keys() for f in shards))
    assert any(k.startswith("model.") for k in keys) and any(k.endswith(".exp_avg_sq") for k in keys)
    assert all(f.stat().st_size < FILE_BYTES for f in shards)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["micro_batches_per_step"]) == (4, 1, 2)
    assert (ckpt / "rng" / "rank-00000.json").exists() and (ckpt / "model" / "config.json").exists()
    assert "chat_template" in json.loads((ckpt / "model" / "tokenizer_config.json").read_text())
    assert problem(ckpt) is None


def _largest_shard(ckpt: Path) -> Path:
    return max((ckpt / "state").glob("*.safetensors"), key=lambda f: f.stat().st_size)


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_consistently(ckpt: Path) -> None:
    """Garbage in a shard's header, with the manifest updated to match: only loading can tell."""
    shard = _largest_shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"!" * 32
    shard.write_bytes(bytes(data))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][shard.relative_to(ckpt).as_posix()]["xxh3_128"] = file_hash(shard)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated shard": (lambda c: os.truncate(_largest_shard(c), _largest_shard(c).stat().st_size // 2),
                        r"state/shard-\S+\.safetensors has \d+ bytes, the manifest says \d+"),
    "bad JSON, same size": (lambda c: _flip_first_byte(c / "trainer_state.json"),
                            "trainer_state.json does not match its hash"),
    "empty optimizer file": (lambda c: (c / "optimizer.json").write_text(""), "optimizer.json has 0 bytes"),
    "no manifest (upload cut short)": (lambda c: (c / MANIFEST).unlink(), "no manifest.json"),
    "unreadable manifest": (lambda c: (c / MANIFEST).write_text("{"), "manifest.json is unreadable"),
    "shard that does not load": (_corrupt_consistently, "cannot be loaded: its shards do not load"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(runs, tiny_model_dir, data_file, tmp_path,
                                                                    caplog, kind):
    corrupt, message = CORRUPTIONS[kind]
    out = tmp_path / "out"
    shutil.copytree(runs[0], out)
    corrupt(out / "checkpoint-4")
    caplog.set_level("INFO", logger="vicuna")
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, out, *SCHEDULE, "--force")))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("checkpoint-4 ") and re.search(message, w) for w in warnings), warnings
    assert any(f"resumed from {out / 'checkpoint-2'}" in r.getMessage() for r in caplog.records)
    assert_same_weights(runs[0], out)  # the resumed run redid steps 3-5 exactly
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3, 4, 5]


def test_resume_of_a_named_incomplete_checkpoint_is_refused(runs, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs[0], out)
    os.truncate(_largest_shard(out / "checkpoint-4"), 10)
    with pytest.raises(TrainInputError, match=r"--resume .*checkpoint-4: not a complete checkpoint: state/shard"):
        train(_cfg_from_args(args_for(tiny_model_dir, data_file, out, *SCHEDULE, "--force",
                                      "--resume", out / "checkpoint-4")))
    # every checkpoint unusable: an error, not a silent fresh start
    _corrupt_consistently(out / "checkpoint-2")
    with pytest.raises(TrainError, match="no checkpoint in .* could be loaded"):
        train(_cfg_from_args(args_for(tiny_model_dir, data_file, out, *SCHEDULE, "--force")))


class _Payload:
    """Unpickling this creates a file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payloads_in_a_checkpoint_never_run(runs, tiny_model_dir, data_file, tmp_path, caplog):
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    shutil.copytree(runs[0], out)
    payload = _Payload(marker)
    # round one's format (torch.load'ed with weights_only=False), and DCP's pickled metadata, next to the real files
    for name in ("scheduler.pt", "optimizer.pt", "rng.pt", "model.pt"):
        torch.save({"state": payload}, out / "checkpoint-4" / name)
    (out / "checkpoint-4" / "state" / ".metadata").write_bytes(pickle.dumps(payload))
    old = out / "checkpoint-5"  # a whole checkpoint in the old format, newer than the others
    old.mkdir()
    (old / "trainer_state.json").write_text(json.dumps({"step": 5, "world_size": 1}))
    for name in ("scheduler.pt", "optimizer.pt", "rng.pt", "model.pt"):
        torch.save({"state": payload}, old / name)
    caplog.set_level("INFO", logger="vicuna")
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, out, *SCHEDULE, "--force", "--max-steps", 6)))
    assert any("checkpoint-5 is incomplete: no manifest.json" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)
    with pytest.raises(TrainInputError, match="checkpoint-5: not a complete checkpoint: no manifest.json"):
        train(_cfg_from_args(args_for(tiny_model_dir, data_file, out, *SCHEDULE, "--force", "--resume", old)))
    assert not marker.exists()


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and a tmpfs mount (user namespaces)")
def test_a_full_disk_during_a_save_is_a_clear_error(tiny_model_dir, data_file, tmp_path):
    """The output dir on a 700 KB tmpfs (a real full disk, in a private mount namespace): logs fit, a checkpoint
    does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = " ".join(f"'{a}'" for a in args_for(tiny_model_dir, data_file, disk / "out", "--max-steps", 4,
                                               "--save-steps", 2))
    script = (f"mount -t tmpfs -o size=700k tmpfs '{disk}' && {sys.executable} -m vicuna {args}; rc=$?; "
              f"echo LISTING; ls -a '{disk}/out'; exit $rc")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=cli_env(),
                       timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "cannot write checkpoint" in p.stderr and "disk full" in p.stderr and "Free some space" in p.stderr
    assert "Traceback" not in p.stderr and "unexpected pos" not in p.stderr
    listing = p.stdout.split("LISTING", 1)[1].split()
    assert "checkpoint-2" not in listing and "train_log.jsonl" in listing  # the partial checkpoint is gone


def test_qlora_with_fsdp_is_refused_up_front(tiny_model_dir, data_file, tmp_path):
    env = {**cli_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    cmd = [sys.executable, "-m", "vicuna", *map(str, args_for(tiny_model_dir, data_file, tmp_path / "o", "--qlora"))]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--qlora does not combine with FSDP" in p.stderr and "--fsdp none" in p.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 2 ranks


def _torchrun(*args, **kw):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vicuna.train", *map(str, args)]


@pytest.mark.slow
def test_fsdp_run_killed_mid_way_resumes_to_the_uninterrupted_weights(tiny_model_dir, data_file, tmp_path):
    common = ("--max-steps", 8, "--save-steps", 2, "--fsdp", "full_shard", "--per-device-batch-size", 1)
    ref = tmp_path / "ref"  # one process, 4 accumulation steps: the global batch of 2 ranks x 2
    train(_cfg_from_args(args_for(tiny_model_dir, data_file, ref, *common, "--gradient-accumulation-steps", 4)))
    out = tmp_path / "out"
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    common = (*common, "--gradient-accumulation-steps", 2)  # FSDP reduce-scatters after each micro-batch
    cmd = _torchrun(*args_for(tiny_model_dir, data_file, out, *common, "--throttle", 0.5)[1:])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "checkpoint-4" / MANIFEST).exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() - t0 < 240, "no checkpoint-4"
            time.sleep(0.05)
    finally:  # the VM is gone: torchrun and both ranks (each in its own session) die at once
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "vicuna.json").exists()
    cmd = _torchrun(*args_for(tiny_model_dir, data_file, out, *common)[1:])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[:3000]
    assert_same_weights(ref, out, atol=1e-5)
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))


# ----------------------------------------------------------------------------- consolidate


def test_consolidate_writes_a_loadable_model_and_refuses_bad_input(runs, tmp_path):
    ckpt = runs[1] / "checkpoint-4"
    out = tmp_path / "hf"
    p = run_cli("weights", "consolidate", ckpt, "-o", out, check=True)
    assert "wrote the model" in p.stdout
    from transformers import AutoModelForCausalLM

    from vicuna.model import load_model

    model = AutoModelForCausalLM.from_pretrained(out)
    state = {k.removeprefix("model."): v for f in sorted((ckpt / "state").glob("*.safetensors"))
             for k, v in load_file(str(f)).items() if k.startswith("model.")}
    assert set(weights(out)) == set(state)
    assert all(torch.equal(weights(out)[k], state[k]) for k in state)
    assert model.lm_head.weight.shape[0] == state["lm_head.weight"].shape[0]
    assert load_model(out, device="cpu").template.name == "vicuna_v1.1"
    half = tmp_path / "bf16"
    run_cli("weights", "consolidate", ckpt, "-o", half, "--dtype", "bfloat16", check=True)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in weights(half).values()} == {torch.bfloat16}
    p = run_cli("weights", "consolidate", ckpt, "-o", out)
    assert p.returncode == 2 and "--force" in p.stderr
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.truncate(_largest_shard(broken), 100)
    p = run_cli("weights", "consolidate", broken, "-o", tmp_path / "x")
    assert p.returncode == 2 and "not a complete training checkpoint" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- recipes and deploy


LLAMA2 = {"7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
          "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40}}


def _llama2_dir(tmp_path: Path, size: str) -> Path:
    d = tmp_path / f"llama-2-{size}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, **LLAMA2[size]}))
    return d


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_recipe_comments_carry_the_dry_run_arithmetic(tmp_path, size):
    from vicuna.train.config import load_recipe, make_config

    recipe = ROOT / "recipes" / f"vicuna-{size}.yaml"
    text = recipe.read_text()
    base = _llama2_dir(tmp_path, size)
    for world, claimed in re.findall(r"#\s+(\d+) GPUs: .*?= ([\d.]+) GB per GPU", text):
        cfg = make_config(load_recipe(recipe), {"model_path": str(base)}, planning=True)
        plan, table = dry_run(cfg, int(world))
        assert abs(plan.total / 1e9 - float(claimed)) < 0.05, (world, claimed, table)
    assert re.findall(r"#\s+8 GPUs: ", text), "the recipe should state the 8-GPU figure"
    p = run_cli("train", "--config", recipe, "--model-path", base, "--dry-run", "--world-size", 8, check=True)
    assert "peak per rank (estimate)" in p.stdout and "gradient checkpointing" in p.stdout


def test_skypilot_installs_torch_then_the_package_then_flash_attn():
    task = yaml.safe_load((ROOT / "deploy" / "sky-train-vicuna-7b.yaml").read_text())
    pips = [line.strip() for line in task["setup"].splitlines() if re.match(r"\s*(python -m )?pip3? install", line)]
    assert len(pips) >= 3, pips
    torch_i = next(i for i, c in enumerate(pips) if re.search(r"\btorch\b", c))
    pkg_i = next(i for i, c in enumerate(pips) if re.search(r"install (-e )?\.( |$)|install -e \.", c))
    fa_i = next(i for i, c in enumerate(pips) if "flash-attn" in c)
    assert torch_i < pkg_i < fa_i, pips
    assert "--no-build-isolation" in pips[fa_i] and "flash-attn" not in pips[pkg_i] and "torch" not in pips[fa_i]


# ----------------------------------------------------------------------------- memory, SmolLM2-135M

MEASURE = (  # run a command; print its exit code and the peak RSS of its largest process (KiB on Linux)
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


@pytest.fixture(scope="module")
def memory_runs(real_model_dir, tmp_path_factory):
    """2 steps at 256 tokens of SmolLM2-135M: one process (2 accumulation steps), and FSDP on 2 ranks (the same
    global batch). Returns {name: (peak RSS of the largest process in bytes, output dir)}."""
    root = tmp_path_factory.mktemp("memory")
    data = write_data(root / "qa.json")
    train = ["--model-path", real_model_dir, "--data-path", data, "--conv-template", "chatml", "--max-length", 256,
             "--per-device-batch-size", 1, "--max-steps", 2, "--save-steps", 0, "--learning-rate", "1e-4"]
    cmds = {"one": [sys.executable, "-m", "vicuna", "train", *train, "--gradient-accumulation-steps", 2],
            "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "vicuna.train", *train, "--fsdp", "full_shard"]}
    out = {}
    for name, cmd in cmds.items():
        p = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd), "--output-dir", str(root / name)],
                           capture_output=True, text=True, env={**cli_env(), "OMP_NUM_THREADS": "1"}, timeout=900)
        rc, kib = p.stdout.split()
        assert rc == "0", p.stderr[-3000:]
        out[name] = (int(kib) * 1024, root / name)
    return out


def _memory(run) -> dict:
    return json.loads((run[1] / "vicuna.json").read_text())["train"]["memory"]


@pytest.mark.real_model
@pytest.mark.slow
def test_sharded_loading_trains_the_same_model_with_tied_embeddings(memory_runs):
    one, fsdp = memory_runs["one"][1], memory_runs["fsdp"][1]
    a, b = log_rows(one), log_rows(fsdp)
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-4 and abs(a[1]["loss"] - b[1]["loss"]) < 1e-4  # loaded right
    assert "lm_head.weight" not in weights(fsdp)  # the tied weight is stored once, as Hugging Face does
    assert_same_weights(one, fsdp, atol=1e-4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.real_model
@pytest.mark.slow
def test_fsdp_per_rank_memory_is_at_most_0_6_of_one_process(memory_runs):
    """Net of the interpreter and libraries (RSS growth from just before the model is built, per rank) the ratio
    is ~0.57; raw peaks, which include ~0.4 GB of Python + torch in every process, ~0.63. Not reachable for this
    model at 2 ranks: much below 0.55, as its tied 28M-parameter embedding stays unsharded all step."""
    one, fsdp = _memory(memory_runs["one"]), _memory(memory_runs["fsdp"])
    assert max(fsdp["peak_gb_per_rank"]) <= 0.6 * one["peak_gb_per_rank"][0], (fsdp, one)
    assert memory_runs["fsdp"][0] <= 0.7 * memory_runs["one"][0]


@pytest.mark.real_model
@pytest.mark.slow
def test_dry_run_is_within_25_percent_of_the_measured_peak(memory_runs, real_model_dir):
    for name, world in (("one", 1), ("fsdp", 2)):
        measured = max(_memory(memory_runs[name])["peak_gb_per_rank"])
        extra = ["--gradient-accumulation-steps", 2] if world == 1 else []
        p = run_cli("train", "--model-path", real_model_dir, "--max-length", 256, "--per-device-batch-size", 1,
                    "--dry-run", "--world-size", world, *extra, check=True)
        estimate = float(re.search(r"peak per rank \(estimate\)\s+([\d.]+) GB", p.stdout).group(1))
        assert abs(estimate - measured) <= 0.25 * measured, (name, estimate, measured, p.stdout)
        assert estimate == pytest.approx(_memory(memory_runs[name])["estimate"]["total_gb"], abs=0.01)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_activation_arithmetic_matches_what_autograd_saves(kv_heads):
    """One LLaMA decoder layer's saved tensors, counted by saved_tensors_hooks (2 layers minus 1, packed rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicuna.train.memory import layer_activation_bytes, layer_shape

    tokens = 96

    def saved_bytes(layers: int) -> int:
        config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, 300, (1, tokens))
        packed = torch.cat([torch.arange(tokens // 2), torch.arange(tokens // 2)])[None]  # two samples in a row
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=packed, use_cache=False)
        return sum(storages.values())

    measured = (saved_bytes(2) - saved_bytes(1)) / tokens
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=300)
    estimate = layer_activation_bytes(layer_shape(config), compute_bytes=4, masked=True, row_tokens=tokens)
    assert estimate == pytest.approx(measured, rel=0.01)
