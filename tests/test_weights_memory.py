"""Peak memory of `vicuna weights apply-delta --low-mem` on a ~220 MB, 4-shard model.

The checkpoints are written straight with safetensors (random float32 tensors
with LLaMA names and a config.json) — instantiating a model would cost more
than the test.  Peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` in a fresh
wrapper process (so earlier children do not count), minus the peak of the
same command on a tiny checkpoint: interpreter, torch and our imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from safetensors import safe_open
from safetensors.torch import save_file

MEASURE = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"  # KiB on Linux
)


def llama_specs(hidden: int, layers: int, vocab: int, inter: int):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            yield f"{p}self_attn.{n}_proj.weight", (hidden, hidden)
        yield f"{p}mlp.gate_proj.weight", (inter, hidden)
        yield f"{p}mlp.up_proj.weight", (inter, hidden)
        yield f"{p}mlp.down_proj.weight", (hidden, inter)
        yield f"{p}input_layernorm.weight", (hidden,)
        yield f"{p}post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_checkpoint(folder: Path, *, hidden: int, layers: int, vocab: int, inter: int, shards: int, seed: int):
    """A sharded float32 LLaMA-like checkpoint (index + config.json); returns the shard files."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    specs = list(llama_specs(hidden, layers, vocab, inter))
    total = sum(torch.Size(s).numel() * 4 for _, s in specs)
    groups: list[list] = [[]]
    size = 0
    for name, shape in specs:
        n = torch.Size(shape).numel() * 4
        if groups[-1] and size + n > total / shards * 1.02 and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    weight_map, files = {}, []
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch.randn(s, generator=g) * 0.02 for n, s in group}, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
        files.append(folder / fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
              "vocab_size": vocab, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return files


def peak_rss_mib(*args) -> float:
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "vicuna", "weights", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    rc, kib = out.stdout.split()
    assert rc == "0", out.stderr
    return int(kib) / 1024


@pytest.mark.slow
def test_low_mem_apply_delta_peak_rss_stays_near_one_shard(tmp_path):
    big = dict(hidden=512, layers=15, vocab=8000, inter=1376, shards=4)  # ~222 MB per checkpoint
    base_files = write_checkpoint(tmp_path / "base", seed=0, **big)
    delta_files = write_checkpoint(tmp_path / "delta", seed=1, **big)
    tiny = dict(hidden=16, layers=1, vocab=64, inter=32, shards=4)
    write_checkpoint(tmp_path / "tiny-base", seed=0, **tiny)
    write_checkpoint(tmp_path / "tiny-delta", seed=1, **tiny)

    model_mib = sum(f.stat().st_size for f in delta_files) / 2**20
    largest_mib = max(f.stat().st_size for f in base_files + delta_files) / 2**20
    assert model_mib > 200 and len(delta_files) >= 4

    overhead = peak_rss_mib("apply-delta", "--base", tmp_path / "tiny-base", "--delta", tmp_path / "tiny-delta",
                            "--target", tmp_path / "tiny-out", "--low-mem")
    peak = peak_rss_mib("apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta",
                        "--target", tmp_path / "out", "--low-mem")
    used = peak - overhead
    print(f"model {model_mib:.0f} MiB, largest shard {largest_mib:.0f} MiB, "
          f"overhead {overhead:.0f} MiB, --low-mem peak above it {used:.0f} MiB")
    assert used < 1.5 * largest_mib, f"--low-mem used {used:.0f} MiB above idle (largest shard {largest_mib:.0f})"

    # and it did the work: spot-check a tensor from the middle of the model
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(out_index.values())) >= 4
    name = "model.layers.7.mlp.up_proj.weight"

    def get(folder: Path, fname: str):
        with safe_open(str(folder / fname), "pt") as f:
            return f.get_tensor(name)

    src_map = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    want = get(tmp_path / "base", src_map[name]) + get(tmp_path / "delta", src_map[name])
    assert torch.equal(get(tmp_path / "out", out_index[name]), want)
