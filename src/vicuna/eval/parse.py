"""Reading a verdict out of a judge's free text.

Judges do not follow formats exactly, and the text they write quotes the answers under
review (which may themselves say "Score: 10"). So every rule below is anchored: a score
counts only on the first line when that line holds nothing but scores (the Vicuna
protocol), in an explicit ``[[...]]`` verdict, or on a line that *starts* with a label
("Assistant 1: 8", "Rating: 7"). When several anchored verdicts appear, the last one wins
(judges revise; quotes of the answers come before the verdict). Anything else is
``unparsed`` -- never guessed, never scored as 0.
"""

from __future__ import annotations

import re
from typing import Any

MODES = ("pairwise-score", "pairwise", "single")

OK, UNPARSED = "ok", "unparsed"

_NUM = r"(\d{1,2}(?:\.\d+)?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*10)?"
_SEP = r"(?:\s*(?:,|;|&|\band\b|\bvs\.?|\||-|–)\s*|\s+)"
# Line starts with optional markdown (**, -, #, >) and maybe "Scores:".
_LEAD = r"^[\s*#>\-_`]*"

# "8 7", "8, 7", "8/10 and 7/10", "Scores: 8 and 7", "**8** | **7**"
_FIRST_LINE_PAIR = re.compile(
    _LEAD + r"(?:scores?\s*[:\-]?\s*)?\**" + _NUM + _OUT_OF + r"\**" + _SEP + r"\**" + _NUM + _OUT_OF + r"[\s*.`]*$",
    re.IGNORECASE,
)
_FIRST_LINE_SINGLE = re.compile(
    _LEAD + r"(?:(?:score|rating)\s*[:\-]?\s*)?\**" + _NUM + _OUT_OF + r"[\s*.`]*$", re.IGNORECASE
)
_BRACKET_PAIR = re.compile(r"\[\[\s*" + _NUM + r"\s*(?:,|\s)\s*" + _NUM + r"\s*\]\]")
_BRACKET_ONE = re.compile(r"\[\[\s*" + _NUM + _OUT_OF + r"\s*\]\]")
# "Assistant 1: 8", "**Assistant 2's score:** 7/10", "- Answer 1 - 6"
_LABELLED = re.compile(
    _LEAD + r"(?:assistant|answer)\s*([12])(?:'s)?(?:\s+(?:score|rating|answer))?\s*\**\s*[:=\-–]\s*\**\s*"
    + _NUM + _OUT_OF + r"(?![\d.]*\d)",
    re.IGNORECASE | re.MULTILINE,
)
_RATING_LINE = re.compile(
    _LEAD + r"(?:overall\s+|final\s+)?(?:score|rating)\s*\**\s*[:=\-–]\s*\**\s*\[?\[?\s*" + _NUM + _OUT_OF
    + r"(?![\d.]*\d)",
    re.IGNORECASE | re.MULTILINE,
)
_VERDICT_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
# "Verdict: A" at the start of a line, or "final verdict: Assistant A" anywhere.
_VERDICT_LINE = re.compile(
    r"(?:" + _LEAD + r"|\bfinal\s+)verdict(?:\s+is)?\s*\**\s*[:=\-–]?\s*\**\s*(?:assistant\s+)?\[?\[?\s*(A|B|C|tie)\b",
    re.IGNORECASE | re.MULTILINE,
)


def _score(text: str) -> float | None:
    value = float(text)
    return value if 0 <= value <= 10 else None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _result(status: str, reason: str | None = None, **fields) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, **fields}
    if reason:
        out["reason"] = reason
    return out


def parse_pairwise_score(text: str) -> dict[str, Any]:
    """Two 1-10 scores (Assistant 1 first) -> ``{"status", "scores": [s1, s2]}``."""
    candidates: list[tuple[str, str]] = []
    brackets = _BRACKET_PAIR.findall(text)
    if brackets:
        candidates.append(brackets[-1])
    m = _FIRST_LINE_PAIR.match(_first_line(text))
    if m:
        candidates.append((m.group(1), m.group(2)))
    labelled: dict[str, str] = {}
    for who, value in _LABELLED.findall(text):
        labelled[who] = value  # last one wins
    if "1" in labelled and "2" in labelled:
        candidates.append((labelled["1"], labelled["2"]))
    if not candidates:
        return _result(UNPARSED, "no scores found: expected '8 7' on the first line, "
                       "'Assistant 1: 8' / 'Assistant 2: 7' lines or [[8, 7]]")
    s1, s2 = _score(candidates[0][0]), _score(candidates[0][1])
    if s1 is None or s2 is None:
        return _result(UNPARSED, f"scores out of the 0-10 range: {candidates[0]}")
    return _result(OK, scores=[s1, s2])


def parse_single(text: str) -> dict[str, Any]:
    """One 1-10 score -> ``{"status", "score"}``."""
    value = None
    brackets = _BRACKET_ONE.findall(text)
    if brackets:
        value = brackets[-1]
    else:
        lines = _RATING_LINE.findall(text)
        if lines:
            value = lines[-1]
        else:
            m = _FIRST_LINE_SINGLE.match(_first_line(text))
            if m:
                value = m.group(1)
    if value is None:
        return _result(UNPARSED, "no score found: expected 'Rating: [[7]]'")
    score = _score(value)
    if score is None:
        return _result(UNPARSED, f"score out of the 0-10 range: {value}")
    return _result(OK, score=score)


def parse_pairwise(text: str) -> dict[str, Any]:
    """A verdict -> ``{"status", "verdict": "A" | "B" | "tie"}`` (``[[C]]`` means tie)."""
    found = _VERDICT_BRACKET.findall(text) or _VERDICT_LINE.findall(text)
    if not found:
        return _result(UNPARSED, "no verdict found: expected [[A]], [[B]] or [[C]] (tie)")
    v = found[-1].upper()
    return _result(OK, verdict="tie" if v in ("C", "TIE") else v)


PARSERS = {"pairwise-score": parse_pairwise_score, "pairwise": parse_pairwise, "single": parse_single}


def parse_judgment(mode: str, text: str | None) -> dict[str, Any]:
    """Parse one judge output for ``mode``; empty or missing text is ``unparsed``."""
    if mode not in PARSERS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not text or not text.strip():
        return _result(UNPARSED, "empty judgment")
    return PARSERS[mode](text)
