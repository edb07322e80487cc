"""The GPU verification pack (docs/gpu.md). On a CPU: the dry mode runs exactly the checks that can
run there (through the real `vicuna train`, torchrun over gloo, the engine and API) and SKIPs the
others with the reason; the bf16 resume check and the 8-bit agreement measure are exercised on the
CPU directly, negative controls included; the wheel list, the scripts and the README's GPU install
commands are checked. The GPU run itself is for a machine with a GPU."""

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

# what the dry mode can run on a CPU for real; everything else needs CUDA, 2 GPUs or a GPU wheel
RUN_ON_CPU = {"packing", "resume-fp32", "hf-engine", "fsdp-gloo"}


def _rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[1] not in ("check", "---"):
            rows[cells[1]] = cells[3]
    return rows


def _sections(text: str) -> dict[str, list[str]]:
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"## (\S+): (PASS|FAIL|SKIP)$", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name and line.startswith("- "):
            out[name].append(line[2:])
    return out


@pytest.mark.slow
def test_dry_mode_passes_only_what_it_ran(tmp_path):
    from vicuna import gpucheck

    report = tmp_path / "report.md"
    p = subprocess.run([sys.executable, "-m", "vicuna.gpucheck", "--dry", "--steps", "2", "--report", str(report)],
                       capture_output=True, text=True, env=cli_env(), timeout=1200, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    text = report.read_text()
    rows, sections = _rows(text), _sections(text)
    assert set(rows) == {c.name for c in gpucheck.CHECKS}, text
    assert rows == {name: "PASS" if name in RUN_ON_CPU else "SKIP" for name in rows}, text
    for name, status in rows.items():
        lines = sections[name]
        if status == "PASS":  # a PASS rests on verdicts and skipped nothing it names
            assert any(x.startswith("ok: ") for x in lines) and not any(x.startswith("skipped:") for x in lines)
        else:
            assert any(x.startswith("skipped: ") and len(x) > 20 for x in lines), (name, lines)
    assert "dry mode" in text and "ok: tiny on cpu, float32: 8 batched greedy answers = alone" in text
    assert "ok: tiny: resumed weights bit-equal to the uninterrupted run's (max |diff| 0)" in text
    gloo = "\n".join(sections["fsdp-gloo"])
    assert "2 ranks over gloo" in gloo and "both ranks' shards" in gloo and "sharded loading" in gloo
    assert "bit-equal" in gloo and "max |diff| 0)" in gloo
    assert "2 NCCL ranks need 2 GPUs" in "\n".join(sections["fsdp-nccl"])


def test_result_is_pass_only_with_verdicts_and_no_skip():
    from vicuna.gpucheck import FAIL, PASS, SKIP, Result

    r = Result()
    r.expect(True, "a stand-in ran")
    r.skip("the thing named needs CUDA")
    assert r.status == SKIP  # a verdict on something else does not make the row PASS
    r = Result()
    r.expect(False, "broken")
    r.skip("later")
    assert r.status == FAIL
    r = Result()
    r.note("nothing checked")
    r.finish()
    assert r.status == FAIL
    r = Result()
    r.expect(True, "checked")
    r.finish()
    assert r.status == PASS


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    """A check that raises is FAIL in the report and the exit code is 1 (never a silent PASS)."""
    from vicuna import gpucheck

    def broken(ctx, r):
        raise RuntimeError("boom")

    vllm = next(c for c in gpucheck.CHECKS if c.name == "vllm")
    monkeypatch.setattr(gpucheck, "CHECKS", [gpucheck.Check("broken", "broken on purpose", broken), vllm])
    monkeypatch.setattr(gpucheck, "prepare", lambda work: (work, work))
    report = tmp_path / "r.md"
    assert gpucheck.main(["--dry", "--report", str(report)]) == 1
    text = report.read_text()
    assert "| broken | broken on purpose | FAIL |" in text and "RuntimeError: boom" in text
    assert _rows(text)["vllm"] == "SKIP"
    assert gpucheck.main(["--only", "nosuch", "--report", str(report)]) == 2


def _cpu_context(tmp_path, steps):
    from vicuna import gpucheck

    tiny, data = gpucheck.prepare(tmp_path)
    # not dry: run what the GPU run runs, on the CPU
    return gpucheck.Context(dry=False, device="cpu", work=tmp_path, tiny=tiny, data=data, real=None, steps=steps)


@pytest.mark.slow
def test_bf16_resume_check_catches_wrong_restores(tmp_path):
    """The bf16 resume check on the CPU: a correct resume is within the bound, and resuming with AdamW's
    moments dropped or the schedule left at step 0 ends beyond it (else the check FAILs)."""
    from vicuna import gpucheck

    r = gpucheck.Result()
    gpucheck.check_resume_bf16(_cpu_context(tmp_path, 4), r)
    r.finish()
    text = "\n".join(r.lines)
    assert r.status == gpucheck.PASS, text
    assert text.count("beyond the bound") == len(gpucheck.WRONG_RESTORES) == 2
    far = [float(x) for x in re.findall(r"ends ([\d.e-]+) away", text)]
    bound = gpucheck.bf16_resume_bound(2)
    assert min(far) > 10 * bound, (far, bound)  # the bound is far from what a wrong restore does


@pytest.mark.slow
def test_8bit_agreement_measure_tells_a_trained_model_from_others(tmp_path):
    """The load-8bit check's measure on the CPU: the trained tiny model learned its set, agrees with itself in
    bf16 (as 8-bit should), and a model that lost its training (here: the untrained base) fails the bar."""
    from vicuna import gpucheck
    from vicuna.model import load_model

    ctx = _cpu_context(tmp_path, 4)
    trained, err = gpucheck.train_tiny(ctx, 200)
    assert trained, err
    fp32, bf16 = load_model(trained, device="cpu", dtype="float32"), load_model(trained, device="cpu",
                                                                                dtype="bfloat16")
    base = load_model(ctx.tiny, device="cpu", dtype="float32")
    samples, pad = gpucheck._qa_samples(fp32), fp32.tokenizer.pad_token_id or 0
    acc, _, same = gpucheck.agreement(fp32.model, bf16.model, samples, pad)
    assert acc >= gpucheck.MIN_LEARNED and same >= 0.9, (acc, same)
    _, acc_base, same_base = gpucheck.agreement(fp32.model, base.model, samples, pad)
    assert same_base < 0.9 and acc_base < gpucheck.MIN_LEARNED, (acc_base, same_base)


def test_load_8bit_goes_through_the_projects_flag(tiny_model_dir):
    """The check loads through `--load-8bit` (the serve flags), whose CPU answer is a clear error."""
    from vicuna import gpucheck
    from vicuna.errors import VicunaError

    with pytest.raises(VicunaError, match="--load-8bit needs a CUDA GPU"):
        gpucheck.load_with_flags("--model-path", tiny_model_dir, "--device", "cpu", "--load-8bit")


def test_weight_diff_is_exact():
    import torch
    from safetensors.torch import save_file

    from vicuna.gpucheck import weight_diff

    with tempfile.TemporaryDirectory() as d:
        a, b, c = (Path(d) / x for x in "abc")
        for p in (a, b, c):
            p.mkdir()
        w = torch.randn(4, 4)
        save_file({"w": w}, str(a / "model.safetensors"))
        save_file({"w": w.clone()}, str(b / "model.safetensors"))
        save_file({"w": torch.nextafter(w, w + 1)}, str(c / "model.safetensors"))  # one ulp apart
        assert weight_diff(a, b) == 0.0
        assert 0 < weight_diff(a, c) < 1e-6
        assert weight_diff(a, Path(d)) == float("inf")  # no weights at all is not "equal"


def test_gpu_check_script_is_executable_and_parses():
    for name in ("gpu_check.sh", "gpu_wheels.py"):
        assert (ROOT / "scripts" / name).stat().st_mode & 0o111, name
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    help_ = subprocess.run([sys.executable, "-m", "vicuna.gpucheck", "--help"], capture_output=True, text=True,
                           env=cli_env())
    assert help_.returncode == 0 and "--dry" in help_.stdout and "--list" in help_.stdout
    listing = subprocess.run([sys.executable, "-m", "vicuna.gpucheck", "--list"], capture_output=True, text=True,
                             env=cli_env())
    names = {ln.split()[0] for ln in listing.stdout.splitlines()}
    assert {"fsdp-nccl", "fsdp-gloo", "load-8bit", "resume-bf16"} <= names
    wheels = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--help"],
                            capture_output=True, text=True)
    assert wheels.returncode == 0 and "--have" in wheels.stdout and "--dry-run" in wheels.stdout


