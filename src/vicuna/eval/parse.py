"""Reading a verdict out of a judge's free text.

Judges do not follow formats exactly, and the text they write quotes the answers under
review (which may themselves say "Score: 10") and sometimes the instructions they were
given ('"[[A]]" if assistant A is better'). So every rule below is anchored, in tiers:

1. the bracketed form the prompts ask for (``[[8, 7]]``, ``[[7]]``, ``[[A]]``), except
   when it stands in quotes (a quoted format example, not a verdict);
2. labelled or line-anchored forms: scores alone on the first line (the Vicuna protocol),
   lines that start with a label ("Assistant 1: 8", "Rating: 7", "Verdict: A"), a
   labelled tuple ("The output tuple is (10, 4)", "the scores are (1, 5) for Assistant 1
   and Assistant 2, respectively", "Output: (1, 7)") or a line that is only a tuple;
3. a few fixed sentence forms ("I would give Assistant 1 a score of 10 and Assistant 2 a
   score of 1", "8/10 for Assistant 1", "I would rate the response 6/10", a last line
   "Assistant B is better").

The first tier that finds anything decides; within a tier the verdict written last wins
(judges revise, and quotes of the answers come before the verdict). Anything else is
``unparsed`` -- never guessed, never scored as 0.
"""

from __future__ import annotations

import re
from typing import Any

MODES = ("pairwise-score", "pairwise", "single", "pairwise-5")
# Arena-Hard-Auto's five-level verdicts, Assistant A first (its order of the options).
VERDICTS_5 = ("A>>B", "A>B", "A=B", "B>A", "B>>A")

OK, UNPARSED = "ok", "unparsed"

_I = re.IGNORECASE
_IM = re.IGNORECASE | re.MULTILINE
_NUM = r"(\d{1,2}(?:\.\d+)?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*10(?![\d.]*\d))?"
_NOT_MORE = r"(?![\d.]*\d)"
_LEAD = r"^[\s*#>\-_`|]*"  # optional markdown before a label: bullets, bold, quotes, table bars
_WHO = r"(?:assistant|answer|response)\s*#?\s*([12])"
# "8 tips", "3 of the 5 steps", "2 points higher": a number that counts things is no score.
_NOT_A_COUNT = r"(?!\s*(?:of\b|points?\b|tips?\b|steps?\b|examples?\b|reasons?\b|items?\b|ways?\b|paragraphs?\b))"

# tier 1 -----------------------------------------------------------------------------
_QUOTED = r"(?<![\"'“])"  # a quoted bracket form is a format example, not a verdict
_BRACKET_PAIR = re.compile(_QUOTED + r"\[\[\s*" + _NUM + r"\s*(?:,|\s)\s*" + _NUM + r"\s*\]\](?![\"'”])")
_BRACKET_ONE = re.compile(_QUOTED + r"(?<![\"'“]rating: )\[\[\s*" + _NUM + _OUT_OF + r"\s*\]\](?![\"'”])", _I)
_BRACKET_VERDICT = re.compile(_QUOTED + r"\[\[\s*(A|B|C|tie)\s*\]\](?![\"'”])", _I)

# tier 2: pairwise-score -------------------------------------------------------------
_SEP = r"(?:\s*(?:,|;|&|\band\b|\bvs\.?|\||-|–)\s*|\s+)"
# "8 7", "8, 7", "8/10 and 7/10", "Scores: 8 and 7", "**8** | **7**", "(8, 7)"
_FIRST_LINE_PAIR = re.compile(
    _LEAD + r"(?:scores?\s*[:\-]?\s*)?[(\[]?\**" + _NUM + _OUT_OF + r"\**" + _SEP + r"\**" + _NUM + _OUT_OF
    + r"\**[)\]]?[\s*.`]*$", _I)
# "Assistant 1: 8", "**Assistant 2's score:** 7/10", "- Answer 1 - 6", "| Assistant 1 | 8 |",
# "Assistant 1: 8/10, Assistant 2: 7/10" (a label at a line start or after a separator)
_LABEL_VALUE = re.compile(
    r"(?:" + _LEAD + r"|[,;]\s*\**|\band\s+\**)" + _WHO + r"(?:'s)?(?:\s+(?:overall\s+|final\s+)?(?:score|rating))?"
    + r"\**[ \t]*(?:[:=|]|[-–—])[ \t]*\**[ \t]*" + _NUM + _OUT_OF + _NOT_MORE + _NOT_A_COUNT, _IM)
