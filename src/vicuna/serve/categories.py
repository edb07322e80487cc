"""Categories of arena battles, as Chatbot Arena's per-category leaderboards use them.

A battle is tagged from its conversation: the first user turn decides coding, math, long
query and language; the number of user turns decides multi-turn. The rules are cheap and
deterministic, so every vote is tagged as it is stored; a ``Tagger`` is any callable from
the messages to category names, so a judge-model tagger (Chatbot Arena's "hard prompts",
"creative writing", ...) can be added later and stored beside these under its own name.

Tags: ``coding``, ``math``, ``multi-turn``, ``long-query`` (>= 500 tokens), ``english`` or
``non-english`` plus ``lang:XX`` (ISO 639-1, py3langid) when the prompt is long enough to
tell (4+ words, or 4+ CJK characters).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ..conversation import message_text

RULES_TAGGER = "rules-v1"  # stored with every tag; bump when the rules change
CATEGORIES = ("coding", "math", "multi-turn", "long-query", "english", "non-english")
LONG_QUERY_TOKENS = 500  # Chatbot Arena's "longer query"

Tagger = Callable[[Sequence[dict[str, Any]]], list[str]]

_FENCE = re.compile(r"```|~~~")
_CODE_BLOCK = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL)
_CODE_WORDS = re.compile(
    r"\b(?:python|javascript|typescript|java|c\+\+|c#|golang|rust|kotlin|swift|php|ruby|bash|shell script|"
    r"powershell|sql|html|css|json|yaml|regex|regexp|numpy|pandas|pytorch|react|django|flask|"
    r"code|coding|program|programming|function|script|compile[rd]?|debug|bug|stack trace|exception|api|"
    r"algorithm|recursion|class|method|variable|array|linked list|git|docker|kubernetes)\b", re.IGNORECASE)
_CODE_SYNTAX = re.compile(r"^\s*(?:def |class |import |from \S+ import|#include|public static|function\s*\w*\()|"
                          r"\w+\([^()\n]*\)\s*[{;]|=>|\bconsole\.log\b|\bprint\(", re.MULTILINE)
_MATH_SYNTAX = re.compile(
    r"\\(?:frac|sqrt|int|sum|prod|lim|alpha|beta|theta|pi|cdot|times|leq|geq)\b|\$[^$\n]+\$|"
    r"\d\s*[-+*/^×÷]\s*\(?\d|\b[a-z]\s*\^\s*\d|\b\d*[a-z]\s*[-+]\s*\d+\s*=|\b[a-z]\s*=\s*-?\d|[∫∑√π≤≥∞]")
_MATH_WORDS = re.compile(
    r"\b(?:solve|equation|integral|derivative|differentiate|integrate|probability|theorem|prove|proof|"
    r"calculate|arithmetic|algebra|geometry|calculus|matrix|eigen\w*|polynomial|prime numbers?|factorial|"
    r"logarithm|triangle|percent(?:age)?)\b", re.IGNORECASE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _user_turns(messages: Sequence[dict[str, Any]]) -> list[str]:
    return [message_text(m.get("content")) for m in messages if m.get("role") == "user"]


def language_of(text: str) -> str | None:
    """ISO 639-1 code of ``text``, or None when it is too short to tell reliably. Formulas
    and code say nothing about the language and mislead the model: only words count."""
    words = [w for w in re.findall(r"[^\W\d_]{2,}", text)]
    if len(words) < 4 and len(_CJK.findall(text)) < 4:
        return None
    text = " ".join(words)
    from ..data.filter import detect_language  # the project's one language identifier (py3langid)

    lang = detect_language(text)
    return None if lang == "unknown" else lang


def tag_conversation(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The rule-based tags of one conversation (see the module docstring)."""
    from ..ratings import count_tokens

    users = _user_turns(messages)
    if not users:
        return []
    first = users[0]
    tags = []
    if _FENCE.search(first) or _CODE_SYNTAX.search(first) or len(_CODE_WORDS.findall(first)) >= 1:
        tags.append("coding")
    prose = _CODE_BLOCK.sub(" ", first)  # "x = 1" in a code block is code, not maths
    if _MATH_SYNTAX.search(prose) or _MATH_WORDS.search(prose):
        tags.append("math")
    if len(users) > 1:
        tags.append("multi-turn")
    if count_tokens(first) >= LONG_QUERY_TOKENS:
        tags.append("long-query")
    lang = language_of(prose)
    if lang:
        tags += ["english" if lang == "en" else "non-english", f"lang:{lang}"]
    return tags
