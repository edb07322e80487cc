"""Preference tuning: the losses agree with TRL's DPOTrainer (the test-only reference) on a fixed batch, and
`vicuna train --objective dpo` trains on pairs through the SFT loop."""

import json
import math
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from vicuna.conversation import IGNORE_INDEX, get_template
from vicuna.errors import TrainInputError
from vicuna.train.config import make_config
from vicuna.train.dataset import PROMPT_TOO_LONG, DataStats, tokenize_pairs
from vicuna.train.preference import preference_loss
from vicuna.train.trainer import train



def _trl_loss(logps, ref_chosen, ref_rejected, completion_mask, *, beta, loss_type):
    """Run TRL's own DPOTrainer._compute_loss on precomputed per-token log-probs.

    The model is a stand-in returning those log-probs (what TRL's fused LM head returns: zero outside the answer);
    everything from the log-probs to the loss is TRL's code.
    """
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    b2, seq = logps.shape
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros(b2, seq), mean_logits=torch.zeros(b2, seq),
                              is_top1=torch.zeros(b2, seq, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    gather = lambda t: t if torch.is_tensor(t) else torch.tensor(t)  # noqa: E731  (one process)
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather, gather=gather),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    call = lambda **kw: outputs  # noqa: E731
    inputs = {"input_ids": torch.zeros(b2, seq + 1, dtype=torch.long), "attention_mask": torch.ones(b2, seq + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, call, inputs, False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.1), ("ipo", 0.1),
                                            ("dpo", 0.3)])
