"""`vicuna eval answer|judge|report|parse|run|prompts`: thin shims over the eval modules."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from ..commands import area_parser, command
from ..errors import EvalUsageError
from .records import BUILTIN_QUESTIONS, load_questions, load_references
from .judge_prompts import PROTOCOLS, REFERENCE_CATEGORIES
from .parse import MODES, parse_judgment
from .openai_client import DEFAULT_API_KEY_ENV, DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT

log = logging.getLogger(__name__)

# The shared help formatter appends "(default: X)"; where the text already states the real
# default, this empty format field (it renders as "") tells argparse not to.
_OWN_DEFAULT = "%(default).0s"
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
                   "(default when neither --api-base nor $OPENAI_BASE_URL is set: the default real model, "
                   "SmolLM2-135M-Instruct; 'demo' = the bundled 1.4M demo model)")
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
  pairwise-5      Arena-Hard's five-level verdicts: [[A>>B]], [[A>B]], [[A=B]], [[B>A]], [[B>>A]]
                  (the arena-hard judge prompt; see --protocol arena-hard).
Every pairwise comparison is judged in both orders (--no-swap to disable); the report counts
disagreeing orders as a tie and averages pairwise-score scores. Math, reasoning and coding
questions get reference-guided prompts when a reference exists (--reference, else the
question's own 'reference'). With --baseline each model is compared with the baseline only,
otherwise every pair is compared.

Published protocols (--protocol, with FastChat's prompt files in --judge-prompts):
  mt-bench-single    MT-bench single-answer grading with FastChat's judge_prompts.jsonl: turn 1
                     single-v1 (math/reasoning/coding: single-math-v1 with the reference), turn 2
                     the -multi-turn prompts; temperature 0, 2048 tokens. The report's avg score
                     is the MT-bench score.
  mt-bench-pairwise  the same prompts' pair-v2 / pair-math-v1 verdicts, both orders, vs --baseline.
  vicuna-blog        the original Vicuna evaluation: prompt.jsonl + --judge-reviewers reviewer.jsonl,
                     general/coding/math prompt by category, temperature 0.2, 1024 tokens, each
                     model shown first and --baseline second, one order.
  arena-hard         Arena-Hard-Auto: each model vs one fixed --baseline on the first turn, five-level
                     verdicts, both orders (two games), temperature 0, 4096 tokens. The judge prompt
                     is our own wording in Arena-Hard's judge_config.yaml shape, or the config given
                     with --judge-prompts (system_prompt, prompt_template with {question_1},
                     {answer_1}, {answer_2}); nothing is downloaded. Question files in Arena-Hard's
                     shape (uid or question_id, category, turns [{content}] or prompt) are read.
                     The report adds the weighted tally and win rates vs the baseline (raw and
                     style-controlled) with bootstrap 95% intervals.

Output: JSONL, one record per judge call: {judgment_id, question_id, category, turn, mode,
protocol, model_a, model_b, order, positions, baseline, judge_model, prompt_version,
prompt_name, prompt_sha, temperature, max_tokens, reference_guided, answer_lengths,
answer_style (tokens, headers, lists, bold of each answer), status: ok|unparsed|error, raw,
parsed, result, error, attempts, usage, tstamp}.
Unparsed outputs are kept and counted; the run exits 1 when fewer than --min-parsed of the
judgments parsed. Resumable: re-running skips finished judgments (errors are retried);
--force starts over. Ctrl+C keeps every finished judgment and exits 130. A second run on
the same output is refused while the first runs.

examples:
  vicuna eval judge --answers answers/ --models my-model,gpt-3.5-turbo --baseline gpt-3.5-turbo \\
      --judge-model gpt-4o --judge-api-base https://api.openai.com/v1 --mode pairwise-score \\
      -o judgments.jsonl --parallel 8
  vicuna eval judge --protocol mt-bench-single --judge-prompts judge_prompts.jsonl \\
      --questions mt_bench/question.jsonl --reference mt_bench/reference_answer/gpt-4.jsonl \\
      --answers answers/ --models my-model --judge-model gpt-4 -o mt-judgments.jsonl
  vicuna eval judge --protocol arena-hard --questions arena-hard/question.jsonl \\
      --answers answers/ --models my-model,gpt-4-0314 --baseline gpt-4-0314 \\
      --judge-model gpt-4o -o arena-hard-judgments.jsonl
""")
    p.add_argument("--questions", default=BUILTIN_QUESTIONS, help=_QUESTIONS_HELP)
    p.add_argument("--answers", required=True, type=Path,
                   help="folder with one answer file per model: MODEL.jsonl (or answer_MODEL.jsonl)")
    p.add_argument("--models", required=True, help="comma-separated model ids (answer file names)")
    p.add_argument("--judge-model", required=True, help="judge model name sent to the API")
    _endpoint_args(p, "judge-")
    _judging_args(p)
    p.add_argument("-o", "--output", type=Path, default=Path("judgments.jsonl"), help="judgment file (.jsonl)")
    _common_run_args(p)

    p = command(verbs, "report", _report, "scores, win rates, ratings and charts from judgments",
                description="""\
Summarise judgments into report.md, results.json and PNG charts (relative_scores.png,
categories.png) in the output folder.

Reported per model (and per category): total scores and the relative score vs the baseline
(sum of the model's scores / sum of the baseline's over the same comparisons, as in "90% of
ChatGPT"), win/tie/loss counts, win rate (wins/n) and adjusted win rate ((wins + ties/2)/n),
length-controlled win rate (AlpacaEval-2 style: a logistic fit on the answers' length
difference, predicted at equal length), MT-bench average score per turn, Bradley-Terry
ratings on the Elo scale with bootstrap 95% intervals, the same style-controlled (answer
token length and markdown headers/lists/bold as covariates, normalised as FastChat's
leaderboard does: (a-b)/(a+b) per feature, standardised), unparsed and failed judgment counts,
the judge's position consistency (share of swapped comparisons whose two orders agree; a
disagreement counts as a tie), and the judge's token usage (and cost with --price-input and
--price-output). Five-level (arena-hard) judgments add Arena-Hard's table: the tally of
verdicts vs the baseline, and the win rate vs the baseline from Bradley-Terry ratings (each
order one game, a strong verdict counted --strong-weight times, the baseline held at 1000),
raw and style-controlled, with bootstrap 95% intervals. --relative-to R states every model's relative score as a share of R's,
through the baseline (the Vicuna blog's "% of ChatGPT").
Comparisons with an unparsed or failed judgment are counted but not scored.

examples:
  vicuna eval report --judgments judgments.jsonl --baseline gpt-3.5-turbo -o report/
  vicuna eval report --judgments blog.jsonl --baseline vicuna-13b --relative-to gpt35 \\
      --price-input 30 --price-output 60 -o blog-report/
""")
    p.add_argument("--judgments", required=True, type=Path, help="output of `vicuna eval judge`")
    p.add_argument("--baseline", help="model to compare with (default: the judge run's baseline, if any)" + _OWN_DEFAULT)
    p.add_argument("-o", "--output", type=Path, default=Path("report"), help="report folder")
    _report_args(p)
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

    p = command(verbs, "run", _run, "answer + judge + report in one command (a YAML config or a --protocol)",
                description="""\
Run a whole evaluation: answer (models with an API), judge, report. Every step is
resumable, so re-running after an interruption continues where it stopped. Outputs go to
the output folder: answers/MODEL.jsonl, judgments.jsonl, report/.

Either from a YAML config (example below), or from flags: --protocol with FastChat's
prompt files, existing answers (--answers DIR --models a,b) and/or one model to answer
(--model NAME --api-base URL).

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
    prompts: vicuna-judge-v1    # or judge_prompts: FILE.jsonl (+ judge_reviewers:), protocol: NAME
  report:
    bootstrap_rounds: 1000

examples:
  vicuna eval run eval.yaml
  # an MT-bench score (FastChat's data files; the model served on port 8000)
  vicuna eval run --protocol mt-bench-single --questions mt_bench/question.jsonl \\
      --reference mt_bench/reference_answer/gpt-4.jsonl --judge-prompts judge_prompts.jsonl \\
      --model my-model --api-base http://127.0.0.1:8000/v1 \\
      --judge-model gpt-4 --judge-api-base https://api.openai.com/v1 -o mt-bench-out
  # Arena-Hard-Auto: win rate vs a fixed baseline whose answers are in --answers
  vicuna eval run --protocol arena-hard --questions arena-hard-v0.1/question.jsonl \\
      --answers arena-hard-v0.1/model_answer --models gpt-4-0314 --baseline gpt-4-0314 \\
      --model my-model --api-base http://127.0.0.1:8000/v1 \\
      --judge-model gpt-4o --judge-api-base https://api.openai.com/v1 -o arena-hard-out
""")
    p.add_argument("config", type=Path, nargs="?", help="YAML config (see above); or give the flags below")
    p.add_argument("--questions", help=_QUESTIONS_HELP + " (default: builtin)" + _OWN_DEFAULT)
    p.add_argument("--answers", type=Path, help="folder with existing answers (MODEL.jsonl or answer_MODEL.jsonl)")
    p.add_argument("--models", help="comma-separated model ids whose answers are in --answers")
    p.add_argument("--model", help="a model to answer first: its name at --api-base")
    p.add_argument("--api-base", help="OpenAI-compatible base URL serving --model")
    p.add_argument("--model-id", help="name of --model's answers (default: --model with '/' replaced by '_')"
                   + _OWN_DEFAULT)
    p.add_argument("--max-answer-tokens", type=int, help="max new tokens per answer turn (default 1024)" + _OWN_DEFAULT)
    p.add_argument("--judge-model", help="judge model name sent to the API")
    p.add_argument("--judge-api-base", help="the judge's OpenAI-compatible base URL (default: $OPENAI_BASE_URL)"
                   + _OWN_DEFAULT)
    p.add_argument("--judge-api-key-env", help="environment variable with the judge's API key (default: "
                   "OPENAI_API_KEY)" + _OWN_DEFAULT)
    _judging_args(p)
    _report_args(p)
    p.add_argument("-o", "--output", type=Path, help="output folder (default: eval-out)" + _OWN_DEFAULT)
    p.add_argument("--parallel", type=int, help="concurrent requests (default 4)" + _OWN_DEFAULT)
    p.add_argument("--timeout", type=float, help="seconds before one request (answer or judgment) times out "
                   f"(default {DEFAULT_TIMEOUT:g})" + _OWN_DEFAULT)
    p.add_argument("--force", action="store_true", help="start every step over, replacing earlier outputs")

    p = command(verbs, "agreement", _agreement, "how often two judges, or a judge and arena voters, agree",
                description="""\
Agreement between two judges' judgments (two `eval judge` outputs on the same answers), or
between a judge and the human votes in an arena database, as in the MT-bench paper: per
turn and overall, "with ties" (every pair of votes; chance 1/3) and "without ties" (pairs
where neither vote is a tie; chance 1/2), with the counts behind each rate. A judge's vote
on a comparison is the one both answer orders agree on, else a tie.

For arena votes, first turn the battles into an eval set and judge it:
  vicuna eval arena-export --db arena.db -o arena-set/
  vicuna eval judge --questions arena-set/question.jsonl --answers arena-set/answers \\
      --models model_a,model_b --mode pairwise --judge-model gpt-4o -o arena-judgments.jsonl

examples:
  vicuna eval agreement gpt4-judgments.jsonl claude-judgments.jsonl
  vicuna eval agreement arena-judgments.jsonl --arena-db arena.db -o agreement.json
""")
    p.add_argument("first", type=Path, help="judgments (.jsonl) of the first judge")
    p.add_argument("second", type=Path, nargs="?", help="judgments of the second judge (or give --arena-db)")
    p.add_argument("--arena-db", type=Path, help="the arena's SQLite file (read only): its votes are the second judge")
    p.add_argument("-o", "--output", type=Path, help="also write the numbers as JSON here")

    p = command(verbs, "arena-export", _arena_export, "turn arena votes into questions and answers to judge",
                description="""\
Write every valid vote of an arena database as one question (id arena-<vote id>, the
conversation's user turns) answered by model_a and model_b, the two sides the voter saw:
DIR/question.jsonl and DIR/answers/model_a.jsonl, model_b.jsonl (each record also names
the real model). Void votes and battles whose two sides differ in their user turns are
skipped. The database is only read.

example:
  vicuna eval arena-export --db arena.db -o arena-set/
""")
    p.add_argument("--db", required=True, type=Path, help="the arena's SQLite file")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an earlier export in the folder")

    p = command(verbs, "prompts", _prompts, "list the bundled judge prompt sets, show one, or check a FastChat file")
    p.add_argument("name", nargs="?", help="prompt set to print, or a FastChat .jsonl file to list with hashes")
    p.add_argument("--judge-reviewers", type=Path, help="the reviewer.jsonl of a Vicuna-blog prompt.jsonl")