def _gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheel_list_comes_from_pyproject():
    gw = _gpu_wheels()
    pack, image = gw.needs(ROOT / "pyproject.toml", set())
    names = {gw.norm(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0]) for r in pack}
    # what a CUDA image with torch/transformers/peft/accelerate lacks and the pack imports
    assert {"fastapi", "uvicorn", "openai", "gguf", "bitsandbytes", "xxhash", "httpx"} <= names, names
    assert not names & {"torch", "transformers", "peft", "accelerate", "gradio", "flash-attn", "vllm"}, names
    assert {gw.norm(re.split(r"[<>=]", r)[0]) for r in image} == set(gw.IMAGE)
    pack_without, _ = gw.needs(ROOT / "pyproject.toml", {"bitsandbytes"})
    assert not any(r.startswith("bitsandbytes") for r in pack_without)


def test_image_closure_follows_torch_and_extras_but_only_direct_deps_of_the_rest():
    gw = _gpu_wheels()

    def item(name, *deps):
        return {"metadata": {"name": name, "version": "1", "requires_dist": list(deps)}}

    items = [item("torch", "filelock", "cuda-toolkit[cudart]; platform_system == 'Linux'"),
             item("cuda-toolkit", "nvidia-cuda-runtime; extra == 'cudart'", "nvidia-cufft; extra == 'cufft'"),
             item("transformers", "huggingface-hub>=1", "pytest; extra == 'testing'"),
             item("huggingface-hub", "httpx"), item("peft"), item("accelerate"), item("fastapi", "pydantic")]
    have = gw.present_in_image(items, "3.12")
    assert {"torch", "filelock", "cuda-toolkit", "nvidia-cuda-runtime", "huggingface-hub"} <= have
    assert not have & {"nvidia-cufft", "pytest", "httpx", "fastapi", "pydantic"}, have


