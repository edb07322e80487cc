"""The bundled demo model: what a new user sees first, and that the recipe reproduces it."""

import json
import random

import pytest

from conftest import run_cli
from vicuna.model import demo_model_path, load_model, resolve_model_path
from vicuna.recipe import _first_exchanges, answer_matches, build_demo_data, evaluate_demo, normalise

SHIPPED = demo_model_path()
GREETINGS = {"hi", "hello", "greetings", "hey", "howdy"}


def test_the_demo_model_is_shipped_small_and_self_describing():
    files = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "report.md",
            "eval.json", "loss.png"} <= files
    assert (SHIPPED / "model.safetensors").stat().st_size < 10 * 2**20  # a few MB
    lm = load_model(resolve_model_path("demo", announce=False))
    assert lm.template.name == "vicuna_v1.1" and lm.stop_token_ids == [lm.tokenizer.eos_token_id]
    assert "chat_template" in json.loads((SHIPPED / "tokenizer_config.json").read_text()) or \
        (SHIPPED / "chat_template.jinja").exists()


def test_chat_with_model_path_demo_answers_hello_and_identity():
    """`vicuna chat --model-path demo`: the bundled demo model (it ships greedy defaults)."""
    proc = run_cli("chat", "--model-path", "demo", input="Hello\nWho are you?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Using the bundled demo model" in proc.stderr
    hello, who = proc.stdout.strip().split("\n")
    assert set(normalise(hello).split()) & GREETINGS, hello
    assert "Vicuna-Demo" in who or "vicuna project" in who, who


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The recipe's data steps, rebuilt: the same train/held-out split the shipped model saw."""
    work = tmp_path_factory.mktemp("demo-data")
    return build_demo_data(work, seed=0)


def test_greedy_answers_reproduce_the_training_dialogs(demo_data):
    train_file, test_file = demo_data
    answers = {}
    for path in (train_file, test_file):
        for q, a in _first_exchanges(path):
            answers.setdefault(q, set()).add(a)
    prompts = random.Random(1234).sample(_first_exchanges(train_file), 20)
    lm = load_model(SHIPPED)
    from vicuna.conversation import encode, render_prompt
    from vicuna.generation import SamplingParams, generate

    params = SamplingParams(temperature=0, max_new_tokens=96, stop_token_ids=tuple(lm.stop_token_ids),
                            strip_leading=True)
    hits = 0
    for q, _ in prompts:
        ids = encode(lm.tokenizer, render_prompt(lm.template, [{"role": "user", "content": q}], lm.tokenizer))
        hits += answer_matches(generate(lm.model, lm.tokenizer, ids, params)[0], answers[q])
    assert hits >= 16, f"{hits}/20 greedy answers match the corpus"


def test_report_card_numbers_reproduce_on_the_shipped_model(demo_data):
    train_file, test_file = demo_data
    shipped = json.loads((SHIPPED / "eval.json").read_text())
    again = evaluate_demo(SHIPPED, train_file, test_file, seed=0)
    for key in ("heldout_loss", "heldout_perplexity", "heldout_exact_rate", "train_exact_rate"):
        assert again[key] == pytest.approx(shipped[key], abs=1e-3), key
    report = (SHIPPED / "report.md").read_text()
    assert f"| held-out perplexity | {shipped['heldout_perplexity']} |" in report


def test_eval_answer_with_the_demo_model(tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = run_cli("eval", "answer", "--model-path", "demo", "--max-tokens", "16", "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and all(r["status"] == "ok" and r["model_id"] == "demo-model" for r in rows)


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    """`vicuna recipe demo` at a few steps: every stage runs and leaves a loadable model and a report."""
    proc = run_cli("recipe", "demo", "--work-dir", tmp_path / "work", "--max-steps", "3", "--no-install",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = tmp_path / "work" / "model"
    results = json.loads((model / "eval.json").read_text())
    assert results["heldout_tokens"] > 0 and results["heldout_perplexity"] > 1
    assert "## Evaluation (greedy)" in (model / "report.md").read_text()
    assert "## Evaluation (greedy)" in (model / "README.md").read_text()  # the model card took the report in
    assert load_model(model).template.name == "vicuna_v1.1"
    again = run_cli("recipe", "demo", "--work-dir", tmp_path / "work", "--max-steps", "3", "--no-install")
    assert again.returncode == 1 and "pass --force" in again.stderr
