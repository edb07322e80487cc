"""`eval run`: answer + judge + report from one config -- a YAML file or the command's flags."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import EvalUsageError
from .answer import AnswerSettings, parse_temperatures, run_answers
from .openai_client import DEFAULT_API_KEY_ENV, DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Endpoint
from .records import BUILTIN_QUESTIONS, find_answer_file, load_questions, load_references
from .judge import judged_exit_code, resolve_setup, run_judge
from .judge_prompts import REFERENCE_CATEGORIES
from .report import write_report

log = logging.getLogger(__name__)

_TOP = {"questions", "output_dir", "parallel", "models", "judge", "report"}
_MODEL = {"name", "model", "api_base", "api_key_env", "answers", "temperature", "max_tokens", "system", "timeout",
          "retries", "backoff"}
_JUDGE = {"model", "api_base", "api_key_env", "mode", "baseline", "reference", "reference_categories", "swap",
          "prompts", "judge_prompts", "judge_reviewers", "protocol", "max_tokens", "min_parsed", "timeout", "retries",
          "backoff"}
_REPORT = {"bootstrap_rounds", "relative_to", "price_input", "price_output", "strong_weight"}


def _whole(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise EvalUsageError(f"{where} must be a whole number >= 1, got {value!r}")
    return int(value)


def _check_keys(where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise EvalUsageError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _endpoint(where: str, d: dict, model: str) -> Endpoint:
    try:
        return Endpoint(api_base=d.get("api_base"), model=model, api_key_env=d.get("api_key_env", DEFAULT_API_KEY_ENV),
                        timeout=float(d.get("timeout", DEFAULT_TIMEOUT)),
                        retries=int(d.get("retries", DEFAULT_RETRIES)),
                        backoff=float(d.get("backoff", DEFAULT_BACKOFF)))
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
    return check_config(cfg, str(path))


def check_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(where, cfg, _TOP)
    models = cfg.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and m.get("name") for m in models):
        raise EvalUsageError(f"{where}: 'models' must be a list of mappings, each with a 'name'")
    for m in models:
        _check_keys(f"{where}: model {m['name']!r}", m, _MODEL)
        if "answers" not in m and "api_base" not in m:
            raise EvalUsageError(f"{where}: model {m['name']!r} needs 'api_base' (to answer) or 'answers' (a file)")
    judge = cfg.get("judge")
    if not isinstance(judge, dict) or not judge.get("model"):
        raise EvalUsageError(f"{where}: 'judge' must be a mapping with at least 'model'")
    _check_keys(f"{where}: judge", judge, _JUDGE)
    _check_keys(f"{where}: report", cfg.get("report") or {}, _REPORT)
    if (cfg.get("report") or {}).get("strong_weight") is not None:  # fail before any judge call is paid
        _whole(cfg["report"]["strong_weight"], f"{where}: report.strong_weight")
    return cfg


def config_from_flags(args, *, prices: tuple[float, float] | None) -> dict[str, Any]:
    """`eval run --protocol ... --answers ... --model ...` -> the same config a YAML file gives."""
    if not args.judge_model:
        raise EvalUsageError("--judge-model is required (or give a YAML config)")
    models: list[dict[str, Any]] = []
    if args.model or args.api_base:
        if not (args.model and args.api_base):
            raise EvalUsageError("--model and --api-base go together: the model to answer and where it is served")
        models.append({"name": args.model_id or args.model.replace("/", "_"), "model": args.model,
                       "api_base": args.api_base, "max_tokens": args.max_answer_tokens, "timeout": args.timeout})
    if args.models:
        if not args.answers:
            raise EvalUsageError("--models names answer files: give their folder with --answers")
        models += [{"name": m, "answers": str(find_answer_file(args.answers, m))}
                   for m in (x.strip() for x in args.models.split(",")) if m]
    if not models:
        raise EvalUsageError("nothing to evaluate: give --model and --api-base (to answer) and/or --answers and --models")
    judge = {"model": args.judge_model, "api_base": args.judge_api_base, "api_key_env": args.judge_api_key_env,
             "protocol": args.protocol, "judge_prompts": args.judge_prompts, "judge_reviewers": args.judge_reviewers,
             "prompts": args.prompts, "mode": args.mode, "baseline": args.baseline, "reference": args.reference,
             "reference_categories": [c for c in args.reference_categories.split(",") if c],
             "swap": False if args.no_swap else None, "max_tokens": args.max_tokens, "min_parsed": args.min_parsed,
             "timeout": args.timeout}
    report = {"bootstrap_rounds": args.bootstrap_rounds, "relative_to": args.relative_to,
              "strong_weight": args.strong_weight}
    if prices:
        report.update(price_input=prices[0], price_output=prices[1])
    models = [{k: v for k, v in m.items() if v is not None} for m in models]
    cfg = {"questions": str(args.questions or BUILTIN_QUESTIONS), "output_dir": str(args.output or "eval-out"),
           "parallel": args.parallel or 4, "models": models,
           "judge": {k: str(v) if isinstance(v, Path) else v for k, v in judge.items() if v is not None},
           "report": {k: v for k, v in report.items() if v is not None}}
    return check_config(cfg, "eval run")


def run_config(path: Path | None, *, force: bool = False, cfg: dict[str, Any] | None = None) -> int:
    """Run a config file (paths relative to it) or a ready config (paths relative to the working folder)."""
    cfg = cfg if cfg is not None else load_config(path)
    where = str(path) if path else "eval run"
    base = Path(path).parent if path else Path.cwd()
    rel = lambda p: Path(p) if Path(p).is_absolute() else base / p  # noqa: E731
    out_dir = rel(cfg.get("output_dir", "eval-out"))
    questions_path = cfg.get("questions", BUILTIN_QUESTIONS)
    questions = load_questions(questions_path if questions_path == BUILTIN_QUESTIONS else rel(questions_path))
    parallel = int(cfg.get("parallel", 4))
    j = cfg["judge"]
    setup = resolve_setup(protocol=j.get("protocol"), mode=j.get("mode"),
                          judge_prompts=rel(j["judge_prompts"]) if j.get("judge_prompts") else None,
                          judge_reviewers=rel(j["judge_reviewers"]) if j.get("judge_reviewers") else None,
                          prompts=j.get("prompts"), swap=j.get("swap"))  # before answering: fail fast
    answers_dir = out_dir / "answers"
    answers_dir.mkdir(parents=True, exist_ok=True)
    failed = 0

    for m in cfg["models"]:
        name = str(m["name"])
        target = answers_dir / f"{name}.jsonl"
        if "answers" in m:
            src = rel(m["answers"])
            if not src.exists():
                raise EvalUsageError(f"{where}: model {name!r}: answers file {src} does not exist")
            if force or not target.exists():
                shutil.copyfile(src, target)
            continue
        temps = m.get("temperature") or {}
        if not isinstance(temps, dict):
            raise EvalUsageError(f"{where}: model {name!r}: 'temperature' must map category -> temperature")
        settings = AnswerSettings(parse_temperatures([f"{k}={v}" for k, v in temps.items()]),
                                  int(m.get("max_tokens", 1024)), m.get("system"))
        counts = run_answers(questions, _endpoint(f"model {name!r}", m, str(m.get("model", name))), target,
                             model_id=name, settings=settings, parallel=parallel, force=force)
        log.info("answers of %s: %s", name, counts)
        failed += counts["errors"]

    refs = load_references(rel(j["reference"])) if j.get("reference") else {}
    judgments = out_dir / "judgments.jsonl"
    counts = run_judge(
        questions, answers_dir, [str(m["name"]) for m in cfg["models"]], _endpoint("judge", j, str(j["model"])),
        judgments, setup=setup, baseline=j.get("baseline"), references=refs,
        reference_categories=j.get("reference_categories", list(REFERENCE_CATEGORIES)), parallel=parallel,
        force=force, max_tokens=int(j["max_tokens"]) if j.get("max_tokens") else None,
    )
    log.info("judgments: %s", counts)
    r = cfg.get("report") or {}
    prices = (float(r["price_input"]), float(r["price_output"])) if "price_input" in r else None
    res = write_report(judgments, out_dir / "report", baseline=j.get("baseline"), relative_to=r.get("relative_to"),
                       prices=prices, force=True, bootstrap_rounds=int(r.get("bootstrap_rounds", 1000)),
                       strong_weight=_whole(r.get("strong_weight") or 3, f"{where}: report.strong_weight"))
    print(f"{out_dir / 'report' / 'report.md'}: {res['judgments']['total']} judgments "
          f"({res['judgments']['unparsed']} unparsed, {res['judgments']['error']} failed)")
    status = judged_exit_code(counts["file"], float(j.get("min_parsed", 0.5)), judgments)
    return 1 if failed else status
