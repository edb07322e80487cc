"""Judge prompts: our own YAML prompt sets, and FastChat's published files (MT-bench, Vicuna blog).

Each protocol has its own rule for which prompt judges which question turn, and its own
judge settings; a ``PromptBook`` holds one protocol's prompts and that rule:

* ours (``vicuna-judge-v1.yaml``): one prompt per mode; from turn 2 on the earlier
  conversation is shown; a reference is shown where the category is reference-guided and
  the question turn has one. Temperature 0, 2048 tokens.
* MT-bench (FastChat ``judge_prompts.jsonl``): turn 1 with ``single-v1`` / ``pair-v2``, or
  the ``-math-`` prompts (reference answer filled in) for math, reasoning and coding; turn 2
  (questions of exactly two turns) with the ``-multi-turn`` variants. Temperature 0, 2048
  tokens, as FastChat's ``gen_judgment.py`` asks an OpenAI judge.
* Vicuna blog (FastChat ``eval/table/prompt.jsonl`` + ``reviewer.jsonl``): one turn; the
  reviewer whose category is the question's (else the first, "general") names the prompt;
  temperature and max_tokens from the reviewer's metadata (0.2, 1024).
* Arena-Hard-Auto (a ``judge_config.yaml``: ``system_prompt`` + ``prompt_template`` with
  ``{question_1}``, ``{answer_1}``, ``{answer_2}``): the first turn, five-level verdicts;
  temperature 0 and 4096 tokens unless the file says otherwise. Our own wording in that
  shape is bundled (``prompts/arena-hard/judge_config.yaml``); nothing is ever fetched.

Templates are filled exactly as FastChat fills them (``str.format`` with the same field
names, no stripping), so a judge receives byte for byte the published prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import EvalUsageError
from .records import read_records
from .parse import MODES

DEFAULT_PROMPTS = "vicuna-judge-v1"
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS (MT-bench)
PROMPT_SET_MODES = tuple(m for m in MODES if m != "pairwise-5")  # five-level verdicts: the arena-hard book


@dataclass(frozen=True)
class JudgePrompt:
    """One prompt as sent: its name and hash go into every judgment record made with it."""

    name: str
    system: str
    template: str
    temperature: float
    max_tokens: int
    defaults: dict = field(default_factory=dict)

    @property
    def sha(self) -> str:
        """First 12 hex digits of sha256 over the system prompt, template and defaults."""
        text = json.dumps([self.system, self.template, self.defaults], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class MissingReference(Exception):
    """A protocol needs a reference answer that the question does not have."""


def _sha(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """A published evaluation procedure: which prompts, which mode, whether orders are swapped."""

    name: str
    mode: str
    prompts: str  # the kind of FastChat file it needs in --judge-prompts
    swap: bool
    needs_baseline: bool
    help: str


PROTOCOLS = {p.name: p for p in (
    Protocol("mt-bench-single", "single", "mt-bench", False, False,
             "MT-bench single-answer grading (the leaderboard score: mean of all turn scores)"),
    Protocol("mt-bench-pairwise", "pairwise", "mt-bench", True, False,
             "MT-bench pairwise verdicts in both orders, against --baseline (or all pairs)"),
    Protocol("vicuna-blog", "pairwise-score", "vicuna-blog", False, True,
             "the original Vicuna evaluation: two 1-10 scores, --baseline always second, no swap"),
    Protocol("arena-hard", "pairwise-5", "arena-hard", True, True,
             "Arena-Hard-Auto: five-level verdicts vs one --baseline in both orders, strong verdicts weighted, "
             "Bradley-Terry win rates (raw and style-controlled) with bootstrap intervals"),
)}


# ---------------------------------------------------------------- our own prompt sets (YAML)


@dataclass(frozen=True)
class PromptSet:
    """Our judge prompts, loaded from a YAML data file; ``version`` is recorded in every judgment."""

    name: str
    version: str  # e.g. "vicuna-judge-v1"
    sha: str  # first 12 hex digits of the file's sha256: catches unversioned edits
    prompts: dict
    reference_block: str
    history_block: str

    kind = "vicuna"
    modes = PROMPT_SET_MODES

    def render_mode(self, mode: str, *, question: str, answers: list[str],
                    histories: list[list[tuple[str, str]]], reference: str | None) -> list[dict]:
        p = self.prompts[mode]
        who = ["Assistant A", "Assistant B"] if mode == "pairwise" else ["Assistant 1", "Assistant 2"]
        if mode == "single":
            who = ["the Assistant"]
        hist = [self._history(h, w) for h, w in zip(histories, who)]
        fields = {
            "question": question,
            "reference_block": self.reference_block.format(reference=reference) + "\n" if reference else "",
        }
        if mode == "single":
            fields.update(answer=answers[0], history=hist[0])
        else:
            fields.update(answer_1=answers[0], answer_2=answers[1], history_1=hist[0], history_2=hist[1])
        return [{"role": "system", "content": p["system"].strip()},
                {"role": "user", "content": p["user"].format(**fields).strip()}]

    def _history(self, turns: list[tuple[str, str]], who: str) -> str:
        if not turns:
            return ""
        text = "\n\n".join(f"User: {q}\n\n{who}: {a}" for q, a in turns)
        return self.history_block.format(who=who, history=text) + "\n"

    # -- the PromptBook interface

    def reference_for(self, category: str, turn: int, reference: list[str] | None, categories) -> list[str] | None:
        """Reference-guided where the category is and this turn has a non-empty reference."""
        if category in categories and reference and len(reference) >= turn and reference[turn - 1].strip():
            return reference
        return None

    def choose(self, mode: str, *, category: str, turn: int, n_turns: int, guided: bool) -> JudgePrompt:
        p = self.prompts[mode]
        blocks = {"reference_block": self.reference_block, "history_block": self.history_block}
        return JudgePrompt(f"{self.version}/{mode}", p["system"], p["user"], 0.0, 2048, blocks)

    def render(self, prompt: JudgePrompt, mode: str, *, questions: list[str], answers: list[list[str]],
               reference: list[str] | None) -> list[dict]:
        t = len(questions)
        return self.render_mode(mode, question=questions[-1], answers=[a[-1] for a in answers],
                                histories=[list(zip(questions[:-1], a[:-1])) for a in answers],
                                reference=reference[t - 1].strip() if reference else None)


def list_prompt_sets() -> list[str]:
    folder = resources.files("vicuna.eval") / "prompts"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def load_prompts(name_or_path: str = DEFAULT_PROMPTS) -> PromptSet:
    """A bundled prompt set by name (``vicuna eval prompts`` lists them) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        bundled = resources.files("vicuna.eval") / "prompts" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise EvalUsageError(f"unknown judge prompt set {name_or_path!r}; bundled: {', '.join(list_prompt_sets())} "
                                 "(or give the path of a YAML file)")
        raw = bundled.read_bytes()
        where = f"bundled prompt set {name_or_path}"
    else:
        if path.suffix == ".jsonl":
            raise EvalUsageError(f"{path}: FastChat judge prompt files are read with --judge-prompts, not --prompts")
        raw, where = _read_prompt_file(path), str(path)
    data = _parse_yaml(raw, where)
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), dict):
        raise EvalUsageError(f"{where}: expected a mapping with name, version and prompts")
    for key in ("name", "version"):
        if key not in data:
            raise EvalUsageError(f"{where}: missing {key!r}")
    for mode in PROMPT_SET_MODES:
        p = data["prompts"].get(mode)
        if not isinstance(p, dict) or not isinstance(p.get("system"), str) or not isinstance(p.get("user"), str):
            raise EvalUsageError(f"{where}: prompts.{mode} needs 'system' and 'user' strings")
    ps = PromptSet(
        name=str(data["name"]), version=f"{data['name']}-v{data['version']}", sha=_sha(raw),
        prompts=data["prompts"], reference_block=str(data.get("reference_block", "[Reference Answer]\n{reference}\n")),
        history_block=str(data.get("history_block", "{history}\n")),
    )
    # Fail now, naming the template, rather than in a worker thread halfway through a run.
    for mode in PROMPT_SET_MODES:
        try:
            ps.render_mode(mode, question="q", answers=["a", "b"], histories=[[("q0", "a0")], [("q0", "b0")]],
                           reference="r")
        except (KeyError, IndexError, ValueError) as e:
            raise EvalUsageError(f"{where}: prompts.{mode} (or a block it uses) has a bad placeholder {e}; "
                                 "allowed: {question} {answer} {answer_1} {answer_2} {history} {history_1} "
                                 "{history_2} {reference_block} {reference} {who}; write literal braces as {{ }}") from None
    return ps