def test_loss_and_rewards_match_trl(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    pairs, seq = 4, 9
    completion_mask = torch.zeros(2 * pairs, seq + 1, dtype=torch.long)
    for r, start in enumerate([3, 5, 2, 6, 4, 4, 7, 1]):  # answers of different lengths after the prompt
        completion_mask[r, start:] = 1
    per_token = -torch.rand(2 * pairs, seq, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref_chosen = -torch.rand(pairs, generator=g, dtype=torch.float64) * 10
    ref_rejected = -torch.rand(pairs, generator=g, dtype=torch.float64) * 10
    want, metrics = _trl_loss(per_token, ref_chosen, ref_rejected, completion_mask, beta=beta,
                              loss_type="sigmoid" if loss_type == "dpo" else loss_type)

    logps = per_token.sum(1)
    tokens = completion_mask.sum(1).double()
    got = preference_loss(logps[:pairs], logps[pairs:], ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                          chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:])
    assert abs(got.loss.item() - want.item()) < 1e-5 and want.item() > 0
    m = got.metrics()
    for ours, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")):
        assert abs(m[ours] - metrics[theirs][-1]) < 1e-5, ours


def test_bad_settings_are_refused():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(t, t, t, t, beta=0)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(t, t, t, t, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="token counts"):
        preference_loss(t, t, t, t, beta=0.1, loss_type="ipo")


# ----------------------------------------------------------------------------- `vicuna train --objective dpo`

GOOD = ["Hello! I am a helpful assistant.", "Hello! How can I help you today?", "I am a helpful assistant."]
BAD = ["1 2 3 4 5 6 7 8 9 10 numbers", "{too} [that] (and) quotes", "; punctuation 9 8 7"]
QUESTIONS = ["What is the capital of France?", "Say hello.", "Add 2 and 3.", "Who are you?", "Name a color."]


def write_pairs(path, n=16):
    """Pairs whose chosen answers are always polite sentences and rejected ones number/punctuation noise."""
    recs = [{"prompt": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
             "chosen": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
             "rejected": [{"role": "assistant", "content": BAD[i % len(BAD)]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(base, data, out, **kw):
    return make_config(None, {"model_path": str(base), "data_path": str(data), "output_dir": str(out),
                              "objective": "dpo", "max_length": 128, "per_device_batch_size": 4, "seed": 7,
                              "learning_rate": 5e-3, "warmup_ratio": 0, "save_steps": 0, **kw})


def _rows(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_pairs_score_only_the_final_answer_and_long_prompts_are_refused(bpe_tokenizer):
    template = get_template("vicuna_v1.1")
    prompt = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "Who are you?"}]
    stats = DataStats(unit="pairs")
    long_prompt = [{"role": "user", "content": "Count to five. " * 80}]
    pairs = tokenize_pairs([(prompt, GOOD[0], BAD[0]), (long_prompt, GOOD[0], BAD[0])], bpe_tokenizer, template, 128,
                           stats=stats)
    assert len(pairs) == 1 and stats.skipped == {PROMPT_TOO_LONG: 1} and stats.kept == 1
    for side, answer in ((pairs[0].chosen, GOOD[0]), (pairs[0].rejected, BAD[0])):
        scored = bpe_tokenizer.decode([x for x in side.labels if x != IGNORE_INDEX])
        assert scored.strip() == answer + "</s>"  # the history's "Paris." is context only
    # an answer cut by --max-length keeps its beginning; --drop-long drops the pair instead
    long_answer = [(prompt, "Hello! " * 100, BAD[0])]
    cut = tokenize_pairs(long_answer, bpe_tokenizer, template, 128, stats=(s := DataStats()))
    assert len(cut[0].chosen) == 128 and s.truncated == 1
    with pytest.raises(TrainInputError, match="no preference pair left"):
        tokenize_pairs(long_answer, bpe_tokenizer, template, 128, drop_long=True)


def test_dpo_lora_starts_at_ln2_and_learns_the_preference(tiny_model_dir, tmp_path):
    out = train(_cfg(tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "out", lora=True,
                     max_steps=10, gradient_accumulation_steps=2, per_device_batch_size=2, lr_scheduler="constant"))
    rows = _rows(out)
    # step 0: the policy is the reference (adapter disabled), so every pair's loss is -log sigmoid(0)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and rows[0]["margin"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["accuracy"] == 1.0 > rows[0]["accuracy"] and rows[-1]["margin"] > 0.5
    assert rows[-1]["rewards_chosen"] > 0 > rows[-1]["rewards_rejected"] and rows[-1]["loss"] < 0.5
    card = (out / "README.md").read_text()
    assert "- dpo" in card and "| beta | 0.1 |" in card and "adapter disabled" in card
    meta = json.loads((out / "vicuna.json").read_text())
    assert meta["data"]["unit"] == "pairs" and meta["train"]["final_metrics"]["accuracy"] == 1.0


@pytest.mark.parametrize("objective", ["ipo", "hinge"])
def test_the_other_losses_train_full_weights(tiny_model_dir, tmp_path, objective):
    out = train(_cfg(tiny_model_dir, write_pairs(tmp_path / "p.jsonl", n=8), tmp_path / "o", objective=objective,
                     max_steps=4, learning_rate=1e-3))
    rows = _rows(out)
    first = {"ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0}[objective]  # the loss at a zero margin
    assert abs(rows[0]["loss"] - first) < 1e-4 and rows[-1]["margin"] > 0


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Full fine-tuning: the reference is recomputed on resume from the base weights, before the checkpoint is
    loaded, so the resumed run's losses and weights are those of the uninterrupted one."""
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    kw = {"max_steps": 4, "save_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-3}
    ref = train(_cfg(tiny_model_dir, data, tmp_path / "ref", **kw))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ref / "checkpoint-2", resumed / "checkpoint-2")
    train(_cfg(tiny_model_dir, data, resumed, **kw))
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in _rows(ref)][2:]  # steps 3 and 4
    a, b = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_bad_pairs_file_is_a_clear_usage_error(tiny_model_dir, tmp_path):
    convs = tmp_path / "sharegpt.json"
    convs.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    args = ["train", "--model-path", tiny_model_dir, "--objective", "dpo", "--output-dir", tmp_path / "out"]
    p = run_cli(*args, "--data-path", convs)
    assert p.returncode == 2 and "no record has prompt/chosen/rejected" in p.stderr and "vicuna data pairs" in p.stderr
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "hi", "chosen": "yo", "rejected": "yo"}) + "\n{not json\n")
    p = run_cli(*args, "--data-path", same, "--beta", "0.5")
    assert p.returncode == 2 and "no usable preference pair" in p.stderr and "identical_answers" in p.stderr
    assert not (tmp_path / "out" / "vicuna.json").exists()


def _arithmetic_pairs(numbers):
    """Chosen: the plain answer; rejected: the same answer shouted. A feature a LoRA can learn and carry over."""
    out = []
    for a, b in numbers:
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} PLUS {b} IS {a + b}!!! OBVIOUSLY!!!"))
    return out


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_dpo_raises_held_out_preference_accuracy(real_model_dir, tmp_path):
    """30 LoRA DPO steps on SmolLM2: on pairs it never saw, the tuned adapter prefers the chosen answer (reward
    margin > 0 against the base) for >= 80% of them."""
    import random

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna.conversation import resolve_template
    from vicuna.train.dataset import collate_pairs
    from vicuna.train.distributed import Dist
    from vicuna.train.trainer import sequence_logps

    rng = random.Random(0)
    numbers = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(50)]
    train_set, held_out = _arithmetic_pairs(numbers[:40]), _arithmetic_pairs(numbers[40:])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n" for q, c, r in train_set))
    out = train(_cfg(real_model_dir, data, tmp_path / "out", lora=True, max_steps=30, per_device_batch_size=2,
                     learning_rate=1e-3, max_length=96))
    assert _rows(out)[-1]["margin"] > 0

    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(real_model_dir), out).eval()
    pairs = tokenize_pairs([([{"role": "user", "content": q}], c, r) for q, c, r in held_out], tok,
                           resolve_template(None, tokenizer=tok), 96)
    b = collate_pairs(pairs, [[i] for i in range(len(pairs))], tok.pad_token_id, packed=False)
    d = Dist(device=torch.device("cpu"))
    with torch.no_grad():
        policy = sequence_logps(model, b, d, None)
        with model.disable_adapter():
            base = sequence_logps(model, b, d, None)
    margins = (policy - base)[0::2] - (policy - base)[1::2]
    assert (margins > 0).float().mean().item() >= 0.8 and margins.mean().item() > 0


