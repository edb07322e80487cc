"""`vicuna eval answer|judge|report|parse|run|prompts`: thin shims over the eval modules."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from ..cli import area_parser, command
from .io import BUILTIN_QUESTIONS, EvalUsageError, load_questions, load_references
from .parse import MODES, parse_judgment

log = logging.getLogger(__name__)

# The shared help formatter appends "(default: X)"; where the text already states the real
# default, this empty format field (it renders as "") tells argparse not to.
_OWN_DEFAULT = "%(default).0s"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"  # kept here, not imported: `openai` takes ~1 s to import
_QUESTIONS_HELP = ("question file (.jsonl/.json): {question_id, category, turns[, reference]} or the older "
                   "{question_id, text, category}; 'builtin' = the bundled 20-question set")


def add_commands(sub) -> None:
    verbs = area_parser(sub, "eval", "evaluate models with an LLM judge (Vicuna-80 / MT-bench style)")

    p = command(verbs, "answer", _answer, "answer a question set with a model behind an OpenAI-compatible API",
                description="""\
Answer every question (all turns, earlier answers fed back) with a model served behind any
OpenAI-compatible endpoint (vicuna serve, vLLM, OpenAI, ...).

Output: JSONL, one record per question: {question_id, model_id, choices: [{turns: [...]}],
status: ok|error, error, generation, tstamp} (MT-bench answer format plus status).
Resumable: re-running skips questions already answered; failed ones are retried.
Requests are retried with exponential backoff on timeouts, 429 and 5xx; a question that
keeps failing is recorded with status "error" and the run goes on.
Temperature per category: writing/roleplay 0.7, stem/humanities 0.1, math/coding/
reasoning/extraction 0 (greedy), others 0.7; override with --temperature.

example:
  vicuna serve --model-path ./my-model --port 8000 &
  vicuna eval answer --model my-model --api-base http://127.0.0.1:8000/v1 -o answers/my-model.jsonl
""")
    p.add_argument("--questions", default=BUILTIN_QUESTIONS, help=_QUESTIONS_HELP)
    p.add_argument("--model", help="model name sent to the API (required with --api-base)")
    p.add_argument("--model-path", help="answer with this local model, served in-process on 127.0.0.1 "
                   "(default when neither --api-base nor $OPENAI_BASE_URL is set: the bundled demo model)")
    p.add_argument("--model-id", help="name recorded in the answers and used by `eval judge --models` "
                   "(default: --model with '/' replaced by '_')" + _OWN_DEFAULT)
    _endpoint_args(p, "")
    p.add_argument("-o", "--output", help="answer file (.jsonl) (default: answers/MODEL_ID.jsonl)" + _OWN_DEFAULT)
    p.add_argument("--temperature", action="append", metavar="CAT=T",
                   help="per-category temperature override, e.g. writing=0.9,math=0; default=T for other categories")
    p.add_argument("--max-tokens", type=int, default=1024, help="max new tokens per answer turn")
    p.add_argument("--system", help="system prompt to send first (default: none; the server's template decides)" + _OWN_DEFAULT)
    _common_run_args(p)

    p = command(verbs, "judge", _judge, "judge answers with an LLM judge (pairwise-score, pairwise or single)",
                description="""\
Ask a judge model to grade answers (from `eval answer`, or MT-bench / Vicuna-blog answer files).

Modes:
  pairwise-score  Vicuna blog protocol: both answers in one prompt, the judge writes two
                  1-10 scores on its first line, then explains.
  pairwise        MT-bench style verdict: [[A]], [[B]] or [[C]] (tie).
  single          one answer graded 1-10 ("Rating: [[7]]").