# ---------------------------------------------------------------- MT-bench (FastChat judge_prompts.jsonl)

# FastChat's gen_judgment.py picks prompts by these names: (mode, reference-guided, turn) -> name.
MT_BENCH_NAMES = {
    ("single", False, 1): "single-v1", ("single", True, 1): "single-math-v1",
    ("single", False, 2): "single-v1-multi-turn", ("single", True, 2): "single-math-v1-multi-turn",
    ("pairwise", False, 1): "pair-v2", ("pairwise", True, 1): "pair-math-v1",
    ("pairwise", False, 2): "pair-v2-multi-turn", ("pairwise", True, 2): "pair-math-v1-multi-turn",
}
_MT_BENCH_FORMAT = {"single": "[[rating]]", "pairwise": "[[A]]"}
_MT_BENCH_TYPE = {"single": "single", "pairwise": "pairwise"}


@dataclass(frozen=True)
class MTBenchBook:
    """FastChat's MT-bench judge prompts (``fastchat/llm_judge/data/judge_prompts.jsonl``)."""

    version: str
    prompts: dict[str, JudgePrompt]
    modes: tuple[str, ...]  # the modes whose four prompts the file holds

    kind = "mt-bench"

    def reference_for(self, category: str, turn: int, reference: list[str] | None, categories) -> list[str] | None:
        """Math, reasoning and coding are always reference-guided; the reference must exist."""
        if category not in categories:
            return None
        if not reference or len(reference) < turn:
            raise MissingReference(turn)
        return reference

    def choose(self, mode: str, *, category: str, turn: int, n_turns: int, guided: bool) -> JudgePrompt | None:
        if turn > 2 or (turn == 2 and n_turns != 2):
            return None  # FastChat judges turn 2 only of two-turn questions, and no later turns
        return self.prompts[MT_BENCH_NAMES[(mode, guided, turn)]]

    def render(self, prompt: JudgePrompt, mode: str, *, questions: list[str], answers: list[list[str]],
               reference: list[str] | None) -> list[dict]:
        fields: dict[str, str] = {}
        if reference is not None:
            fields.update({f"ref_answer_{i + 1}": r for i, r in enumerate(reference[: len(questions)])})
        if len(questions) == 1:
            fields["question"] = questions[0]
            if mode == "single":
                fields["answer"] = answers[0][0]
            else:
                fields.update(answer_a=answers[0][0], answer_b=answers[1][0])
        else:
            fields.update(question_1=questions[0], question_2=questions[1])
            if mode == "single":
                fields.update(answer_1=answers[0][0], answer_2=answers[0][1])
            else:
                fields.update(answer_a_1=answers[0][0], answer_a_2=answers[0][1], answer_b_1=answers[1][0],
                              answer_b_2=answers[1][1])
        return [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.template.format(**fields)}]