def _endpoint_args(p, prefix: str) -> None:
    p.add_argument(f"--{prefix}api-base", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                   "(default: $OPENAI_BASE_URL, else api.openai.com)" + _OWN_DEFAULT)
    p.add_argument(f"--{prefix}api-key-env", default=DEFAULT_API_KEY_ENV,
                   help="environment variable holding the API key (unset: no key, fine for local servers)")
    p.add_argument(f"--{prefix}timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds before one request times out")
    p.add_argument(f"--{prefix}retries", type=int, default=DEFAULT_RETRIES,
                   help="retries of a failed request (429/5xx/timeouts)")
    p.add_argument(f"--{prefix}backoff", type=float, default=DEFAULT_BACKOFF,
                   help="first retry wait in seconds; doubles each retry (honours Retry-After)")


def _judging_args(p) -> None:
    p.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="a published procedure: " + "; ".join(f"{n}: {x.help}" for n, x in PROTOCOLS.items()))
    p.add_argument("--judge-prompts", type=Path,
                   help="judge prompts: FastChat's MT-bench judge_prompts.jsonl, the Vicuna blog's prompt.jsonl, or an "
                   "Arena-Hard judge_config.yaml (for --protocol arena-hard; default there: ours, bundled)")
    p.add_argument("--judge-reviewers", type=Path, help="the Vicuna blog's reviewer.jsonl (with its prompt.jsonl)")
    p.add_argument("--prompts", help="our own judge prompt set: a bundled name (see `vicuna eval prompts`) or a YAML "
                   "file (default: vicuna-judge-v1)" + _OWN_DEFAULT)
    p.add_argument("--mode", choices=MODES, help="judging mode (default: the protocol's; else pairwise-score; with an "
                   "MT-bench file single)" + _OWN_DEFAULT)
    p.add_argument("--baseline", help="compare every model with this one only (must be in --models)")
    p.add_argument("--reference", type=Path,
                   help="reference answers (.jsonl): answer records (choices[0].turns) or questions with 'reference'")
    p.add_argument("--reference-categories", default=",".join(REFERENCE_CATEGORIES),
                   help="categories judged with reference-guided prompts")
    p.add_argument("--no-swap", action="store_true", help="judge each pair in one order only (no position-bias control)")
    p.add_argument("--max-tokens", type=int, help="max tokens of one judgment (default: the prompts' own: 2048; "
                   "Vicuna blog: the reviewer's 1024)" + _OWN_DEFAULT)
    p.add_argument("--min-parsed", type=float, default=0.5,
                   help="exit 1 when a smaller share of the judgments (ok + unparsed) could be parsed")


