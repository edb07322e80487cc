"""`vicuna data ...`: thin command-line shims over the data modules."""

from __future__ import annotations

import os
import sys

from ..commands import area_parser, command
from ..errors import DataError

FORMAT_NOTE = (
    "Files: .json holds one JSON array of samples, .jsonl one sample per line (for input and output).\n"
    "A sample is {\"id\": str, \"conversations\": [{\"from\": \"human\"|\"gpt\", \"value\": str}, ...], "
    "\"model\"?: str};\nrole aliases (user, assistant, chatgpt, bing, bard, system) are accepted.\n"
    "Bad records (malformed JSON, invalid UTF-8, missing fields) are reported with their record/line\n"
    "number and skipped, unless --strict. Outputs are written atomically and never overwritten\n"
    "without --force; inputs are never modified."
)
TEMPLATE_HELP = ("conversation template (see `vicuna templates list`); default: picked as `vicuna train` picks it, "
                 "the tokenizer's own chat_template, else a match on the tokenizer directory's name")


def _common(p, *, output: bool = True, report: bool = False) -> None:
    if output:
        p.add_argument("--force", action="store_true", help="overwrite existing output files")
    if report:
        p.add_argument("--report", metavar="REPORT.json", help="write a JSON report of counts and example ids")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def _csv(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(x.strip().lower() for x in value.split(",") if x.strip())


def add_commands(sub) -> None:
    verbs = area_parser(sub, "data", "clean, filter, split and inspect ShareGPT conversation data",
                        description="Prepare ShareGPT-style conversation data for training.\n\n"
                        "Typical pipeline:\n"
                        "  vicuna data clean raw.json -o clean.json --report clean_report.json\n"
                        "  vicuna data filter clean.json -o en.json --keep-lang en --reduce-repetition\n"
                        "  vicuna data split en.json -o train.json --tokenizer MODEL_DIR --max-length 2048\n"
                        "  vicuna data stats train.json --tokenizer MODEL_DIR --plot lengths.png\n\n" + FORMAT_NOTE)

    p = command(verbs, "clean", _clean, "convert ChatGPT-page HTML to Markdown, drop bad samples, de-duplicate",
                description=(
                    "Clean raw ShareGPT data.\n\n"
                    "- assistant turns captured as ChatGPT-page HTML become Markdown (headings, emphasis, links,\n"
                    "  lists, tables, blockquotes, fenced code blocks with their language; code kept verbatim);\n"
                    "- page debris is removed ('2 / 2' regenerate counters, 'Copy code', 'Copy N chars / M words');\n"
                    "- samples are dropped when a reply is a ChatGPT error page, roles do not alternate human/gpt\n"
                    "  (a leading gpt turn and a trailing human turn are trimmed first), a turn is empty, the sample\n"
                    "  is too short, or it contains a blocked word (default: openai, chatgpt, case-insensitive);\n"
                    "- duplicates by id and by the first exchange are dropped (the first one is kept).\n"
                    "Cleaning is idempotent. The report counts kept samples and every drop reason with example ids.\n\n"
                    "example:\n  vicuna data clean sharegpt_html.json -o clean.jsonl --report clean_report.json "
                    "--workers 2\n\n" + FORMAT_NOTE))
    p.add_argument("input", metavar="IN", help="raw ShareGPT file (.json or .jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="cleaned file (.json or .jsonl)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (output order is kept)")
    p.add_argument("--blocked-words", metavar="FILE", help="file with one blocked word/phrase per line "
                   "(replaces the default list)")
    p.add_argument("--no-blocked-words", action="store_true", help="do not drop samples for blocked words")
    p.add_argument("--min-chars", type=int, default=16, help="drop samples with fewer characters in all turns")
    _common(p, report=True)

    p = command(verbs, "filter", _filter, "keep samples by language, length, source model, repetition",
                description=(
                    "Keep the samples that pass every given criterion; records are copied unchanged.\n"
                    "Language is identified offline with py3langid from the prose of the sample (human turns\n"
                    "first, code removed); codes are ISO 639-1 (en, zh, de, ...; 'unknown' when no letters).\n\n"
                    "example:\n  vicuna data filter clean.json -o en.json --keep-lang en --reduce-repetition\n"
                    "  vicuna data filter clean.json -o gpt4.json --model gpt4 --min-turns 4\n\n" + FORMAT_NOTE))
    p.add_argument("input", metavar="IN", help="input file (.json or .jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    p.add_argument("--keep-lang", metavar="CODES", help="keep only these languages, e.g. en,zh")
    p.add_argument("--skip-lang", metavar="CODES", help="drop these languages, e.g. ko,ja")
    p.add_argument("--min-turns", type=int, default=0,
                   help="keep samples with at least this many messages (one human/gpt exchange is 2)")
    p.add_argument("--max-chars", type=int, help="drop samples with more characters than this in all turns")
    p.add_argument("--model", help="keep samples whose 'model' field matches (gpt4 matches GPT-4)")
    p.add_argument("--reduce-repetition", action="store_true",
                   help="drop samples with a digit repeated 9+ times or a line repeated 6+ times in a row")
    _common(p, report=True)

    p = command(verbs, "split", _split, "split long conversations to fit the model context",
                description=(
                    "Split conversations at human/gpt exchange boundaries so that every output sample, rendered\n"
                    "with the conversation template and tokenized exactly as in training, has at most\n"
                    "--max-length tokens. Chunks get ids {id}_{k} (k = 0, 1, ...) and keep the sample's system\n"
                    "message and other fields. An exchange longer than the limit on its own is dropped or has\n"
                    "its answer truncated (--long-pair); either way it is counted in the report, as are trimmed\n"
                    "leading gpt / trailing human turns. Nothing else is dropped.\n\n"
                    "example:\n  vicuna data split clean.json -o train.json --tokenizer ./my-model --max-length 2048 "
                    "--report split_report.json\n\n" + FORMAT_NOTE))
    p.add_argument("input", metavar="IN", help="input file (.json or .jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer directory (loaded with transformers.AutoTokenizer)")
    p.add_argument("--max-length", type=int, default=2048, help="maximum tokens per output sample")
    p.add_argument("--conv-template", default=None, help=TEMPLATE_HELP)
    p.add_argument("--long-pair", choices=("drop", "truncate"), default="drop",
                   help="what to do with one exchange longer than --max-length")
    _common(p, report=True)

    p = command(verbs, "stats", _stats, "counts, lengths, languages and models of a data file",
                description=(
                    "Print statistics: sample counts, turns and exchanges per sample, character (and with\n"
                    "--tokenizer, token) length percentiles, language and model distributions.\n\n"
                    "example:\n  vicuna data stats train.json --tokenizer ./my-model --plot lengths.png "
                    "--json stats.json\n\n" + FORMAT_NOTE))
    p.add_argument("input", metavar="IN", help="input file (.json or .jsonl)")
    p.add_argument("--tokenizer", metavar="PATH", help="also count tokens (rendered with --conv-template)")
    p.add_argument("--conv-template", default=None, help="template used to count tokens; " + TEMPLATE_HELP)
    p.add_argument("--max-length", type=int, help="also count samples longer than this many tokens")
    p.add_argument("--plot", metavar="FILE.png", help="write a histogram of sample lengths (tokens if --tokenizer)")
    p.add_argument("--json", metavar="STATS.json", help="also write the statistics as JSON")
    p.add_argument("--no-lang", action="store_true", help="skip language identification (faster)")
    _common(p)

    p = command(verbs, "pairs", _pairs, "preference pairs (prompt, chosen, rejected) for DPO from arena votes and "
                "preference files", description=(
                    "Export preference pairs as JSONL in TRL's conversational format: {id, prompt: [messages],\n"
                    "chosen: [assistant message], rejected: [assistant message], source, model_chosen?, "
                    "model_rejected?}.\n\n"
                    "Inputs (any mix, in order):\n"
                    "- an arena SQLite database (.db, .sqlite, .sqlite3) written by `vicuna serve --web`;\n"
                    "- arena exports / FastChat arena dumps: {conversation_a, conversation_b, winner};\n"
                    "- prompt/chosen/rejected records (TRL, UltraFeedback-binarized), strings or message lists;\n"
                    "  without prompt, the common beginning of chosen and rejected is the prompt;\n"
                    "- ShareGPT {conversations: [...ending in a human turn], chosen, rejected}.\n"
                    "Multi-turn prompts keep their history (in a battle: the winner's). Ties, both-bad votes,\n"
                    "voided votes, identical or empty answers and battles whose sides were asked different\n"
                    "questions are dropped and counted per reason; malformed records are counted apart;\n"
                    "repeated pairs are written once.\n\n"
                    "example:\n  vicuna data pairs arena.db ultrafeedback.jsonl -o pairs.jsonl --report "
                    "pairs_report.json"))
    p.add_argument("inputs", nargs="+", metavar="IN", help="arena database (.db/.sqlite/.sqlite3) or preference "
                   "file (.json/.jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="pairs file (.jsonl or .json)")
    _common(p, report=True)

    p = command(verbs, "merge", _merge, "concatenate data files",
                description="Concatenate files in order (formats may differ).\n\n"
                "example:\n  vicuna data merge clean.json identity.json -o all.jsonl\n\n" + FORMAT_NOTE)
    p.add_argument("inputs", nargs="+", metavar="IN", help="input files (.json or .jsonl), in order")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    p.add_argument("--unique-ids", action="store_true", help="drop samples whose id was seen before")
    _common(p)

    p = command(verbs, "sample", _sample, "draw a random sample of N samples",
                description="Uniform random sample without replacement (reservoir sampling, streaming), written in\n"
                "input order; the same --seed gives the same sample.\n\n"
                "example:\n  vicuna data sample clean.json -o small.json -n 1000 --seed 0\n\n" + FORMAT_NOTE)
    p.add_argument("input", metavar="IN", help="input file (.json or .jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    p.add_argument("-n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    p = command(verbs, "train-test", _train_test, "split a file into train and test files",
                description="Put round(N x --test-fraction) random samples (at least one, when N >= 2) into the\n"
                "test file and the rest into the train file, both in input order. Outputs default to\n"
                "IN_train.EXT and IN_test.EXT next to the input.\n\n"
                "example:\n  vicuna data train-test clean.json --test-fraction 0.01 --seed 0\n\n" + FORMAT_NOTE)
    p.add_argument("input", metavar="IN", help="input file (.json or .jsonl)")
    p.add_argument("--test-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-out", metavar="FILE", help="train output (default: IN_train.EXT)")
    p.add_argument("--test-out", metavar="FILE", help="test output (default: IN_test.EXT)")
    _common(p)

    p = command(verbs, "convert", _convert, "convert Alpaca or chatterbot data to ShareGPT conversations",
                description="--from alpaca IN: records {instruction, input?, output} become one exchange (the input,\n"
                "if any, follows the instruction after a blank line).\n"
                "--from chatterbot [DIR]: the YAML files of the chatterbot corpus (default: the English files of\n"
                "the installed chatterbot-corpus package); each conversation list of alternating lines becomes one\n"
                "conversation (a trailing unanswered line is dropped).\n\n"
                "example:\n  vicuna data convert --from alpaca alpaca_data.json -o alpaca_sharegpt.json\n"
                "  vicuna data convert --from chatterbot -o chatterbot.json\n\n" + FORMAT_NOTE)
    p.add_argument("--from", dest="source", required=True, choices=("alpaca", "chatterbot"), help="input kind")
    p.add_argument("input", nargs="?", metavar="IN", help="input file (alpaca) or YAML directory (chatterbot)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    _common(p)

    p = command(verbs, "identity", _identity, "generate identity Q&A conversations for your model",
                description="Write a few hundred conversations that teach the model its name and maker (who are\n"
                "you / who made you / are you ChatGPT?), like the Vicuna recipe's hard-coded identity set.\n"
                "Merge them after `clean`: the default blocked words would drop the 'Are you ChatGPT?' denials.\n\n"
                "example:\n  vicuna data identity -o identity.json --name Vicuna --org 'Large Model Systems "
                "Organization (LMSYS)'\n\n" + FORMAT_NOTE)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.json or .jsonl)")
    p.add_argument("--name", required=True, help="the model's name")
    p.add_argument("--org", required=True, help="the organisation that trained it")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of phrasings")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def _input(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    return path


def _clean(args) -> int:
    from .clean import DEFAULT_BLOCKED_WORDS, CleanConfig, clean_file, load_blocked_words

    if args.workers < 1:
        raise DataError("--workers must be at least 1")
    if args.blocked_words and args.no_blocked_words:
        raise DataError("--blocked-words and --no-blocked-words exclude each other")
    words = () if args.no_blocked_words else (
        load_blocked_words(args.blocked_words) if args.blocked_words else DEFAULT_BLOCKED_WORDS)
    clean_file(_input(args.input), args.output, config=CleanConfig(words, args.min_chars), workers=args.workers,
               report_path=args.report, strict=args.strict, force=args.force)
    return 0


def _filter(args) -> int:
    from .filter import FilterConfig, filter_file

    cfg = FilterConfig(keep_lang=_csv(args.keep_lang), skip_lang=_csv(args.skip_lang) or frozenset(),
                       min_turns=args.min_turns, max_chars=args.max_chars, model=args.model,
                       reduce_repetition=args.reduce_repetition)
    filter_file(_input(args.input), args.output, cfg, report_path=args.report, strict=args.strict, force=args.force)
    return 0


def _split(args) -> int:
    from .split import split_file

    split_file(_input(args.input), args.output, tokenizer_path=args.tokenizer, max_length=args.max_length,
               conv_template=args.conv_template, long_pair=args.long_pair, report_path=args.report,
               strict=args.strict, force=args.force)
    return 0


def _stats(args) -> int:
    from ..files import check_output, write_json
    from .stats import compute_stats, format_stats, plot_lengths

    _input(args.input)
    for path in (args.plot, args.json):
        if path:
            check_output(path, force=args.force, inputs=[args.input])
    tok = template = None
    if args.tokenizer:
        from .split import load_template, load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        template = load_template(args.conv_template, tok, args.tokenizer)
    elif args.max_length:
        raise DataError("--max-length needs --tokenizer")
    stats, lengths = compute_stats(args.input, tokenizer=tok, template=template, max_length=args.max_length,
                                   languages=not args.no_lang, strict=args.strict)
    print(format_stats(stats))
    if args.json:
        write_json(args.json, stats)
    if args.plot:
        unit = "tokens" if tok is not None else "characters"
        values = lengths["tokens"] if tok is not None else lengths["chars"]
        if not values:
            raise DataError(f"{args.input} has no samples to plot")
        plot_lengths(values, args.plot, unit=unit, title=f"{os.path.basename(args.input)}: {len(values)} samples",
                     max_length=args.max_length)
    return 0


def _pairs(args) -> int:
    from .pairs import export_pairs

    export_pairs(list(args.inputs), args.output, report_path=args.report, strict=args.strict, force=args.force)
    return 0


def _merge(args) -> int:
    from .ops import merge_files

    merge_files([_input(p) for p in args.inputs], args.output, unique_ids=args.unique_ids, strict=args.strict,
                force=args.force)
    return 0


def _sample(args) -> int:
    from .ops import sample_file

    sample_file(_input(args.input), args.output, args.n, seed=args.seed, strict=args.strict, force=args.force)
    return 0


def _train_test(args) -> int:
    from .ops import train_test_split

    train_test_split(_input(args.input), test_fraction=args.test_fraction, seed=args.seed, train_out=args.train_out,
                     test_out=args.test_out, strict=args.strict, force=args.force)
    return 0


def _convert(args) -> int:
    from .corpora import convert

    if args.source == "alpaca" and args.input:
        _input(args.input)
    convert(args.source, args.input, args.output, strict=args.strict, force=args.force)
    return 0


def _identity(args) -> int:
    from .identity import identity_conversations
    from ..files import write_records

    try:
        convs = identity_conversations(args.name, args.org, seed=args.seed)
    except ValueError as e:
        raise DataError(str(e)) from None
    n = write_records(args.output, convs, force=args.force)
    print(f"wrote {n} identity conversations to {args.output}", file=sys.stderr)
    return 0