def _mt_bench_book(records: list[dict], raw: bytes, where: str) -> MTBenchBook:
    prompts: dict[str, JudgePrompt] = {}
    types: dict[str, tuple[str, str]] = {}
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("name", "type", "system_prompt", "prompt_template", "output_format") if k not in rec]
        if missing:
            raise EvalUsageError(f"{where}: record {n} lacks {', '.join(missing)} (MT-bench judge prompt format)")
        prompts[rec["name"]] = JudgePrompt(str(rec["name"]), str(rec["system_prompt"]), str(rec["prompt_template"]),
                                           0.0, 2048)
        types[rec["name"]] = (rec["type"], rec["output_format"])
    modes = []
    for mode in ("single", "pairwise"):
        names = [name for (m, _, _), name in MT_BENCH_NAMES.items() if m == mode]
        if all(name in prompts and types[name] == (_MT_BENCH_TYPE[mode], _MT_BENCH_FORMAT[mode]) for name in names):
            modes.append(mode)
    if not modes:
        raise EvalUsageError(f"{where}: no complete MT-bench prompt set: FastChat's procedure needs "
                             f"{', '.join(MT_BENCH_NAMES.values())} (type single with output_format [[rating]], "
                             "pairwise with [[A]])")
    book = MTBenchBook(f"mt-bench-{_sha(raw)}", prompts, tuple(modes))
    for (mode, guided, turn), name in MT_BENCH_NAMES.items():
        if mode in modes:
            _check_template(book, mode, name, where, turns=turn, guided=guided)
    return book


# ---------------------------------------------------------------- the Vicuna blog (prompt.jsonl + reviewer.jsonl)