# "(10, 4)" after "tuple", "scores are", "Output:" -- or alone on its line
_CUED_TUPLE = re.compile(
    r"(?:\b(?:tuple|scores?|ratings?)\b(?!\s*\()|^\W*output\s*:)[^()\[\]\n]{0,60}?[(\[]\s*" + _NUM + r"\s*,\s*"
    + _NUM + r"\s*[)\]]", _IM)
_TUPLE_LINE = re.compile(r"^[\s*`>]*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)[\s*.`]*$", re.MULTILINE)

# tier 3: pairwise-score -------------------------------------------------------------
# "give Assistant 1 a score of 10", "Assistant 2 receives 6/10", "Assistant 1 gets an 8"
_WHO_GETS = re.compile(
    r"\b" + _WHO + r"\s+(?:(?:a|an)\s+(?:overall\s+)?(?:score|rating)\s+of\s+|(?:gets|receives|earns|deserves|scores|"
    r"is\s+(?:given|rated|scored)|would\s+(?:get|receive|earn|score))\s+(?:(?:a|an)\s+)?(?:(?:score|rating)\s+of\s+)?)"
    + _NUM + _OUT_OF + _NOT_MORE + _NOT_A_COUNT, _I)
# "8/10 for Assistant 1", "a score of 8 for Assistant 1"
_VALUE_FOR_WHO = re.compile(
    r"(?:(?:score|rating)\s+of\s+" + _NUM + r"(?:\s*(?:/|out\s+of)\s*10)?|" + _NUM + r"\s*(?:/|out\s+of)\s*10)"
    r"\s+(?:points\s+)?(?:for|to)\s+" + _WHO, _I)

# tier 2 and 3: single ----------------------------------------------------------------
_FIRST_LINE_SINGLE = re.compile(_LEAD + r"(?:(?:score|rating)\s*[:\-]?\s*)?\**" + _NUM + _OUT_OF + r"[\s*.`]*$", _I)
# "Rating: 7", "**Overall rating:** 6.5/10", "Final Score - 8", "Grade: [7]"
_RATING_LINE = re.compile(
    _LEAD + r"(?:overall\s+|final\s+|my\s+)?(?:score|rating|grade)[ \t]*\**[ \t]*[:=\-–][ \t]*\**[ \t]*\[?\[?[ \t]*" + _NUM + _OUT_OF
    + _NOT_MORE, _IM)
# "I would rate the response 6/10", "I give it a score of 4", "a rating of 7 out of 10"
_RATE_SENTENCE = re.compile(
    r"\b(?:(?:rate|grade)\s+(?:(?:it|this|the|assistant's|response|answer)\s+){0,3}(?:(?:as|at)\s+)?(?:(?:a|an)\s+)?"
    + _NUM + r"\s*(?:/|out\s+of)\s*10|(?:score|rating)\s+of\s+" + _NUM + _OUT_OF + _NOT_MORE + _NOT_A_COUNT + r")", _I)

# tier 2 and 3: pairwise verdicts -----------------------------------------------------
# "Verdict: A", "**Final verdict:** [B]", "Winner: Assistant A", "final verdict is tie"
_VERDICT_LINE = re.compile(
    r"(?:" + _LEAD + r"|\bfinal\s+)(?:verdict|winner|decision)(?:\s+is)?\s*\**\s*[:=\-–]?\s*\**\s*(?:assistant\s+)?"
    r"\[?\[?\s*(A|B|C|tie)\b", _IM)
_VERDICT_ALONE = re.compile(r"^[\s*`>]*\[\s*(A|B|C)\s*\][\s*.`]*$", re.MULTILINE)
# last line only: "Therefore, Assistant B is better." / "Overall, it is a tie."
_BETTER = re.compile(r"\bassistant\s+(A|B)\b[^.\n]{0,40}?\b(?:is|was|provides|gives|wins)\s+(?:the\s+)?"
                     r"(?:clearly\s+|slightly\s+|much\s+|overall\s+)?(?:better|superior|stronger|preferred|winner)"
                     r"(?:\s+(?:answer|response|one))?(?=\s*(?:[.!;]|$|than\b|overall\b))", _I)
