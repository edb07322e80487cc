"""`vicuna recipe demo`: the whole Vicuna recipe at toy scale, on a laptop CPU.

Data (chatterbot dialogs + an identity set) -> clean -> filter -> tokenizer ->
split -> train/test -> `vicuna train --config recipes/tiny-cpu.yaml` ->
held-out evaluation -> a report card, and the result copied into the package
as the bundled demo model. Each step is one of our own commands, run in
process in the order a user would type them, so the recipe doubles as an
end-to-end check of the pipeline. Deterministic given --seed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from .commands import area_parser, command
from .errors import RecipeError
from .files import replace_dir, write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
DEMO_NAME, DEMO_ORG = "Vicuna-Demo", "the vicuna project"
TEMPLATE = "vicuna_v1.1"


def add_commands(sub) -> None:
    verbs = area_parser(sub, "recipe", "end-to-end recipes")
    p = command(
        verbs, "demo", run_demo, "build the bundled demo chat model from scratch (CPU, ~10 minutes)",
        description="Run the Vicuna recipe at toy scale: chatterbot dialogs + identity set -> clean -> filter ->\n"
        "tokenizer -> split -> train/test -> train (recipes/tiny-cpu.yaml) -> evaluate -> report card.\n"
        "The model is written to --work-dir/model and, unless --no-install, copied to the package\n"
        "(src/vicuna/assets/demo-model/) where `vicuna chat` finds it by default.\n\n"
        "example:\n  vicuna recipe demo --work-dir runs/demo",
    )
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "demo"), help="where intermediate files go")
    p.add_argument("--config", default=str(ROOT / "recipes" / "tiny-cpu.yaml"), help="training recipe")
    p.add_argument("--seed", type=int, default=0, help="seed for data splits, tokenizer and training")
    p.add_argument("--no-install", action="store_true", help="do not copy the model into the package")
    p.add_argument("--force", action="store_true", help="start over in an existing --work-dir")
    p.add_argument("--max-steps", type=int, default=None, help="cut training short (a quick smoke run)")


def _step(title: str, argv: list[str]) -> None:
    from .cli import main

    print(f"==> {title}: vicuna {' '.join(argv)}", file=sys.stderr, flush=True)
    rc = main(argv)
    if rc:
        raise RecipeError(f"step failed ({title}, exit code {rc}): vicuna {' '.join(argv)}")


def run_demo(args) -> int:
    import yaml

    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        if not args.force:
            raise RecipeError(f"{work} is not empty; pass --force to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    train_file, test_file = build_demo_data(work, seed=args.seed)

    # 3. train from scratch with the CPU recipe, on our tokenizer
    recipe = yaml.safe_load(Path(args.config).read_text())
    init = dict(recipe.get("model_init") or {})
    init.pop("train_tokenizer", None)
    init["from_tokenizer"] = str(work / "tokenizer")
    recipe.update(model_init=init, seed=args.seed)
    if args.max_steps:
        recipe["max_steps"] = args.max_steps
    write_text(work / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    _step("train", ["train", "--config", str(work / "recipe.yaml"), "--data-path", str(train_file),
                    "--output-dir", str(work / "model"), "--force"])

    # 4. evaluate and write the report card
    print("==> evaluate on held-out and training dialogs", file=sys.stderr, flush=True)
    results = evaluate_demo(work / "model", train_file, test_file, seed=args.seed)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    write_json(work / "model" / "eval.json", results)
    write_report(work, results)
    from .train.trainer import write_model_card

    write_model_card(work / "model")  # now with the evaluation report

    if not args.no_install:
        from .model import demo_model_path

        install(work / "model", demo_model_path())
        print(f"installed the demo model into {demo_model_path()}", file=sys.stderr)
    print(json.dumps({k: results[k] for k in ("heldout_loss", "heldout_perplexity", "heldout_exact_rate",
                                             "train_exact_rate", "minutes")}, indent=2))
    return 0


def build_demo_data(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """Steps 1-2 of the recipe: the demo's train and held-out files (and its tokenizer) in ``work``."""
    d = lambda name: str(work / name)  # noqa: E731
    _step("chatterbot dialogs", ["data", "convert", "--from", "chatterbot", "-o", d("chatterbot.json")])
    _step("identity set", ["data", "identity", "-o", d("identity.json"), "--name", DEMO_NAME, "--org", DEMO_ORG,
                           "--seed", str(seed)])
    _step("merge", ["data", "merge", d("chatterbot.json"), d("identity.json"), "-o", d("raw.json")])
    # Dialog lines are short ("Hello" / "Hi") and the identity set names an organisation on purpose:
    # no minimum length and no blocked words for this corpus.
    _step("clean", ["data", "clean", d("raw.json"), "-o", d("clean.json"), "--report", d("clean_report.json"),
                    "--no-blocked-words", "--min-chars", "2"])
    _step("filter", ["data", "filter", d("clean.json"), "-o", d("filtered.json"), "--keep-lang", "en"])
    print("==> tokenizer: byte-level BPE on the filtered data", file=sys.stderr, flush=True)
    _train_tokenizer(work / "filtered.json", work / "tokenizer")
    _step("split", ["data", "split", d("filtered.json"), "-o", d("split.json"), "--tokenizer", d("tokenizer"),
                    "--max-length", "512", "--conv-template", TEMPLATE])
    train_file, test_file = work / "train.json", work / "test.json"
    _step("train/test", ["data", "train-test", d("split.json"), "--test-fraction", "0.05", "--seed", str(seed),
                         "--train-out", str(train_file), "--test-out", str(test_file)])
    _step("stats", ["data", "stats", str(train_file), "--tokenizer", d("tokenizer"), "--conv-template", TEMPLATE,
                    "--plot", d("lengths.png"), "--json", d("stats.json")])
    return train_file, test_file