@dataclass(frozen=True)
class BlogBook:
    """The original Vicuna evaluation: FastChat's old ``eval/table/prompt.jsonl`` and ``reviewer.jsonl``."""

    version: str
    by_category: dict[str, JudgePrompt]  # reviewer category -> prompt
    default: JudgePrompt  # the first reviewer's (FastChat falls back to index 0)

    kind = "vicuna-blog"
    modes = ("pairwise-score",)

    def reference_for(self, category: str, turn: int, reference: list[str] | None, categories) -> None:
        return None  # the blog's math prompt asks the judge to solve the problem itself

    def choose(self, mode: str, *, category: str, turn: int, n_turns: int, guided: bool) -> JudgePrompt | None:
        return None if turn > 1 else self.by_category.get(category, self.default)

    def render(self, prompt: JudgePrompt, mode: str, *, questions: list[str], answers: list[list[str]],
               reference: list[str] | None) -> list[dict]:
        user = prompt.template.format(question=questions[0], answer_1=answers[0][0], answer_2=answers[1][0],
                                      **prompt.defaults)
        return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


def _blog_book(records: list[dict], raw: bytes, reviewers_path: Path | None, where: str) -> BlogBook:
    if reviewers_path is None:
        raise EvalUsageError(f"{where} is a Vicuna-blog prompt file (prompt.jsonl); pass its reviewer file "
                             "(reviewer.jsonl) with --judge-reviewers")
    prompts = {}
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("prompt_id", "system_prompt", "prompt_template") if k not in rec]
        if missing:
            raise EvalUsageError(f"{where}: record {n} lacks {', '.join(missing)} (Vicuna-blog prompt format)")
        prompts[rec["prompt_id"]] = rec
    reviewers = _read_jsonl(reviewers_path)
    if not reviewers:
        raise EvalUsageError(f"{reviewers_path}: no reviewers")
    by_category: dict[str, JudgePrompt] = {}
    first = None
    for n, rev in enumerate(reviewers, 1):
        pid = rev.get("prompt_id")
        if pid not in prompts:
            raise EvalUsageError(f"{reviewers_path}: reviewer {n} names prompt_id {pid!r}, which {where} does not have")
        meta = rev.get("metadata") or {}
        p = prompts[pid]
        try:
            prompt = JudgePrompt(str(rev.get("reviewer_id", f"reviewer-{n}")), str(p["system_prompt"]),
                                 str(p["prompt_template"]), float(meta.get("temperature", 0.2)),
                                 int(meta.get("max_tokens", 1024)), dict(p.get("defaults") or {}))
        except (TypeError, ValueError):
            raise EvalUsageError(f"{reviewers_path}: reviewer {n}: metadata temperature/max_tokens must be numbers") from None
        first = first or prompt
        by_category.setdefault(str(rev.get("category", "general")), prompt)  # FastChat takes the first match
    book = BlogBook(f"vicuna-blog-{_sha(raw, reviewers_path.read_bytes())}", by_category, first)
    for prompt in {p.name: p for p in by_category.values()}.values():
        try:
            book.render(prompt, "pairwise-score", questions=["q"], answers=[["a"], ["b"]], reference=None)
        except (KeyError, IndexError, ValueError) as e:
            raise EvalUsageError(f"{where}: the prompt of reviewer {prompt.name} has a placeholder {e} that the blog's "
                                 "procedure does not fill ({question} {answer_1} {answer_2} and its 'defaults')") from None
    return book


# ---------------------------------------------------------------- Arena-Hard-Auto (judge_config.yaml)

ARENA_HARD_BUNDLED = "arena-hard/judge_config.yaml"


@dataclass(frozen=True)
class ArenaHardBook:
    """An Arena-Hard-Auto style judge config: one prompt, the question's first turn, five levels."""

    version: str
    prompt: JudgePrompt

    kind = "arena-hard"
    modes = ("pairwise-5",)

    def reference_for(self, category: str, turn: int, reference: list[str] | None, categories) -> None:
        return None  # the prompt asks the judge to write its own answer first

    def choose(self, mode: str, *, category: str, turn: int, n_turns: int, guided: bool) -> JudgePrompt | None:
        return self.prompt if turn == 1 else None  # Arena-Hard judges the first turn

    def render(self, prompt: JudgePrompt, mode: str, *, questions: list[str], answers: list[list[str]],
               reference: list[str] | None) -> list[dict]:
        user = prompt.template.format(question_1=questions[0], answer_1=answers[0][0], answer_2=answers[1][0])
        return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