_TIE = re.compile(r"\b(?:it(?:'s| is) a tie|(?:are|were|is) (?:a )?tie\b|equally (?:good|bad|helpful|strong))", _I)
_NEGATED = re.compile(r"\b(?:neither|not|n't|nor)\b", _I)

# pairwise-5 (Arena-Hard) ---------------------------------------------------------------
# "A>>B", "B > A", "A=B"; also the mirrored shapes Arena-Hard's tally accepts ("A<<B" = "B>>A").
_V5 = r"([AB])\s*(>>|>|==|=|<<|<)\s*([AB])"
_V5_DOUBLE = re.compile(_QUOTED + r"\[\[\s*" + _V5 + r"\s*\]\](?![\"'”])", _I)
_V5_SINGLE = re.compile(_QUOTED + r"(?<!\[)\[\s*" + _V5 + r"\s*\](?!\])(?![\"'”])", _I)
# "My final verdict is: A>>B", "**Verdict:** B>A" -- unbracketed, but labelled
_V5_LABELLED = re.compile(r"(?:" + _LEAD + r"|\bfinal\s+)(?:verdict|decision)(?:\s+is)?(?:\s+\w+){0,3}?\s*\**\s*[:=\-–]?"
                          r"\s*\**\s*`?" + _V5 + r"(?![\w<>=])", _IM)
_V5_ALONE = re.compile(r"^[\s*`>]*" + _V5 + r"[\s*.`]*$", _IM)
# A line of the prompt's option list, echoed ("1. Assistant A is significantly better: [[A>>B]]")
_V5_OPTION = re.compile(r"^\W*(?:\d+[.)]\s*)?(?:assistant\s+[AB]\s+is\s+(?:significantly|slightly)\s+better|"
                        r"tie,?\s+relatively\s+the\s+same)\s*:\s*\[", _I)


def _score(text: str) -> float | None:
    value = float(text)
    return value if 0 <= value <= 10 else None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def _result(status: str, reason: str | None = None, **fields) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, **fields}
    if reason:
        out["reason"] = reason
    return out


def _last(candidates: list[tuple[int, Any]]) -> Any:
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _labelled_pair(matches) -> list[tuple[int, tuple[str, str]]]:
    """Per-assistant labels -> one (position, (s1, s2)) when both assistants got a score."""
    last: dict[str, tuple[int, str]] = {}
    for m in matches:
        groups = [g for g in m.groups() if g is not None]
        value, who = (groups[0], groups[1]) if m.re is _VALUE_FOR_WHO else (groups[1], groups[0])
        last[who] = (m.start(), value)  # the last label of each assistant wins
    if "1" in last and "2" in last:
        return [(max(last["1"][0], last["2"][0]), (last["1"][1], last["2"][1]))]
    return []


def parse_pairwise_score(text: str) -> dict[str, Any]:
    """Two 1-10 scores (Assistant 1 first) -> ``{"status", "scores": [s1, s2]}``."""
    tier1 = [(m.start(), m.groups()) for m in _BRACKET_PAIR.finditer(text)]
    tier2 = []
    m = _FIRST_LINE_PAIR.match(_first_line(text))
    if m:
        tier2.append((0, m.groups()))
    tier2 += _labelled_pair(_LABEL_VALUE.finditer(text))
    tier2 += [(m.start(), m.groups()) for r in (_CUED_TUPLE, _TUPLE_LINE) for m in r.finditer(text)]
    tier3 = _labelled_pair([*_WHO_GETS.finditer(text), *_VALUE_FOR_WHO.finditer(text)])
    found = _last(tier1) or _last(tier2) or _last(tier3)
    if not found:
        return _result(UNPARSED, "no scores found: expected '8 7' on the first line, "
                       "'Assistant 1: 8' / 'Assistant 2: 7' lines, a labelled tuple '(8, 7)' or [[8, 7]]")
    s1, s2 = _score(found[0]), _score(found[1])
    if s1 is None or s2 is None:
        return _result(UNPARSED, f"scores out of the 0-10 range: {tuple(found)}")
    return _result(OK, scores=[s1, s2])


