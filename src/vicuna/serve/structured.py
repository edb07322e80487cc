"""Structured outputs: request fields -> a constraint -> a compiled grammar -> per-row token masks.

The grammar library is ``xgrammar`` (vLLM's default structured-output backend): it compiles JSON Schema
(enums, nested objects, arrays, integer/number ranges, ``$ref``/``$defs``, ``anyOf``), regexes and EBNF
grammars against the tokenizer's vocabulary once, then fills a per-row token bitmask on CPU in microseconds
for the common case, so rows with different constraints — and rows with none — share one decode step.
``llguidance`` (llama.cpp's) would do as well; xgrammar was picked because it is what vLLM users' schemas are
tested against, and its EBNF dialect is llama.cpp's GBNF with extensions, so one ``grammar`` string serves
both our backends in the common case.

A constraint travels as a plain dict (``{"type", "value", "param"}``) in :class:`GenerateRequest`, so it
crosses the worker wire unchanged; engines compile it in ``prepare`` (a bad one is a 400 naming ``param``)
and drive a :class:`Matcher` per request.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any

from ..errors import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_PATTERN_CHARS = 64 * 1024  # a regex or grammar longer than this is refused before compiling
MAX_CHOICES = 1024
CACHE_SIZE = 256  # compiled grammars kept per tokenizer (LRU)


def constraint(kind: str, value: Any, param: str) -> dict[str, Any]:
    """A constraint as it travels in a request; ``value`` is checked for shape here (compiling checks the rest)."""
    if kind in ("json_schema",):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequest(f"{param} is not valid JSON: {e}", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    elif kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{param} must be a non-empty string", param=param)
        if len(value) > MAX_PATTERN_CHARS:
            raise InvalidRequest(f"{param} is longer than {MAX_PATTERN_CHARS} characters", param=param)
    elif kind == "choice":
        if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise InvalidRequest(f"{param} must be a list of 1 to {MAX_CHOICES} non-empty strings", param=param)
    elif kind != "json_object":
        raise InvalidRequest(f"unknown constraint type {kind!r}", param=param)
    return {"type": kind, "value": value, "param": param}


def _only(found: list[tuple[str, dict]]) -> dict | None:
    if len(found) > 1:
        names = ", ".join(p for p, _ in found)
        raise InvalidRequest(f"conflicting output constraints: {names}; send one", param=found[1][0])
    return found[0][1] if found else None


def from_request(body: Any) -> dict | None:
    """The one constraint a request's fields ask for, or None; two at once is a 400 naming the second.

    OpenAI: ``response_format`` ``{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}``.
    vLLM: ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and the newer
    ``structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object"}``.
    """
    found: list[tuple[str, dict]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(("response_format", constraint("json_object", None, "response_format")))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequest("response_format.json_schema.schema is required for type json_schema",
                                     param="response_format.json_schema")
            found.append(("response_format", constraint("json_schema", rf.json_schema.schema_,
                                                        "response_format.json_schema.schema")))
    for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
        v = getattr(body, name, None)
        if v is not None:
            found.append((name, constraint(kind, v, name)))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        for kind, name in (("json_schema", "json"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
            v = getattr(so, "json_" if name == "json" else name)
            if v is not None:
                found.append((f"structured_outputs.{name}", constraint(kind, v, f"structured_outputs.{name}")))
        if so.json_object:
            found.append(("structured_outputs.json_object",
                          constraint("json_object", None, "structured_outputs.json_object")))
    return _only(found)


# ---------------------------------------------------------------------- compiling

_LOCATION_RE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _library_message(e: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    return _LOCATION_RE.sub("", str(e).strip()).strip() or type(e).__name__


def choice_grammar(choices: list[str]) -> str:
    """An EBNF (and GBNF) grammar matching exactly one of ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiled grammars of one tokenizer, by constraint, least recently used dropped past ``size``."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, size: int = CACHE_SIZE):
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = self.info.vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, c: dict[str, Any]):
        """The compiled grammar of constraint ``c``; an invalid or unsupported one is a 400 naming its field."""
        key = json.dumps([c["type"], c["value"]], sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        kind, value, param = c["type"], c["value"], c.get("param") or "response_format"
        comp = self._compiler
        try:
            if kind == "json_schema":
                # any_whitespace off: compact JSON, fewer tokens and no runaway whitespace from a small model
                compiled = comp.compile_json_schema(json.dumps(value), any_whitespace=False, strict_mode=True)
            elif kind == "json_object":
                compiled = comp.compile_builtin_json_grammar()
            elif kind == "regex":
                compiled = comp.compile_regex(value)
            elif kind == "choice":
                compiled = comp.compile_grammar(choice_grammar(value))
            else:
                compiled = comp.compile_grammar(value)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json_schema": "JSON Schema", "regex": "regex", "grammar": "grammar (EBNF/GBNF)"}.get(kind, kind)
            raise InvalidRequest(f"invalid or unsupported {what} in {param}: {_library_message(e)}",
                                 param=param) from None
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return compiled


class Matcher:
    """One request's position in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, compiled, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)

    def fill_mask(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of an ``allocate_bitmask`` tensor."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False when the grammar does not allow it (the mask prevents that)."""
        return self._m.accept_token(token)

    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: the request is finished."""
        return self._m.is_terminated()


def allocate_bitmask(rows: int, vocab_size: int):
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_masks(logits, bitmask, rows: list[int]) -> None:
    """Set to -inf, in place, the scores of the tokens ``bitmask`` forbids, in the given ``rows`` only."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


# ---------------------------------------------------------------------- other backends


def llamacpp_fields(c: dict | None) -> dict[str, Any]:
    """llama.cpp server's own fields for a constraint: ``json_schema`` (it converts to GBNF) or ``grammar``
    (GBNF; xgrammar's EBNF is a superset, so a grammar both accept means the same). Regexes: 400."""
    if c is None:
        return {}
    kind, value = c["type"], c["value"]
    if kind == "json_schema":
        return {"json_schema": value}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "choice":
        return {"grammar": choice_grammar(value)}
    if kind == "grammar":
        return {"grammar": value}
    raise InvalidRequest(f"{c['param']}: regex-constrained output is not supported by the llamacpp backend "
                         "(llama.cpp takes JSON Schema and GBNF grammars); use guided_grammar", param=c["param"])


def vllm_fields(c: dict | None) -> dict[str, Any]:
    """Keywords of vLLM's ``StructuredOutputsParams`` (``GuidedDecodingParams`` in older releases)."""
    if c is None:
        return {}
    kind, value = c["type"], c["value"]
    key = {"json_schema": "json", "json_object": "json_object", "regex": "regex", "choice": "choice",
           "grammar": "grammar"}[kind]
    return {key: True if kind == "json_object" else value}


def openai_fields(c: dict | None) -> dict[str, Any]:
    """Request fields an OpenAI-compatible upstream takes for a constraint: OpenAI's ``response_format`` for
    JSON, vLLM's ``guided_*`` extras (which vLLM, SGLang and others accept) for the rest."""
    if c is None:
        return {}
    kind, value = c["type"], c["value"]
    if kind == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": value}}}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {{"regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}[kind]: value}
