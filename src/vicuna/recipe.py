"""`vicuna recipe demo`: the whole Vicuna recipe at toy scale, on a laptop CPU.

Data (chatterbot dialogs + an identity set) -> clean -> filter -> tokenizer ->
split -> train/test -> `vicuna train --config recipes/tiny-cpu.yaml` ->
held-out evaluation -> a report card, and the result copied into the package
as the bundled demo model. Each step is one of our own commands, run in
process in the order a user would type them, so the recipe doubles as an
end-to-end check of the pipeline. Deterministic given --seed.

`vicuna recipe preference`: the preference loop, offline. Two LoRA adapters
with opposite styles are trained on the base; the base and both adapters
battle in the arena (the web app on 127.0.0.1, driven over HTTP by a scripted
voter or a judge model); the votes become preference pairs; a DPO LoRA is
trained on them; it joins a second round of battles; the leaderboard ranks
them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

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
    add_preference_command(verbs)


def _step(title: str, argv: list[str]) -> None:
    from .cli import main

    print(f"==> {title}: vicuna {' '.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc:
        raise RecipeError(f"step failed ({title}, exit code {rc}): vicuna {' '.join(argv)}")
    print(f"    {title}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------- the preference loop

STYLES = {  # the two adapters the first round battles: the same fact, opposite styles
    "concise": "The capital of {country} is {city}.",
    "wordy": "Great question! Let me think about it carefully. {country} is a country with a long and "
             "fascinating history, and its capital city is {city}. So the answer is {city}. I hope this helps, "
             "and feel free to ask me anything else!",
}
# facts a 135M chat model mostly knows, so a rule can tell a right answer from a wrong one
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "England": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Turkey": "Ankara", "India": "New Delhi", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Thailand": "Bangkok", "South Korea": "Seoul",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest", "Cuba": "Havana",
    "Australia": "Canberra", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Mexico": "Mexico City", "Iran": "Tehran", "Iraq": "Baghdad", "Vietnam": "Hanoi", "Chile": "Santiago",
    "Colombia": "Bogotá", "Scotland": "Edinburgh", "Ukraine": "Kyiv", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
}
PHRASINGS = ("What is the capital of {country}?", "Which city is the capital of {country}?",
             "Name the capital of {country}.", "Tell me the capital city of {country}.",
             "What city is {country}'s capital?", "I forgot: what's the capital of {country}?")
SFT_COUNTRIES = 12  # the style adapters learn on these; battles ask about the others
TUNED = "tuned"  # the DPO adapter's served name


def add_preference_command(verbs) -> None:
    p = command(
        verbs, "preference", run_preference,
        "the preference loop offline: arena battles -> votes -> pairs -> DPO -> battles again -> leaderboard",
        description="Close the loop from an arena back into training, offline, in minutes on a CPU:\n"
        "  1. train two LoRA adapters of opposite styles (concise, wordy) on the base (`vicuna train --lora`);\n"
        "  2. serve the base and both adapters with the web UI on 127.0.0.1 (one process, one base in memory);\n"
        "  3. a voter battles them over HTTP as a user would (Gradio's client: /send_fn, then /vote_a ...):\n"
        "     --voter rules prefers a correct answer, then the shorter one (a tie within --tie-margin words,\n"
        "     both wrong = both bad); --voter judge asks an OpenAI-compatible judge model, both answer orders;\n"
        "  4. `vicuna data pairs` turns the votes into preference pairs (ties and both-bad dropped, counted);\n"
        "  5. `vicuna train --objective dpo --lora` tunes an adapter on them (reference: the base, adapter off);\n"
        "  6. round two: the tuned adapter joins the arena (drawn more often, --tuned-weight);\n"
        "  7. `vicuna arena leaderboard` ranks all four; report.md sums up, with the DPO margin/accuracy plot.\n"
        "The questions ask for capitals, so a rule can tell a right answer from a wrong one; the adapters\n"
        "learn on other countries than the battles ask about, and the two rounds ask different questions.\n"
        "Battles are sampled (--battle-temperature), so two runs differ in detail.\n\n"
        "examples:\n"
        "  vicuna recipe preference --work-dir runs/preference\n"
        "  vicuna recipe preference --voter judge --judge-url http://127.0.0.1:8001/v1 --judge-model judge",
    )
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "preference"), help="where every output goes")
    p.add_argument("--force", action="store_true", help="start over in an existing --work-dir")
    p.add_argument("--model-path", default=None,
                   help="base model folder (default: the default model; `demo`: the bundled demo model)")
    p.add_argument("--dtype", default="auto", help="serving dtype of the arena's models (training picks its own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions and of training")
    p.add_argument("--sft-steps", type=int, default=12, help="optimizer steps of each style adapter")
    p.add_argument("--battles", type=int, default=40, help="battles (votes) per round")
    p.add_argument("--concurrency", type=int, default=4, help="battles run at once (the engine batches them)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest answer in a battle")
    p.add_argument("--battle-temperature", type=float, default=0.7, help="sampling temperature of the battles")
    p.add_argument("--voter", choices=("rules", "judge"), default="rules", help="who votes (see above)")
    p.add_argument("--tie-margin", type=int, default=3,
                   help="--voter rules: two right answers within this many words of each other tie")
    p.add_argument("--judge-url", default=None, help="--voter judge: the judge's OpenAI-compatible base URL")
    p.add_argument("--judge-model", default=None, help="--voter judge: the judge's model name")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="--voter judge: environment variable holding the judge's API key")
    p.add_argument("--dpo-steps", type=int, default=30, help="optimizer steps of the DPO adapter")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--tuned-weight", type=float, default=3.0,
                   help="round two: how often the tuned adapter is drawn, relative to 1 for the others")
    p.add_argument("--kv-cache-memory", default="256MiB", help="the engine's paged KV cache")


@dataclasses.dataclass(frozen=True)
class CapitalQuestion:
    text: str
    country: str
    answer: str  # the capital: what --voter rules checks


def preference_questions(countries: list[str], n: int, rng: random.Random, avoid=frozenset()) -> list[CapitalQuestion]:
    """``n`` distinct questions about ``countries``, none in ``avoid`` (no battle prompt was trained on)."""
    pool = [CapitalQuestion(p.format(country=c), c, CAPITALS[c]) for c in countries for p in PHRASINGS]
    pool = [q for q in pool if q.text not in avoid]
    if n > len(pool):
        raise RecipeError(f"only {len(pool)} questions are left for this step; ask for fewer (--battles)")
    return rng.sample(pool, n)


def write_style_data(path: Path, style: str, questions: list[CapitalQuestion]) -> Path:
    """One adapter's SFT file: every question answered in ``style`` (messages JSONL)."""
    lines = []
    for q in questions:
        answer = STYLES[style].format(country=q.country[0].upper() + q.country[1:], city=q.answer)
        lines.append(json.dumps({"messages": [{"role": "user", "content": q.text},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return write_text(path, "".join(lines))


def right_answer(answer: str, q: CapitalQuestion) -> bool:
    return q.answer.lower() in answer.lower()


def rules_vote(q: CapitalQuestion, answer_a: str, answer_b: str, tie_margin: int) -> str:
    """A right answer beats a wrong one; of two right ones the shorter wins beyond ``tie_margin`` words
    (what a user asking a quick question prefers); two wrong ones are both bad."""
    ok_a, ok_b = right_answer(answer_a, q), right_answer(answer_b, q)
    if not (ok_a or ok_b):
        return "tie (bothbad)"
    if ok_a != ok_b:
        return "model_a" if ok_a else "model_b"
    words_a, words_b = len(answer_a.split()), len(answer_b.split())
    if abs(words_a - words_b) <= tie_margin:
        return "tie"
    return "model_a" if words_a < words_b else "model_b"


class JudgeVoter:
    """A judge model votes with our pairwise prompt, both answer orders (position bias): it must prefer the
    same answer both ways, else the vote is a tie; unparsable judgments are ties too."""

    def __init__(self, url: str, model: str, api_key_env: str):
        from .eval.judge_prompts import load_prompts
        from .eval.openai_client import Endpoint

        self.endpoint = Endpoint(url, model, api_key_env=api_key_env)
        self.book = load_prompts()
        self.prompt = self.book.choose("pairwise-score", category="general", turn=1, n_turns=1, guided=False)

    def winner_shown_first(self, question: str, first: str, second: str) -> bool | None:
        from .eval.openai_client import CompletionFailed, chat
        from .eval.parse import OK, parse_judgment

        messages = self.book.render(self.prompt, "pairwise-score", questions=[question], answers=[[first], [second]],
                                    reference=None)
        try:
            reply = chat(self.endpoint, messages, temperature=self.prompt.temperature,
                         max_tokens=self.prompt.max_tokens)
        except CompletionFailed as e:
            raise RecipeError(f"the judge at {self.endpoint.api_base} failed: {e}") from e
        parsed = parse_judgment("pairwise-score", reply.text)
        if parsed.get("status") != OK or parsed["scores"][0] == parsed["scores"][1]:
            return None
        return parsed["scores"][0] > parsed["scores"][1]

    def __call__(self, q: CapitalQuestion, answer_a: str, answer_b: str) -> str:
        if not answer_a.strip() and not answer_b.strip():
            return "tie (bothbad)"
        ab = self.winner_shown_first(q.text, answer_a, answer_b)
        ba = self.winner_shown_first(q.text, answer_b, answer_a)
        if ab is None or ba is None or ab == ba:  # undecided, or the verdict followed the position
            return "tie"
        return "model_a" if ab else "model_b"


def _last_answer(chatbot) -> str:
    """The model's answer from a Chatbot value as Gradio's client returns it (messages or pairs)."""
    if not chatbot:
        return ""
    last = chatbot[-1]
    if isinstance(last, dict):
        content = last.get("content")
        if isinstance(content, list):  # Gradio 5+: a list of parts
            content = "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
        return str(content or "")
    return str(last[1] or "")


def battle_round(url: str, questions: list[CapitalQuestion], vote, concurrency: int) -> None:
    """Each question is one blind battle over HTTP, as a user plays it: send, read both answers, vote.
    The votes are in the arena's database, as anyone's."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client
    from tqdm import tqdm

    from .serve.web import VOTE_IDS

    def one(q: CapitalQuestion) -> None:
        client = Client(url + "/", verbose=False)  # a session of its own: one battle
        out = client.predict(q.text, api_name="/send_fn")
        answer_a, answer_b = _last_answer(out[1]), _last_answer(out[2])
        if not (answer_a or answer_b) and "Vote for" not in str(out[-1]):  # refused or failed: its status says why
            raise RecipeError(f"the arena answered {q.text!r} with: {out[-1]}")
        winner = vote(q, answer_a, answer_b)
        reveal, status = client.predict(api_name="/vote_" + VOTE_IDS[winner])[:2]
        if "Your vote" not in str(reveal):
            raise RecipeError(f"the arena did not take the vote on {q.text!r}: {status}")

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        for _ in tqdm(pool.map(one, questions), total=len(questions), desc="battles", unit="vote", file=sys.stderr,
                      disable=None):
            pass


@contextlib.contextmanager
def serve_arena(base: str, adapters: dict[str, Path], db: Path, args, weights: tuple[str, ...] = ()) -> Iterator[str]:
    """The base and its adapters in one engine process with the web UI (what `vicuna serve --web` runs), on a
    free loopback port for the duration: yields its URL."""
    from .serve.engine import EngineConfig, ModelConfig
    from .serve.launch import WebConfig, load_engines, local_app, stop_engines
    from .serve.server import ServerThread
    from .serve.web import WebSettings

    engines = load_engines([ModelConfig(model_path=base, dtype=args.dtype,
                                        lora=tuple(f"{n}={p}" for n, p in adapters.items()))],
                           EngineConfig(kv_cache_memory=args.kv_cache_memory))
    try:
        settings = WebSettings(rate_limit=0, vote_limit=0, max_tokens=args.max_tokens, arena_only=True,
                               battle_temperature=args.battle_temperature, arena_weights=weights,
                               title="vicuna recipe preference")
        with ServerThread(local_app(engines, web=WebConfig(arena_db=str(db)), settings=settings)) as url:
            yield url
    finally:
        stop_engines(engines)


def round_stats(votes: list[dict], questions: dict[str, CapitalQuestion]) -> dict[str, dict]:
    """Per model: battles, wins, ties, right answers and mean answer length (words), from the stored votes."""
    stats: dict[str, dict] = {}
    for v in votes:
        q = questions.get(v["conversation_a"][0]["content"])
        for side in ("a", "b"):
            model, answer = v[f"model_{side}"], v[f"conversation_{side}"][-1]["content"]
            s = stats.setdefault(model, {"battles": 0, "wins": 0, "ties": 0, "right": 0, "words": 0})
            s["battles"] += 1
            s["wins"] += v["winner"] == f"model_{side}"
            s["ties"] += v["winner"] in ("tie", "tie (bothbad)")
            s["right"] += bool(q and right_answer(answer, q))
            s["words"] += len(answer.split())
    for s in stats.values():
        s["mean_words"] = round(s.pop("words") / s["battles"], 1)
    return dict(sorted(stats.items()))


def run_preference(args) -> int:
    from .model import resolve_model_path
    from .serve.arena import ArenaStore

    if args.voter == "judge" and not (args.judge_url and args.judge_model):
        raise RecipeError("--voter judge needs --judge-url and --judge-model (an OpenAI-compatible judge)")
    for name in ("sft_steps", "battles", "dpo_steps", "max_tokens", "concurrency"):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be at least 1")
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        if not args.force:
            raise RecipeError(f"{work} is not empty; pass --force to start over")
        shutil.rmtree(work)
    for sub in ("data", "adapters"):
        (work / sub).mkdir(parents=True)
    t0 = time.time()
    base = resolve_model_path(args.model_path)
    vote = (JudgeVoter(args.judge_url, args.judge_model, args.judge_api_key_env) if args.voter == "judge"
            else lambda q, a, b: rules_vote(q, a, b, args.tie_margin))

    # three disjoint question sets: the adapters' training, round one, round two
    rng = random.Random(args.seed)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    sft_qs = preference_questions(countries[:SFT_COUNTRIES], 24, rng)
    round1 = preference_questions(countries[SFT_COUNTRIES:], args.battles, rng)
    round2 = preference_questions(countries[SFT_COUNTRIES:], args.battles, rng, avoid={q.text for q in round1})
    by_text = {q.text: q for q in sft_qs + round1 + round2}

    # 1. the two style adapters
    adapters: dict[str, Path] = {}
    for style in STYLES:
        data = write_style_data(work / "data" / f"{style}.jsonl", style, sft_qs)
        adapters[style] = work / "adapters" / style
        _step(f"train the {style} adapter",
              ["train", "--model-path", base, "--data-path", str(data), "--output-dir", str(adapters[style]),
               "--lora", "--max-steps", str(args.sft_steps), "--learning-rate", "5e-3", "--max-length", "128",
               "--per-device-batch-size", "4", "--save-steps", "0", "--seed", str(args.seed), "--force"])

    # 2-3. round one: base, concise and wordy battle; the voter votes
    db = work / "arena.db"

    def play(round_no: int, questions: list[CapitalQuestion], served: dict[str, Path], weights=()) -> list[dict]:
        print(f"==> round {round_no}: {len(questions)} battles among the base and {', '.join(served)}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with serve_arena(base, served, db, args, weights) as url:
            t1 = time.perf_counter()
            battle_round(url, questions, vote, args.concurrency)
        print(f"    round {round_no}: served in {t1 - t0:.1f} s, battles took {time.perf_counter() - t1:.1f} s",
              file=sys.stderr, flush=True)
        with ArenaStore(db, create=False) as store:
            asked = {q.text for q in questions}
            return [v for v in store.iter_votes() if v["conversation_a"][0]["content"] in asked]

    votes1 = play(1, round1, adapters)

    # 4. pairs from the votes
    pairs = work / "pairs.jsonl"
    _step("preference pairs", ["data", "pairs", str(db), "-o", str(pairs), "--report", str(work / "pairs_report.json"),
                               "--force"])

    # 5. DPO on the pairs: a LoRA on the base, whose reference is the base itself (the adapter disabled)
    tuned = work / "adapters" / TUNED
    _step("DPO", ["train", "--model-path", base, "--data-path", str(pairs), "--output-dir", str(tuned),
                  "--objective", "dpo", "--beta", str(args.beta), "--lora", "--max-steps", str(args.dpo_steps),
                  "--learning-rate", "1e-3", "--max-length", "192", "--per-device-batch-size", "2",
                  "--save-steps", "0", "--logging-steps", "1", "--seed", str(args.seed), "--force"])

    # 6. round two, the tuned adapter in the arena
    votes2 = play(2, round2, {**adapters, TUNED: tuned}, weights=(f"{TUNED}={args.tuned_weight:g}",))

    # 7. the leaderboard over both rounds
    _step("leaderboard", ["arena", "leaderboard", "--db", str(db), "--bootstrap", "200", "--seed", str(args.seed),
                          "--json", str(work / "leaderboard.json"), "--plot", str(work / "leaderboard.png"),
                          "--force"])
    results = {
        "base": Path(base).name,
        "voter": args.voter if args.voter == "rules" else f"judge {args.judge_model}",
        "rounds": [round_stats(votes1, by_text), round_stats(votes2, by_text)],
        "pairs": json.loads((work / "pairs_report.json").read_text()),
        "dpo": [json.loads(x) for x in (tuned / "train_log.jsonl").read_text().splitlines() if x.strip()],
        "leaderboard": json.loads((work / "leaderboard.json").read_text()),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    write_json(work / "results.json", results)
    write_preference_report(work, results, args)
    print(json.dumps({"tuned": results["rounds"][1].get(TUNED), "pairs": results["pairs"]["written"],
                      "final_dpo": {k: results["dpo"][-1][k] for k in ("loss", "margin", "accuracy")},
                      "leaderboard": [(r["model"], round(r["rating"])) for r in results["leaderboard"]["ratings"]],
                      "report": str(work / "report.md"), "minutes": results["minutes"]}, indent=2))
    return 0


def write_preference_report(work: Path, results: dict, args) -> None:
    """report.md: what each round's models did, the pairs, the DPO curve, the leaderboard."""
    def round_table(stats: dict[str, dict]) -> list[str]:
        rows = ["| model | battles | wins | ties | right answers | mean words |", "|---|---|---|---|---|---|"]
        rows += [f"| {m} | {s['battles']} | {s['wins']} | {s['ties']} | {s['right']}/{s['battles']} | "
                 f"{s['mean_words']} |" for m, s in stats.items()]
        return rows

    dpo, pairs, lb = results["dpo"], results["pairs"], results["leaderboard"]
    dropped = {k: v for k, v in pairs["dropped"].items() if v}
    lb_rows = ["| rank | model | rating | 95% interval | votes | win rate | style-controlled rank |",
               "|---|---|---|---|---|---|---|"]
    for r in lb["ratings"]:
        sc = r.get("style_controlled", {}).get("rank", "")
        lb_rows.append(f"| {r['rank']} | {r['model']} | {r['rating']:.0f} | {r['lower']:.0f}–{r['upper']:.0f} | "
                       f"{r['votes']} | {r['win_rate']:.0%} | {sc} |")
    voter = ("rules: a right capital beats a wrong one; of two right ones the shorter wins by more than "
             f"{args.tie_margin} words, else a tie; two wrong ones are both bad" if args.voter == "rules"
             else f"the judge model {args.judge_model}, both answer orders (a verdict that follows the position is "
                  "a tie)")
    lines = [
        "# The preference loop",
        "",
        f"`vicuna recipe preference` on {results['base']}, {results['minutes']} minutes. Two LoRA adapters with "
        f"opposite styles (concise, wordy; {args.sft_steps} steps each) battled the base in the arena; the voter "
        f"({voter}) decided {args.battles} battles per round, sampled at temperature {args.battle_temperature:g}. "
        f"The votes became {pairs['written']} preference pairs, a DPO LoRA (`{TUNED}`, {args.dpo_steps} steps, "
        f"beta {args.beta:g}, reference: the base) was trained on them, and joined round two.",
        "",
        "## Round one",
        "",
        *round_table(results["rounds"][0]),
        "",
        "## Pairs",
        "",
        f"{pairs['written']} pairs kept; dropped: {json.dumps(dropped) if dropped else 'none'}.",
        "",
        "## DPO",
        "",
        "![loss, reward margin and preference accuracy](adapters/tuned/loss.png)",
        "",
        f"Step 1: loss {dpo[0]['loss']:.3f}, margin {dpo[0]['margin']:.3f}, accuracy {dpo[0]['accuracy']:.2f}; "
        f"step {dpo[-1]['step']}: loss {dpo[-1]['loss']:.3f}, margin {dpo[-1]['margin']:.3f}, accuracy "
        f"{dpo[-1]['accuracy']:.2f}.",
        "",
        "## Round two",
        "",
        *round_table(results["rounds"][1]),
        "",
        "## Leaderboard (both rounds)",
        "",
        *lb_rows,
        "",
        "![ratings](leaderboard.png)",
        "",
        "The style-controlled rank discounts answer length and markdown (Chatbot Arena's default view): a model "
        "that wins only by being shorter loses rank there.",
    ]
    write_text(work / "report.md", "\n".join(lines) + "\n")