def parse_single(text: str) -> dict[str, Any]:
    """One 1-10 score -> ``{"status", "score"}``."""
    tier1 = [(m.start(), m.group(1)) for m in _BRACKET_ONE.finditer(text)]
    tier2 = [(m.start(), m.group(1)) for m in _RATING_LINE.finditer(text)]
    m = _FIRST_LINE_SINGLE.match(_first_line(text))
    if m:
        tier2.append((-1, m.group(1)))  # a labelled line later in the text beats the first line
    tier3 = [(m.start(), m.group(1) or m.group(2)) for m in _RATE_SENTENCE.finditer(text)]
    value = _last(tier1) or _last(tier2) or _last(tier3)
    if value is None:
        return _result(UNPARSED, "no score found: expected 'Rating: [[7]]'")
    score = _score(value)
    if score is None:
        return _result(UNPARSED, f"score out of the 0-10 range: {value}")
    return _result(OK, score=score)


def parse_pairwise(text: str) -> dict[str, Any]:
    """A verdict -> ``{"status", "verdict": "A" | "B" | "tie"}`` (``[[C]]`` means tie)."""
    tier1 = [(m.start(), m.group(1)) for m in _BRACKET_VERDICT.finditer(text)]
    tier2 = [(m.start(), m.group(1)) for r in (_VERDICT_LINE, _VERDICT_ALONE) for m in r.finditer(text)]
    tier3 = []
    last = _last_line(text)
    if not _NEGATED.search(last):
        better = {m.group(1).upper() for m in _BETTER.finditer(last)}
        if len(better) == 1:
            tier3.append((0, better.pop()))
        elif not better and _TIE.search(last):
            tier3.append((0, "tie"))
    v = _last(tier1) or _last(tier2) or _last(tier3)
    if v is None:
        return _result(UNPARSED, "no verdict found: expected [[A]], [[B]] or [[C]] (tie)")
    v = v.upper()
    return _result(OK, verdict="tie" if v in ("C", "TIE") else v)


def _verdict5(m: re.Match) -> str | None:
    """``(X, op, Y)`` -> one of VERDICTS_5, or None for "A>A"-like nonsense."""
    x, op, y = m.group(1).upper(), m.group(2), m.group(3).upper()
    if x == y:
        return None
    if op.startswith("<"):
        x, y, op = y, x, op.replace("<", ">")
    if op.startswith("="):
        return "A=B"
    return f"{x}{op}{y}"


def _line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start:end if end >= 0 else len(text)]


def _tier5(text: str, patterns) -> list[tuple[int, str]]:
    """Verdicts found by ``patterns``, without an echoed option list (three or more of the
    prompt's "Assistant A is slightly better: [[A>B]]" lines with different verdicts)."""
    found = [(m.start(), v, m) for r in patterns for m in r.finditer(text) if (v := _verdict5(m))]
    options = {i for i, (pos, _, _) in enumerate(found) if _V5_OPTION.match(_line_at(text, pos))}
    if len({found[i][1] for i in options}) >= 3:
        found = [f for i, f in enumerate(found) if i not in options]
    return [(pos, v) for pos, v, _ in found]


def parse_pairwise_5(text: str) -> dict[str, Any]:
    """An Arena-Hard verdict -> ``{"status", "verdict": "A>>B" | "A>B" | "A=B" | "B>A" | "B>>A"}``.

    Tiers as elsewhere: ``[[A>B]]``; then ``[A>B]`` (Arena-Hard's second pattern), a labelled
    "Final verdict: A>B" or a verdict alone on its line. A three-way ``[[A]]`` is no answer
    to a five-level question: unparsed, never guessed."""
    v = (_last(_tier5(text, [_V5_DOUBLE])) or _last(_tier5(text, [_V5_SINGLE, _V5_LABELLED, _V5_ALONE])))
    if v is None:
        return _result(UNPARSED, "no verdict found: expected [[A>>B]], [[A>B]], [[A=B]], [[B>A]] or [[B>>A]]")
    return _result(OK, verdict=v)


PARSERS = {"pairwise-score": parse_pairwise_score, "pairwise": parse_pairwise, "single": parse_single,
           "pairwise-5": parse_pairwise_5}


def parse_judgment(mode: str, text: str | None) -> dict[str, Any]:
    """Parse one judge output for ``mode``; empty or missing text is ``unparsed``."""
    if mode not in PARSERS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not text or not text.strip():
        return _result(UNPARSED, "empty judgment")
    return PARSERS[mode](text)