def test_readme_gpu_install_puts_torch_first_and_flash_attn_last_without_build_isolation():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### GPU install\n+```bash\n(.*?)```", text, re.S).group(1)
    pips = [ln.split("#")[0].strip() for ln in block.splitlines() if re.search(r"\bpip3? install\b", ln)]
    assert len(pips) == 3, pips
    torch_line, pkg_line, fa_line = pips
    assert re.search(r"install \"?torch\b", torch_line) and "-e" not in torch_line and "flash" not in torch_line
    assert re.search(r"install -e '?\.(\[[\w,]+\])?'?", pkg_line), pkg_line
    extras = re.search(r"-e '?\.\[([\w,]+)\]", pkg_line)
    assert "flash-attn" not in pkg_line and not (extras and "gpu" in extras.group(1).split(",")), pkg_line
    assert "flash-attn" in fa_line and "--no-build-isolation" in fa_line and "torch" not in fa_line
    import tomllib

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    for spec in gpu:  # a version the README names is the one pyproject asks for
        name = re.split(r"[<>=]", spec)[0]
        named = re.findall(rf'"({re.escape(name)}[<>=][^"]*)"', block)
        assert all(n == spec for n in named), (named, spec)


def test_have_file_gives_names_and_pins(tmp_path):
    gw = _gpu_wheels()
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# pip freeze\ntorch==2.11.0+cu130\nPyYAML==6.0.2\n-e git+https://x/y#egg=z\nmatplotlib\n"
                      "typing_extensions==4.15.0\n")
    names, pins = gw.read_have(freeze)
    assert names == {"torch", "pyyaml", "matplotlib", "typing-extensions"}
    assert pins == ["torch==2.11.0", "PyYAML==6.0.2", "typing_extensions==4.15.0"]


def test_packing_check_tells_a_leaking_packed_row(tmp_path):
    """Packed = alone holds to far below the check's tolerance, and a packed row whose samples see each other
    (positions not restarting, so transformers builds no per-sample mask) misses it by far."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna import gpucheck
    from vicuna.model import load_model
    from vicuna.train.dataset import collate

    tiny, _ = gpucheck.prepare(tmp_path)
    lm = load_model(tiny, device="cpu", dtype="float32")
    samples, pad = gpucheck._qa_samples(lm), lm.tokenizer.pad_token_id or 0
    alone = gpucheck.sample_logits(tiny, samples, pad, "cpu", torch.float32, "sdpa", packed=False)
    packed = gpucheck.sample_logits(tiny, samples, pad, "cpu", torch.float32, "sdpa", packed=True)
    tol = 1e-5 * max(1.0, max(float(x.abs().max()) for x in alone))
    assert gpucheck.max_diff(packed, alone) < tol / 10
    batch = collate(samples, [list(range(len(samples)))], pad, packed=True)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa")
    ids = batch["input_ids"]
    with torch.no_grad():
        leaked = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0]
    start, rows = 0, []
    for s in samples:
        rows.append(leaked[start:start + len(s)])
        start += len(s)
    assert gpucheck.max_diff(rows, alone) > 100 * tol