def _report_args(p) -> None:
    p.add_argument("--relative-to", help="also state each model's relative score as a share of this model's, "
                   "through the baseline (the Vicuna blog's '%% of ChatGPT')")
    p.add_argument("--price-input", type=float, metavar="USD", help="judge price per 1M prompt tokens (with "
                   "--price-output: the report shows the cost)")
    p.add_argument("--price-output", type=float, metavar="USD", help="judge price per 1M completion tokens")
    p.add_argument("--bootstrap-rounds", type=int, default=1000, help="bootstrap rounds for rating intervals")
    p.add_argument("--strong-weight", type=int, default=None, help="games a strong five-level verdict ([[A>>B]]) "
                   "counts as (default 3, as Arena-Hard)" + _OWN_DEFAULT)


def _common_run_args(p) -> None:
    p.add_argument("--parallel", type=int, default=4, help="concurrent requests")
    p.add_argument("--force", action="store_true", help="start over, replacing the output (default: resume it)" + _OWN_DEFAULT)


def _endpoint(args, prefix: str, model: str):
    from .openai_client import Endpoint

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
    """Serve a local model (default: the default real model) on a free loopback port for the answering run.

    The answers then go through exactly the path a remote model's do: our OpenAI API, the same
    batching engine, the same retries.
    """
    from ..serve.launch import ModelConfig, local_api

    with local_api(ModelConfig(model_path=model_path)) as (api_base, engines):
        yield api_base, next(iter(engines))


