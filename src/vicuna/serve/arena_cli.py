"""`vicuna arena export` and `vicuna arena leaderboard`: the arena database on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..files import atomic_open, write_figure, write_json
from .arena import (
    DEFAULT_DB_HELP, ArenaStore, compute_leaderboard, default_db, leaderboard_figure, leaderboard_markdown,
    win_rate_markdown,
)

TABLES = ("votes", "conversations", "feedback")


def add_commands(sub) -> None:
    from ..commands import area_parser, command

    verbs = area_parser(sub, "arena", "arena votes: export them, compute the leaderboard",
                        description="Work with the SQLite file the web UI writes "
                                    "(`vicuna serve --web --arena-db FILE`).")

    p = command(
        verbs, "export", export, help="write votes, conversations or feedback as JSONL/JSON",
        description=(
            "Export one table of the arena database. Votes come with both conversations inlined\n"
            "(fields: id, tstamp, mode, anony, model_a, model_b, winner, void, void_reason, judge (salted IP\n"
            "hash), turn, conversation_a, conversation_b, params_a, params_b).\n\n"
            "The format follows --format, else the output's extension (.jsonl or .json); stdout gets JSONL.\n"
            "An existing output file is kept unless --force.\n\n"
            "examples:\n"
            "  vicuna arena export --db arena.db -o battles.jsonl\n"
            "  vicuna arena export --db arena.db --table conversations --format jsonl | head -1"
        ),
    )
    p.add_argument("--db", default=None, help=f"arena database file (default: {DEFAULT_DB_HELP})")
    p.add_argument("--table", choices=TABLES, default="votes", help="what to export")
    p.add_argument("--format", choices=("jsonl", "json"), default=None,
                   help="output format (default: from the -o extension, JSONL on stdout)")
    p.add_argument("-o", "--output", default="-", help="output file ('-' = stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")

    p = command(
        verbs, "leaderboard", leaderboard, help="Bradley-Terry ratings with bootstrap intervals from the votes",
        description=(
            "Fit Bradley-Terry ratings (maximum likelihood, Elo scale, centred on 1000) to the stored votes\n"
            "and print them with percentile-bootstrap confidence intervals, vote counts and win rates,\n"
            "then the win-rate matrix (row beats column; ties count 1/2). Counts anonymous battle votes\n"
            "that are not void (an answer revealed a model's name), like the public arena; add\n"
            "--include-named for votes from the named side-by-side tab.\n\n"
            "Style control (as Chatbot Arena's default view): a second rating and rank from the same fit with\n"
            "the answers' token length and markdown headers, lists and bold as covariates, so a model does\n"
            "not climb by writing longer or fancier answers (--no-style-control to skip it).\n\n"
            "Categories: every vote is tagged from its conversation's first user turn when it is stored\n"
            "(coding, math, long-query, english / non-english and lang:XX) and its number of turns\n"
            "(multi-turn); --category NAME ranks the models on those votes only, --list-categories shows\n"
            "the categories with their vote counts.\n\n"
            "examples:\n"
            "  vicuna arena leaderboard --db arena.db\n"
            "  vicuna arena leaderboard --db arena.db --category coding\n"
            "  vicuna arena leaderboard --db arena.db --bootstrap 1000 --online-elo --json lb.json --plot lb.png"
        ),
    )
    p.add_argument("--db", default=None, help=f"arena database file (default: {DEFAULT_DB_HELP})")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="ROUNDS", help="bootstrap rounds for the intervals")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--include-named", action="store_true", help="also count votes from named side-by-side rounds")
    p.add_argument("--online-elo", action="store_true", help="add a column with sequential (online) Elo ratings")
    p.add_argument("--category", help="rank on the votes of this category only (see --list-categories)")
    p.add_argument("--list-categories", action="store_true", help="print the categories and their vote counts, then exit")
    p.add_argument("--no-style-control", action="store_true", help="skip the style-controlled rating columns")
    p.add_argument("--json", metavar="FILE", help="also write the leaderboard as JSON to FILE")
    p.add_argument("--plot", metavar="FILE", help="also save a plot of the ratings and intervals (PNG/SVG/PDF)")
    p.add_argument("--force", action="store_true", help="overwrite existing --json/--plot files")


def _check_new(path: str | None, force: bool) -> None:
    if path and path != "-" and Path(path).exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")


def export(args) -> int:
    fmt = args.format
    if fmt is None:
        suffix = Path(args.output).suffix.lower() if args.output != "-" else ".jsonl"
        if suffix not in (".jsonl", ".json"):
            raise UsageError(f"cannot tell the format of {args.output!r} from its extension; pass --format jsonl|json")
        fmt = suffix[1:]
    _check_new(args.output, args.force)
    with ArenaStore(args.db or default_db(), create=False) as store:
        rows = {"votes": store.iter_votes, "conversations": store.iter_conversations,
                "feedback": store.iter_feedback}[args.table]()

        def write(f) -> None:
            if fmt == "jsonl":
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                json.dump(list(rows), f, ensure_ascii=False, indent=2)
                f.write("\n")

        if args.output == "-":
            write(sys.stdout)
        else:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(args.output) as f:
                write(f)
    return 0


def leaderboard(args) -> int:
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be between 0 and 1, got {args.confidence}")
    _check_new(args.json, args.force)
    _check_new(args.plot, args.force)
    db = args.db or default_db()
    with ArenaStore(db, create=False) as store:
        cats = store.categories(include_named=args.include_named)
        if args.list_categories:
            print("| Category | Votes |\n|---|---|")
            print("\n".join(f"| {c} | {n} |" for c, n in cats.items()) or "| (none yet) | 0 |")
            return 0
        if args.category is not None and args.category not in cats:
            raise UsageError(f"no counted vote has category {args.category!r}; categories in {db}: "
                             f"{', '.join(cats) or 'none yet'}")
        battles = store.battles(include_named=args.include_named, category=args.category,
                                with_style=not args.no_style_control)
        counts = store.counts()
    lb = compute_leaderboard(battles, rounds=args.bootstrap, confidence=args.confidence, seed=args.seed,
                             online=args.online_elo, category=args.category)
    print(leaderboard_markdown(lb))
    if lb.rows:
        print()
        print(win_rate_markdown(lb))
    print(f"\n({counts['votes']} votes stored, {counts['void_votes']} void; "
          f"{'all' if args.include_named else 'anonymous'} non-void votes counted)")
    for path in (args.json, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        write_json(args.json, lb.as_dict())
    if args.plot:
        write_figure(args.plot, leaderboard_figure(lb), dpi=120)
    return 0
