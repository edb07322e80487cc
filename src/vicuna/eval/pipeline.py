"""`eval run CONFIG.yaml`: answer + judge + report from one config (each step resumable)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import EvalUsageError
from .answer import AnswerSettings, parse_temperatures, run_answers
from .client import DEFAULT_API_KEY_ENV, Endpoint
from .io import BUILTIN_QUESTIONS, load_questions, load_references
from .judge import REFERENCE_CATEGORIES, load_prompts, run_judge
from .parse import MODES
from .report import write_report

log = logging.getLogger(__name__)

_TOP = {"questions", "output_dir", "parallel", "models", "judge", "report"}
_MODEL = {"name", "model", "api_base", "api_key_env", "answers", "temperature", "max_tokens", "system", "timeout",
          "retries", "backoff"}
_JUDGE = {"model", "api_base", "api_key_env", "mode", "baseline", "reference", "reference_categories", "swap",
          "prompts", "max_tokens", "timeout", "retries", "backoff"}


def _check_keys(where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise EvalUsageError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _endpoint(where: str, d: dict, model: str) -> Endpoint:
    try:
        return Endpoint(api_base=d.get("api_base"), model=model, api_key_env=d.get("api_key_env", DEFAULT_API_KEY_ENV),
                        timeout=float(d.get("timeout", 120)), retries=int(d.get("retries", 5)),
                        backoff=float(d.get("backoff", 1.0)))
    except (TypeError, ValueError) as e:
        raise EvalUsageError(f"{where}: timeout/retries/backoff must be numbers ({e})") from None


def load_config(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalUsageError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise EvalUsageError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise EvalUsageError(f"{path}: expected a mapping (see `vicuna eval run --help`)")
    _check_keys(str(path), cfg, _TOP)
    models = cfg.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and m.get("name") for m in models):
        raise EvalUsageError(f"{path}: 'models' must be a list of mappings, each with a 'name'")
    for m in models:
        _check_keys(f"{path}: model {m['name']!r}", m, _MODEL)
        if "answers" not in m and "api_base" not in m:
            raise EvalUsageError(f"{path}: model {m['name']!r} needs 'api_base' (to answer) or 'answers' (a file)")
    judge = cfg.get("judge")
    if not isinstance(judge, dict) or not judge.get("model"):
        raise EvalUsageError(f"{path}: 'judge' must be a mapping with at least 'model'")
    _check_keys(f"{path}: judge", judge, _JUDGE)
    if judge.get("mode", "pairwise-score") not in MODES:
        raise EvalUsageError(f"{path}: judge.mode must be one of {', '.join(MODES)}")
    return cfg


def run_config(path: Path, *, force: bool = False) -> int:
    cfg = load_config(path)
    base = Path(path).parent
    rel = lambda p: p if Path(p).is_absolute() else base / p  # noqa: E731 -- paths are relative to the config
    out_dir = rel(cfg.get("output_dir", "eval-out"))
    questions_path = cfg.get("questions", BUILTIN_QUESTIONS)
    questions = load_questions(questions_path if questions_path == BUILTIN_QUESTIONS else rel(questions_path))
    parallel = int(cfg.get("parallel", 4))
    answers_dir = out_dir / "answers"
    answers_dir.mkdir(parents=True, exist_ok=True)
    failed = 0

    for m in cfg["models"]:
        name = str(m["name"])
        target = answers_dir / f"{name}.jsonl"
        if "answers" in m:
            src = rel(m["answers"])
            if not src.exists():
                raise EvalUsageError(f"{path}: model {name!r}: answers file {src} does not exist")
            if force or not target.exists():
                shutil.copyfile(src, target)
            continue
        temps = m.get("temperature") or {}
        if not isinstance(temps, dict):
            raise EvalUsageError(f"{path}: model {name!r}: 'temperature' must map category -> temperature")
        settings = AnswerSettings(parse_temperatures([f"{k}={v}" for k, v in temps.items()]),
                                  int(m.get("max_tokens", 1024)), m.get("system"))
        counts = run_answers(questions, _endpoint(f"model {name!r}", m, str(m.get("model", name))), target,
                             model_id=name, settings=settings, parallel=parallel, force=force)
        log.info("answers of %s: %s", name, counts)
        failed += counts["errors"]

    j = cfg["judge"]
    refs = load_references(rel(j["reference"])) if j.get("reference") else {}
    cats = j.get("reference_categories", list(REFERENCE_CATEGORIES))
    judgments = out_dir / "judgments.jsonl"
    counts = run_judge(
        questions, answers_dir, [str(m["name"]) for m in cfg["models"]], _endpoint("judge", j, str(j["model"])),
        judgments, mode=j.get("mode", "pairwise-score"), baseline=j.get("baseline"), references=refs,
        reference_categories=cats, swap=bool(j.get("swap", True)), prompts=load_prompts(j.get("prompts", "vicuna-judge-v1")),
        parallel=parallel, force=force, max_tokens=int(j.get("max_tokens", 2048)),
    )
    log.info("judgments: %s", counts)
    failed += counts["error"]
    report_cfg = cfg.get("report") or {}
    res = write_report(judgments, out_dir / "report", baseline=j.get("baseline"), force=True,
                       bootstrap_rounds=int(report_cfg.get("bootstrap_rounds", 1000)))
    print(f"{out_dir / 'report' / 'report.md'}: {res['judgments']['total']} judgments "
          f"({res['judgments']['unparsed']} unparsed, {res['judgments']['error']} failed)")
    return 1 if failed else 0