@pytest.mark.slow
def test_two_process_fsdp_dpo_matches_one_process(tiny_model_dir, tmp_path):
    """FSDP2 takes the same path: 2 ranks x 1 micro-batch give the losses, metrics and weights of 1 rank x 2."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import cli_env

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["--model-path", tiny_model_dir, "--data-path", data, "--objective", "dpo", "--max-steps", 3,
              "--per-device-batch-size", 2, "--max-length", 128, "--learning-rate", 3e-3, "--save-steps", 0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vicuna.train",
           *map(str, common), "--output-dir", str(tmp_path / "fsdp"), "--fsdp", "full_shard"]
    p = subprocess.run(cmd, env={**cli_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_cli("train", *common, "--output-dir", tmp_path / "one", "--gradient-accumulation-steps", 2, check=True)
    a, b = _rows(tmp_path / "fsdp"), _rows(tmp_path / "one")
    for key in ("loss", "margin", "accuracy", "grad_norm"):
        assert [x[key] for x in a] == pytest.approx([y[key] for y in b], abs=1e-5), key
    wa, wb = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


@pytest.mark.slow
def test_lora_dpo_killed_by_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """`vicuna train --objective dpo --lora` SIGKILLed mid-run, then run again: it resumes from the last complete
    checkpoint, and its losses and adapter weights are those of a run never interrupted."""
    import signal

    from safetensors.torch import load_file
    from test_train_run import _popen, _wait_for, log_rows

    data = write_pairs(tmp_path / "pairs.jsonl", n=8)

    def args(out, *extra):
        return ["train", "--model-path", tiny_model_dir, "--data-path", data, "--output-dir", out, "--objective",
                "dpo", "--lora", "--max-steps", 8, "--save-steps", 2, "--per-device-batch-size", 2,
                "--max-length", 128, "--learning-rate", 5e-3, "--seed", 7, *extra]

    ref = tmp_path / "ref"
    assert run_cli(*args(ref)).returncode == 0
    out = tmp_path / "out"
    proc = _popen(args(out, "--throttle", 0.4))
    _wait_for(out / "checkpoint-4" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "vicuna.json").exists()
    p = run_cli(*args(out))
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-2000:]
    a, b = log_rows(ref), log_rows(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["margin"] - y["margin"]) < 1e-5 for x, y in zip(a, b))
    wa, wb = (load_file(d / "adapter_model.safetensors") for d in (ref, out))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