def load_arena_hard_prompts(path: Path | None = None) -> ArenaHardBook:
    """Arena-Hard's ``judge_config.yaml`` shape (ours bundled when ``path`` is None)."""
    if path is None:
        raw = (resources.files("vicuna.eval") / "prompts" / ARENA_HARD_BUNDLED).read_bytes()
        where = "the bundled arena-hard judge prompt"
    else:
        raw, where = _read_prompt_file(Path(path)), str(path)
    data = _parse_yaml(raw, where)
    template = data.get("prompt_template") if isinstance(data, dict) else None
    if isinstance(template, list) and len(template) == 1:
        template = template[0]
    if not isinstance(template, str) or not isinstance(data.get("system_prompt"), str):
        raise EvalUsageError(f"{where}: not an Arena-Hard judge config: expected 'system_prompt' (a string) and "
                             "'prompt_template' (a string, or a list of one) with {question_1} {answer_1} {answer_2}")
    try:
        prompt = JudgePrompt(str(data.get("name", "arena-hard")), data["system_prompt"], template,
                             float(data.get("temperature", 0.0)), int(data.get("max_tokens", 4096)))
    except (TypeError, ValueError):
        raise EvalUsageError(f"{where}: temperature and max_tokens must be numbers") from None
    book = ArenaHardBook(f"{data.get('name', 'arena-hard')}-v{data.get('version', _sha(raw))}-{_sha(raw)}", prompt)
    try:
        book.render(prompt, "pairwise-5", questions=["q"], answers=[["a"], ["b"]], reference=None)
    except (KeyError, IndexError, ValueError) as e:
        raise EvalUsageError(f"{where}: prompt_template has a placeholder {e} that is not filled; allowed: "
                             "{question_1} {answer_1} {answer_2}; write literal braces as {{ }}") from None
    return book


# ---------------------------------------------------------------- loading a FastChat file


def _read_jsonl(path: Path) -> list[dict]:
    if Path(path).suffix != ".jsonl":
        raise EvalUsageError(f"{path}: expected a .jsonl file (one JSON object per line)")
    return read_records(path)


def _check_template(book, mode: str, name: str, where: str, *, turns: int, guided: bool) -> None:
    prompt = book.prompts[name]
    try:
        book.render(prompt, mode, questions=["q"] * turns, answers=[["a"] * turns, ["b"] * turns],
                    reference=["r"] * turns if guided else None)
    except (KeyError, IndexError, ValueError) as e:
        raise EvalUsageError(f"{where}: prompt {name} has a placeholder {e} that FastChat's procedure does not fill "
                             "for it") from None


def load_judge_prompts(path: Path, reviewers: Path | None = None):
    """A FastChat judge prompt file: MT-bench ``judge_prompts.jsonl``, or the blog's prompt.jsonl + reviewer.jsonl."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        if reviewers is not None:
            raise EvalUsageError(f"{path} is an Arena-Hard judge config; --judge-reviewers belongs to the "
                                 "Vicuna-blog prompt.jsonl")
        return load_arena_hard_prompts(path)
    records = _read_jsonl(path)
    if not records:
        raise EvalUsageError(f"{path}: no prompts")
    raw = path.read_bytes()
    first = records[0]
    if "name" in first and "type" in first:
        if reviewers is not None:
            raise EvalUsageError(f"{path} is an MT-bench judge prompt file; --judge-reviewers belongs to the "
                                 "Vicuna-blog prompt.jsonl")
        return _mt_bench_book(records, raw, str(path))
    if "prompt_id" in first:
        return _blog_book(records, raw, Path(reviewers) if reviewers else None, str(path))
    raise EvalUsageError(f"{path}: not a FastChat judge prompt file: expected MT-bench records (name, type, "
                         "system_prompt, prompt_template, output_format) or Vicuna-blog records (prompt_id, "
                         "system_prompt, prompt_template, defaults)")


def describe(book) -> dict[str, Any]:
    """Name -> hash of every prompt a book holds (for `vicuna eval prompts FILE`)."""
    if isinstance(book, MTBenchBook):
        return {name: p.sha for name, p in book.prompts.items()}
    if isinstance(book, BlogBook):
        return {f"{cat}: {p.name}": p.sha for cat, p in book.by_category.items()}
    if isinstance(book, ArenaHardBook):
        return {book.prompt.name: book.prompt.sha}
    return {f"{book.version}/{mode}": book.choose(mode, category="", turn=1, n_turns=1, guided=False).sha
            for mode in book.modes}


def _read_prompt_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise EvalUsageError(f"cannot read judge prompts {path}: {e.strerror or e}") from None


def _parse_yaml(raw: bytes, where: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise EvalUsageError(f"{where}: not valid YAML: {e}") from None