def _train_tokenizer(data_file: Path, out: Path):
    from .conversation import VICUNA_SYSTEM
    from .tiny import train_bpe_tokenizer

    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"] * 50
    for rec in json.loads(data_file.read_text(encoding="utf-8")):
        texts.extend(turn["value"] for turn in rec["conversations"])
    tok = train_bpe_tokenizer(texts, vocab_size=2048)
    tok.save_pretrained(out)
    return tok


# ----------------------------------------------------------------------------- evaluation


def normalise(text: str) -> str:
    """Lower case, punctuation and spacing removed: the 'near-exact' answer match."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _first_exchanges(path: Path) -> list[tuple[str, str]]:
    out = []
    for rec in json.loads(path.read_text(encoding="utf-8")):
        conv = rec["conversations"]
        if len(conv) >= 2 and conv[0]["from"] == "human" and conv[1]["from"] == "gpt":
            out.append((conv[0]["value"], conv[1]["value"]))
    return out


def answer_matches(answer: str, references: set[str]) -> bool:
    return normalise(answer) in {normalise(r) for r in references}


def evaluate_demo(model_dir: Path, train_file: Path, test_file: Path, seed: int = 0, n_train: int = 20) -> dict:
    """Held-out loss/perplexity and exact-answer rates (greedy, first exchange of each dialog).

    A prompt may have several answers in the corpus ("Hello" -> "Hi" / "Hello"),
    so an answer counts when it matches any corpus answer to the same prompt.
    """
    import random

    import torch

    from .conversation import encode, render_prompt, tokenize_conversation
    from .generation import generate, sampling_params
    from .model import load_model
    from .train.dataset import load_conversations

    lm = load_model(model_dir, dtype="float32")  # the report card's loss must not depend on the CPU's bf16 support
    answers: dict[str, set[str]] = {}
    for path in (train_file, test_file):
        for q, a in _first_exchanges(path):
            answers.setdefault(q, set()).add(a)

    # loss over assistant tokens of every held-out conversation
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for messages in load_conversations(test_file):
            tc = tokenize_conversation(lm.tokenizer, lm.template, messages, max_length=lm.context_length)
            labels = torch.tensor([tc.labels])
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            out = lm.model(input_ids=torch.tensor([tc.input_ids]), labels=labels)
            total_loss += float(out.loss) * n
            total_tokens += n
    loss = total_loss / max(total_tokens, 1)

    def exact_rate(pairs):
        hits, rows = 0, []
        params = sampling_params(lm.defaults, temperature=0, max_new_tokens=96, strip_leading=True)
        for q, ref in pairs:
            ids = encode(lm.tokenizer, render_prompt(lm.template, [{"role": "user", "content": q}], lm.tokenizer))
            got = generate(lm.model, lm.tokenizer, ids, params)[0].strip()
            ok = answer_matches(got, answers.get(q, {ref}))
            hits += ok
            rows.append({"prompt": q, "reference": ref, "answer": got, "match": ok})
        return hits / max(len(pairs), 1), rows

    train_pairs = _first_exchanges(train_file)
    sample = random.Random(seed).sample(train_pairs, min(n_train, len(train_pairs)))
    train_rate, train_rows = exact_rate(sample)
    heldout_rate, heldout_rows = exact_rate(_first_exchanges(test_file))
    return {
        "heldout_loss": round(loss, 4),
        "heldout_perplexity": round(math.exp(loss), 2),
        "heldout_tokens": total_tokens,
        "heldout_exact_rate": round(heldout_rate, 3),
        "train_exact_rate": round(train_rate, 3),
        "train_samples": train_rows,
        "heldout_samples": heldout_rows[:20],
        "parameters": lm.num_parameters,
    }


def write_report(work: Path, results: dict) -> None:
    """The report card: data, training curve, evaluation."""
    clean = json.loads((work / "clean_report.json").read_text())
    info = json.loads((work / "model" / "vicuna.json").read_text()) if (work / "model" / "vicuna.json").exists() else {}
    n = lambda f: len(json.loads((work / f).read_text()))  # noqa: E731
    lines = [
        "# Demo model report card",
        "",
        f"A {results['parameters'] / 1e6:.1f}M-parameter LLaMA trained from scratch by `vicuna recipe demo` "
        f"in {results['minutes']} minutes on a CPU. It is a toy: it has memorised a small dialog corpus "
        "(chatterbot-corpus, English) and an identity set; it knows nothing else.",
        "",
        "## Data",
        "",
        "| step | conversations |",
        "|---|---|",
        f"| chatterbot dialogs | {n('chatterbot.json')} |",
        f"| identity set ({DEMO_NAME}, {DEMO_ORG}) | {n('identity.json')} |",
        f"| after clean | {n('clean.json')} |",
        f"| after filter (English) | {n('filtered.json')} |",
        f"| after split (512 tokens) | {n('split.json')} |",
        f"| train / held-out | {n('train.json')} / {n('test.json')} |",
        "",
        f"Clean report: {json.dumps(clean.get('dropped', clean.get('drops', {})))}",
        "",
        "## Training",
        "",
        "![loss curve](loss.png)",
        "",
        _training_summary(info),
        "",
        "## Evaluation (greedy)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| held-out loss (assistant tokens) | {results['heldout_loss']} |",
        f"| held-out perplexity | {results['heldout_perplexity']} |",
        f"| held-out exact-answer rate | {results['heldout_exact_rate']:.0%} |",
        f"| exact-answer rate, 20 seeded training prompts | {results['train_exact_rate']:.0%} |",
        "",
        "Exact means equal to a corpus answer for the same prompt after lower-casing and removing punctuation.",
        "",
        "| prompt | answer | match |",
        "|---|---|---|",
        *[f"| {r['prompt'][:60]} | {r['answer'][:80]} | {'yes' if r['match'] else 'no'} |"
          for r in results["train_samples"][:10]],
    ]
    write_text(work / "model" / "report.md", "\n".join(lines).replace("\r", "") + "\n")


def _training_summary(info: dict) -> str:
    train, data, cfg = info.get("train", {}), info.get("data", {}), info.get("config", {})
    init = cfg.get("model_init") or {}
    return (
        f"{train.get('steps', '?')} optimizer steps over {cfg.get('num_epochs', '?')} epochs of "
        f"{data.get('tokens', '?')} tokens ({data.get('trained_tokens', '?')} trained, assistant only); "
        f"loss {train.get('first_loss', float('nan')):.2f} -> {train.get('final_loss', float('nan')):.3f}; "
        f"model: hidden {init.get('hidden_size', '?')}, {init.get('num_layers', '?')} layers, "
        f"template {info.get('conv_template', '?')}."
    )


def install(model_dir: Path, target: Path) -> None:
    """Copy what serving needs (weights, tokenizer, configs, report) into the package, atomically."""
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "vicuna.json", "eval.json", "report.md", "loss.png",
            "README.md"}
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name in keep:
            shutil.copy2(f, tmp / f.name)
    # A memorising toy answers best greedily: say so, so `vicuna chat` defaults to it.
    gen = json.loads((tmp / "generation_config.json").read_text())
    gen["do_sample"] = False
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    replace_dir(tmp, target)
