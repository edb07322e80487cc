"""`eval agreement`: how often two judges -- or a judge and the arena's human voters -- agree.

Computed as in the MT-bench paper (Zheng et al. 2023, section 4.2, and FastChat's
``compute_agreement.py``): a vote says, for one question turn and one pair of models,
``model_a``, ``model_b`` or ``tie``. For every comparison both sides voted on, each pair
of votes (one from each side; the arena can hold several human votes on one battle)
counts once. "with ties" counts them all (three outcomes: chance is 1/3); "without ties"
leaves out every pair in which either vote is a tie (chance 1/2). A judge's vote on a
comparison is the report's: the winner both answer orders agree on, a tie when they
disagree.

Arena battles are not questions of an eval set, so ``arena_export`` turns each stored vote
into one: question ``arena-<vote id>`` with the conversation's user turns, answered by
``model_a`` and ``model_b`` (the two sides as shown to the voter). Judge those, then
compare the judgments with the votes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import EvalUsageError
from ..files import write_records
from .report import comparisons, load_judgments

Key = tuple[Any, int, str, str]  # (question_id, turn, model, model) with the two models sorted
SIDES = ("model_a", "model_b")


def _vote(question_id, turn: int, model_a: str, model_b: str, winner: str) -> tuple[Key, str]:
    winner = "tie" if winner.startswith("tie") else winner
    if model_a <= model_b:
        return (question_id, turn, model_a, model_b), winner
    return (question_id, turn, model_b, model_a), {"model_a": "model_b", "model_b": "model_a"}.get(winner, winner)


def judgment_votes(path: Path) -> dict[Key, list[str]]:
    """One vote per complete comparison of a judgment file (any mode)."""
    records = load_judgments(path)
    modes = {r["mode"] for r in records}
    if len(modes) != 1:
        raise EvalUsageError(f"{path} mixes modes {sorted(modes)}")
    votes: dict[Key, list[str]] = {}
    for c in comparisons(records, modes.pop())[0]:
        key, winner = _vote(c["question_id"], c["turn"], c["model_a"], c["model_b"], c["winner"])
        votes[key] = [winner]
    return votes


def _arena_store(db: Path):
    from ..serve.arena import ArenaError, ArenaStore

    try:
        return ArenaStore(db, create=False)
    except ArenaError as e:
        raise EvalUsageError(str(e)) from None


def _battle_turns(vote: dict) -> tuple[list[str], list[str], list[str]] | None:
    """(user turns, model_a's answers, model_b's answers), or None when the two sides differ or miss answers."""
    sides = []
    for conv in (vote["conversation_a"], vote["conversation_b"]):
        msgs = [m for m in conv if m.get("role") in ("user", "assistant")]
        users = [m.get("content") for m in msgs[0::2]]
        answers = [m.get("content") for m in msgs[1::2]]
        roles_ok = all(m["role"] == r for m, r in zip(msgs, ["user", "assistant"] * len(msgs)))
        if not roles_ok or len(users) != len(answers) or not users or not all(isinstance(t, str) and t for t in users + answers):
            return None
        sides.append((users, answers))
    if sides[0][0] != sides[1][0]:
        return None
    return sides[0][0], sides[0][1], sides[1][1]


def arena_votes(db: Path) -> dict[Key, list[str]]:
    """The arena's valid human votes, keyed like the judgments of an ``arena_export`` set."""
    votes: dict[Key, list[str]] = defaultdict(list)
    store = _arena_store(db)
    try:
        for v in store.iter_votes():
            if v["void"] or _battle_turns(v) is None:
                continue
            key, winner = _vote(f"arena-{v['id']}", v["turn"], "model_a", "model_b", v["winner"])
            votes[key].append(winner)
    finally:
        store.close()
    return dict(votes)


def arena_export(db: Path, out_dir: Path, *, force: bool = False) -> dict[str, int]:
    """Write the arena's votes as a question file and the two sides' answers, for `eval judge`."""
    out_dir = Path(out_dir)
    files = [out_dir / "question.jsonl", out_dir / "answers" / "model_a.jsonl", out_dir / "answers" / "model_b.jsonl"]
    if any(f.exists() for f in files) and not force:
        raise EvalUsageError(f"{out_dir} already holds an export; use --force to replace it")
    questions, sides = [], {s: [] for s in SIDES}
    skipped = 0
    store = _arena_store(db)
    try:
        for v in store.iter_votes():
            turns = _battle_turns(v)
            if v["void"] or turns is None:
                skipped += 1
                continue
            qid = f"arena-{v['id']}"
            users, answers_a, answers_b = turns
            questions.append({"question_id": qid, "category": "arena", "turns": users,
                              "arena_models": [v["model_a"], v["model_b"]]})
            for side, answers, model in (("model_a", answers_a, v["model_a"]), ("model_b", answers_b, v["model_b"])):
                sides[side].append({"question_id": qid, "model_id": side, "arena_model": model, "status": "ok",
                                    "choices": [{"index": 0, "turns": answers}]})
    finally:
        store.close()
    if not questions:
        raise EvalUsageError(f"{db}: no usable votes to export ({skipped} void or incomplete)")
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
    write_records(files[0], questions, force=True)
    for side, path in zip(SIDES, files[1:]):
        write_records(path, sides[side], force=True)
    return {"votes": len(questions), "skipped": skipped}


def agreement(first: dict[Key, list[str]], second: dict[Key, list[str]]) -> dict[str, Any]:
    """Agreement per turn and overall, with and without ties, with the counts behind each rate."""
    common = sorted(set(first) & set(second), key=str)
    groups: dict[str, list[Key]] = defaultdict(list)
    for key in common:
        groups[str(key[1])].append(key)
        groups["all"].append(key)
    out: dict[str, Any] = {"comparisons": {"both": len(common), "only_first": len(set(first) - set(second)),
                                           "only_second": len(set(second) - set(first))}}
    for turn, keys in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        row = {}
        for setup, ban_ties in (("with_ties", False), ("without_ties", True)):
            agree = total = 0
            for key in keys:
                for v1 in first[key]:
                    for v2 in second[key]:
                        if ban_ties and "tie" in (v1, v2):
                            continue
                        total += 1
                        agree += v1 == v2
            row[setup] = {"agree": agree, "total": total, "rate": agree / total if total else None}
        out[f"turn {turn}" if turn != "all" else "all"] = row
    return out


def render_agreement(res: dict[str, Any], first: str, second: str) -> str:
    c = res["comparisons"]
    lines = [f"agreement of {first} and {second}: {c['both']} comparisons judged by both "
             f"({c['only_first']} only by the first, {c['only_second']} only by the second)",
             "", f"{'':8} {'with ties':>20} {'without ties':>20}"]
    for name, row in res.items():
        if name == "comparisons":
            continue
        cells = []
        for setup in ("with_ties", "without_ties"):
            r = row[setup]
            rate = f"{100 * r['rate']:.1f}%" if r["rate"] is not None else "–"
            cells.append(f"{rate} ({r['agree']}/{r['total']})")
        lines.append(f"{name:8} {cells[0]:>20} {cells[1]:>20}")
    return "\n".join(lines)