def _split(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _judge(args) -> int:
    from .judge import judged_exit_code, resolve_setup, run_judge

    setup = resolve_setup(protocol=args.protocol, mode=args.mode, judge_prompts=args.judge_prompts,
                          judge_reviewers=args.judge_reviewers, prompts=args.prompts,
                          swap=False if args.no_swap else None)
    _check_judging(args)
    endpoint = _endpoint(args, "judge_", args.judge_model)
    refs = load_references(args.reference) if args.reference else {}
    counts = run_judge(
        load_questions(args.questions), args.answers, _split(args.models), endpoint, args.output, setup=setup,
        baseline=args.baseline, references=refs, reference_categories=_split(args.reference_categories),
        parallel=_check_parallel(args.parallel), force=args.force, max_tokens=args.max_tokens,
    )
    print(f"{args.output}: {counts['ok']} judged, {counts['unparsed']} unparsed, {counts['error']} failed, "
          f"{counts['skipped_done']} already done, {counts['missing_answers']} skipped (missing answers)")
    return judged_exit_code(counts["file"], args.min_parsed, args.output)


def _check_judging(args) -> None:
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalUsageError("--max-tokens must be >= 1")
    if not 0 <= args.min_parsed <= 1:
        raise EvalUsageError("--min-parsed is a share of the judgments: 0 to 1, e.g. 0.9")


def _prices(args) -> tuple[float, float] | None:
    if (args.price_input is None) != (args.price_output is None):
        raise EvalUsageError("give both --price-input and --price-output (USD per 1M tokens), or neither")
    if args.price_input is None:
        return None
    if args.price_input < 0 or args.price_output < 0:
        raise EvalUsageError("prices must be >= 0")
    return args.price_input, args.price_output


def _report(args) -> int:
    from .report import write_report

    if args.bootstrap_rounds < 1:
        raise EvalUsageError("--bootstrap-rounds must be >= 1")
    res = write_report(args.judgments, args.output, baseline=args.baseline, relative_to=args.relative_to,
                       prices=_prices(args), force=args.force, bootstrap_rounds=args.bootstrap_rounds,
                       strong_weight=3 if args.strong_weight is None else args.strong_weight)
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


def _is_arena_hard(path: str) -> bool:
    """An Arena-Hard judge_config.yaml (rather than one of our YAML prompt sets)?"""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "system_prompt" in data


def _prompts(args) -> int:
    from .judge_prompts import describe, list_prompt_sets, load_arena_hard_prompts, load_judge_prompts, load_prompts

    if not args.name:
        for name in list_prompt_sets():
            print(name)
        print("arena-hard  (the --protocol arena-hard judge prompt)")
        return 0
    if args.name == "arena-hard":
        book = load_arena_hard_prompts()
        print(f"# {book.version} (sha {book.prompt.sha}); temperature {book.prompt.temperature:g}, "
              f"max_tokens {book.prompt.max_tokens}")
        print(f"[system]\n{book.prompt.system.strip()}\n[user]\n{book.prompt.template.strip()}")
        return 0
    if args.name.endswith((".jsonl", ".yaml", ".yml")) and (args.name.endswith(".jsonl") or _is_arena_hard(args.name)):
        book = load_judge_prompts(Path(args.name), args.judge_reviewers)
        print(f"# {book.version}: {book.kind} prompts for mode {', '.join(book.modes)}")
        for name, sha in describe(book).items():
            print(f"{name}  sha {sha}")
        return 0
    ps = load_prompts(args.name)
    print(f"# {ps.version} (sha {ps.sha})")
    for mode, p in ps.prompts.items():
        print(f"\n## {mode}\n[system]\n{p['system'].strip()}\n[user]\n{p['user'].strip()}")
    return 0


def _run(args) -> int:
    from .pipeline import config_from_flags, run_config

    if args.config:
        flags = [f for f in ("protocol", "questions", "answers", "models", "model", "judge_model", "judge_prompts",
                             "output") if getattr(args, f)]
        if flags:
            raise EvalUsageError(f"give a config file or flags, not both (found --{flags[0].replace('_', '-')})")
        return run_config(args.config, force=args.force)
    _check_judging(args)
    cfg = config_from_flags(args, prices=_prices(args))
    return run_config(None, force=args.force, cfg=cfg)


def _agreement(args) -> int:
    from ..files import write_json
    from .agreement import agreement, arena_votes, judgment_votes, render_agreement

    if (args.second is None) == (args.arena_db is None):
        raise EvalUsageError("compare the first judgments with a second judgment file or with --arena-db, one of them")
    second = judgment_votes(args.second) if args.second else arena_votes(args.arena_db)
    res = agreement(judgment_votes(args.first), second)
    if not res["comparisons"]["both"]:
        raise EvalUsageError(f"no comparison was judged by both {args.first} and {args.second or args.arena_db} "
                             "(same questions, turns and model pairs?)")
    print(render_agreement(res, str(args.first), str(args.second or args.arena_db)))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, res)
    return 0


def _arena_export(args) -> int:
    from .agreement import arena_export

    counts = arena_export(args.db, args.output, force=args.force)
    print(f"{args.output}: {counts['votes']} votes exported as questions ({counts['skipped']} void or incomplete "
          "skipped); judge them with --models model_a,model_b")
    return 0