Every pairwise comparison is judged in both orders (--no-swap to disable); the report counts
disagreeing orders as a tie and averages pairwise-score scores. Math, reasoning and coding
questions get reference-guided prompts when a reference exists (--reference, else the
question's own 'reference'). With --baseline each model is compared with the baseline only,
otherwise every pair is compared.

Output: JSONL, one record per judge call: {judgment_id, question_id, category, turn, mode,
model_a, model_b, order, positions, baseline, judge_model, prompt_version, prompt_sha,
reference_guided, status: ok|unparsed|error, raw, parsed, result, error, attempts, tstamp}.
Unparsed outputs are kept and counted in reports. Resumable: re-running skips finished
judgments (errors are retried); --force starts over.

example:
  vicuna eval judge --answers answers/ --models my-model,gpt-3.5-turbo --baseline gpt-3.5-turbo \\
      --judge-model gpt-4o --judge-api-base https://api.openai.com/v1 --mode pairwise-score \\
      -o judgments.jsonl --parallel 8
""")
    p.add_argument("--questions", default=BUILTIN_QUESTIONS, help=_QUESTIONS_HELP)
    p.add_argument("--answers", required=True, type=Path,
                   help="folder with one answer file per model: MODEL.jsonl (or answer_MODEL.jsonl)")
    p.add_argument("--models", required=True, help="comma-separated model ids (answer file names)")
    p.add_argument("--judge-model", required=True, help="judge model name sent to the API")
    _endpoint_args(p, "judge-")
    p.add_argument("--mode", choices=MODES, default="pairwise-score", help="judging protocol")
    p.add_argument("--baseline", help="compare every model with this one only (must be in --models)")
    p.add_argument("--reference", type=Path,
                   help="reference answers (.jsonl): answer records (choices[0].turns) or questions with 'reference'")
    p.add_argument("--reference-categories", default=",".join(("math", "reasoning", "coding")),
                   help="categories judged with reference-guided prompts")
    p.add_argument("--no-swap", action="store_true", help="judge each pair in one order only (no position-bias control)")
    p.add_argument("--prompts", default="vicuna-judge-v1",
                   help="judge prompt set: a bundled name (see `vicuna eval prompts`) or a YAML file")
    p.add_argument("-o", "--output", type=Path, default=Path("judgments.jsonl"), help="judgment file (.jsonl)")
    p.add_argument("--max-tokens", type=int, default=2048, help="max tokens of one judgment")
    _common_run_args(p)

    p = command(verbs, "report", _report, "scores, win rates, ratings and charts from judgments",
                description="""\
Summarise judgments into report.md, results.json and PNG charts (relative_scores.png,
categories.png) in the output folder.

Reported per model (and per category): total scores and the relative score vs the baseline
(sum of the model's scores / sum of the baseline's over the same comparisons, as in "90% of
ChatGPT"), win/tie/loss counts, win rate (wins/n) and adjusted win rate ((wins + ties/2)/n),
MT-bench average score per turn, Bradley-Terry ratings on the Elo scale with bootstrap 95%
intervals, unparsed and failed judgment counts, and the judge's position consistency (share
of swapped comparisons whose two orders agree; a disagreement counts as a tie).
Comparisons with an unparsed or failed judgment are counted but not scored.

example:
  vicuna eval report --judgments judgments.jsonl --baseline gpt-3.5-turbo -o report/
""")
    p.add_argument("--judgments", required=True, type=Path, help="output of `vicuna eval judge`")
    p.add_argument("--baseline", help="model to compare with (default: the judge run's baseline, if any)" + _OWN_DEFAULT)
    p.add_argument("-o", "--output", type=Path, default=Path("report"), help="report folder")
    p.add_argument("--bootstrap-rounds", type=int, default=1000, help="bootstrap rounds for rating intervals")
    p.add_argument("--force", action="store_true", help="replace an existing report in the folder")

    p = command(verbs, "parse", _parse, "parse raw judge outputs from a JSONL file (debugging, importing)",
                description="""\
Read judge outputs (one per line of a JSONL file, in --field) and print one JSON result per
line: {"status": "ok"|"unparsed", "scores": [s1, s2]} (pairwise-score), {"score": s}
(single) or {"verdict": "A"|"B"|"tie"} (pairwise); unparsed results carry a "reason".

example:
  vicuna eval parse --mode pairwise-score judgments.jsonl --field raw
""")
    p.add_argument("file", type=Path, help="JSONL file; '-' reads stdin")
    p.add_argument("--mode", choices=MODES, required=True, help="what to look for")
    p.add_argument("--field", default="text", help="field holding the judge's text")

    p = command(verbs, "run", _run, "answer + judge + report from one YAML config",
                description="""\
Run a whole evaluation from a YAML file. Every step is resumable, so re-running after an
interruption continues where it stopped. Outputs go to output_dir: answers/MODEL.jsonl,
judgments.jsonl, report/.

example config:
  questions: builtin            # or a path
  output_dir: eval-out
  parallel: 4
  models:
    - name: my-model            # answers are generated through the API
      api_base: http://127.0.0.1:8000/v1
      model: my-model           # API model name (default: name)
      temperature: {writing: 0.9}
    - name: gpt-3.5-turbo       # existing answers, nothing is generated
      answers: answers/gpt-3.5-turbo.jsonl
  judge:
    model: gpt-4o
    api_base: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    mode: pairwise-score        # or pairwise, single
    baseline: gpt-3.5-turbo
    swap: true
    prompts: vicuna-judge-v1

  vicuna eval run eval.yaml
""")
    p.add_argument("config", type=Path, help="YAML config (see above)")
    p.add_argument("--force", action="store_true", help="start every step over, replacing earlier outputs")

    p = command(verbs, "prompts", _prompts, "list the bundled judge prompt sets or show one")
    p.add_argument("name", nargs="?", help="prompt set to print")


def _endpoint_args(p, prefix: str) -> None:
    p.add_argument(f"--{prefix}api-base", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                   "(default: $OPENAI_BASE_URL, else api.openai.com)" + _OWN_DEFAULT)
    p.add_argument(f"--{prefix}api-key-env", default=DEFAULT_API_KEY_ENV,
                   help="environment variable holding the API key (unset: no key, fine for local servers)")
    p.add_argument(f"--{prefix}timeout", type=float, default=120.0, help="seconds before one request times out")
    p.add_argument(f"--{prefix}retries", type=int, default=5, help="retries of a failed request (429/5xx/timeouts)")
    p.add_argument(f"--{prefix}backoff", type=float, default=1.0,
                   help="first retry wait in seconds; doubles each retry (honours Retry-After)")


def _common_run_args(p) -> None:
    p.add_argument("--parallel", type=int, default=4, help="concurrent requests")
    p.add_argument("--force", action="store_true", help="start over, replacing the output (default: resume it)" + _OWN_DEFAULT)


def _endpoint(args, prefix: str, model: str):
    from .client import Endpoint

    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    if get("retries") < 0 or get("timeout") <= 0 or get("backoff") < 0:
        raise EvalUsageError("--retries and --backoff must be >= 0 and --timeout > 0")
    return Endpoint(api_base=get("api_base"), model=model, api_key_env=get("api_key_env"), timeout=get("timeout"),
                    retries=get("retries"), backoff=get("backoff"))


def _check_parallel(n: int) -> int:
    if n < 1:
        raise EvalUsageError("--parallel must be >= 1")
    return n


def _answer(args) -> int:
    from .answer import AnswerSettings, parse_temperatures, run_answers

    if args.max_tokens < 1:
        raise EvalUsageError("--max-tokens must be >= 1")
    local = args.model_path or not (args.api_base or os.environ.get("OPENAI_BASE_URL"))
    if not local and not args.model:
        raise EvalUsageError("--model is required with --api-base (the model name the endpoint serves)")
    questions = load_questions(args.questions)
    settings = AnswerSettings(parse_temperatures(args.temperature), args.max_tokens, args.system)
    with _local_server(args.model_path) if local else contextlib.nullcontext((args.api_base, args.model)) as (
            api_base, served):
        args.api_base = api_base
        model_id = args.model_id or (args.model or served).replace("/", "_")
        output = Path(args.output or Path("answers") / f"{model_id}.jsonl")
        counts = run_answers(questions, _endpoint(args, "", served), output, model_id=model_id, settings=settings,
                             parallel=_check_parallel(args.parallel), force=args.force)
    print(f"{output}: {counts['answered']} answered, {counts['skipped']} already done, {counts['errors']} failed")
    return 1 if counts["errors"] else 0


@contextlib.contextmanager
def _local_server(model_path: str | None):
    """Serve a local model (default: the bundled demo) on a free loopback port for the answering run.

    The answers then go through exactly the path a remote model's do: our OpenAI API, the same
    batching engine, the same retries.
    """
    from ..model import load_model, resolve_model_path
    from ..serve.client import LocalClient
    from ..serve.engine import EngineConfig, HFEngine
    from ..serve.openai_api import create_app
    from ..serve.server import ServerThread

    loaded = load_model(resolve_model_path(model_path))
    engine = HFEngine(loaded, EngineConfig()).start()
    try:
        with ServerThread(create_app(LocalClient({loaded.name: engine}))) as url:
            yield f"{url}/v1", loaded.name
    finally:
        engine.stop()


def _split(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _judge(args) -> int:
    from .judge import load_prompts, run_judge

    endpoint = _endpoint(args, "judge_", args.judge_model)
    refs = load_references(args.reference) if args.reference else {}
    counts = run_judge(
        load_questions(args.questions), args.answers, _split(args.models), endpoint, args.output, mode=args.mode,
        baseline=args.baseline, references=refs, reference_categories=_split(args.reference_categories),
        swap=not args.no_swap, prompts=load_prompts(args.prompts), parallel=_check_parallel(args.parallel),
        force=args.force, max_tokens=args.max_tokens,
    )
    print(f"{args.output}: {counts['ok']} judged, {counts['unparsed']} unparsed, {counts['error']} failed, "
          f"{counts['skipped_done']} already done, {counts['missing_answers']} skipped (missing answers)")
    return 1 if counts["error"] else 0


def _report(args) -> int:
    from .report import write_report

    if args.bootstrap_rounds < 1:
        raise EvalUsageError("--bootstrap-rounds must be >= 1")
    res = write_report(args.judgments, args.output, baseline=args.baseline, force=args.force,
                       bootstrap_rounds=args.bootstrap_rounds)
    j = res["judgments"]
    print(f"{args.output}/report.md: {j['total']} judgments ({j['unparsed']} unparsed, {j['error']} failed)")
    return 0


def _parse(args) -> int:
    name = "<stdin>" if str(args.file) == "-" else str(args.file)
    try:
        text = sys.stdin.read() if name == "<stdin>" else args.file.read_text(encoding="utf-8")
    except OSError as e:
        raise EvalUsageError(f"cannot read {name}: {e.strerror or e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalUsageError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or args.field not in rec:
            raise EvalUsageError(f"{name}:{n}: no field {args.field!r} (choose the field with --field)")
        value = rec[args.field]
        print(json.dumps(parse_judgment(args.mode, value if isinstance(value, str) else None)), flush=True)
    return 0


def _prompts(args) -> int:
    from .judge import list_prompt_sets, load_prompts

    if not args.name:
        for name in list_prompt_sets():
            print(name)
        return 0
    ps = load_prompts(args.name)
    print(f"# {ps.version} (sha {ps.sha})")
    for mode, p in ps.prompts.items():
        print(f"\n## {mode}\n[system]\n{p['system'].strip()}\n[user]\n{p['user'].strip()}")
    return 0


def _run(args) -> int:
    from .pipeline import run_config

    return run_config(args.config, force=args.force)
