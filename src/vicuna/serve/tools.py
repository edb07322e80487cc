"""Tool calling: validating ``tools`` / ``tool_choice`` / tool turns, forcing calls, parsing them out of text.

How a call is produced depends on ``tool_choice``:

* ``auto`` (the default with tools): the model writes what it likes; its text is parsed for calls in any of
  the common formats — Hermes/Qwen ``<tool_call>{"name", "arguments"}</tool_call>`` (also what the
  fallback prompt of templates without tool support asks for, see
  :func:`vicuna.conversation.tool_fallback_messages`), Mistral ``[TOOL_CALLS] [{...}]`` and Llama 3.x JSON
  ``{"name", "parameters"}`` (optionally after ``<|python_tag|>``, several separated by ``;``). The format
  is recognised from the output unless ``--tool-parser NAME`` fixes one.
* ``required``: the output is constrained (:mod:`vicuna.serve.structured`) to a JSON array of
  ``{"name", "arguments"}`` objects whose arguments follow each function's ``parameters`` schema (one
  element when ``parallel_tool_calls`` is false), as vLLM does — so even a small model returns a valid call.
* a named function: the output is constrained to that function's arguments.
* ``none``: tools are shown to the model but its text is returned as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest

PARSERS = ("hermes", "mistral", "llama3_json")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


@dataclass
class ToolPlan:
    mode: str = "none"  # none | auto | required | named
    tools: list[dict] | None = None  # OpenAI tool objects, for the prompt
    constraint: dict | None = None
    named: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.mode in ("auto", "required", "named")


def _check_messages(messages: list[dict]) -> None:
    ids: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role")
        for j, call in enumerate(m.get("tool_calls") or []):
            where = f"messages[{i}].tool_calls[{j}]"
            if role != "assistant":
                raise InvalidRequest(f"{where}: only assistant messages carry tool_calls", param=where)
            try:
                json.loads(call["function"]["arguments"])
            except ValueError as e:
                raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {e}",
                                     param=f"{where}.function.arguments") from None
            ids.add(call["id"])
        if role == "tool":
            tid = m.get("tool_call_id")
            if not tid:
                raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id",
                                     param=f"messages[{i}].tool_call_id")
            if tid not in ids:
                raise InvalidRequest(f"messages[{i}].tool_call_id {tid!r} answers no tool call of an earlier "
                                     "assistant message", param=f"messages[{i}].tool_call_id")


def plan(body: Any, messages: list[dict], constraint: dict | None) -> ToolPlan:
    """Check a chat request's tool fields and history; decide how calls are produced (a 400 names the field)."""
    from .structured import constraint as make_constraint

    _check_messages(messages)
    tools = [t.model_dump(exclude_none=True) for t in (body.tools or [])]
    names: list[str] = []
    for i, t in enumerate(tools):
        fn = t["function"]
        if not _NAME_RE.match(fn["name"]):
            raise InvalidRequest(f"tools[{i}].function.name {fn['name']!r} must be 1-64 letters, digits, _ . -",
                                 param=f"tools[{i}].function.name")
        if fn["name"] in names:
            raise InvalidRequest(f"tools[{i}].function.name {fn['name']!r} is defined twice",
                                 param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None and params.get("type", "object") != "object":
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema of type object",
                                 param=f"tools[{i}].function.parameters")
        names.append(fn["name"])
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools and choice != "none":
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    p = ToolPlan(tools=tools or None, parallel=body.parallel_tool_calls, constraint=constraint)
    if isinstance(choice, str):
        p.mode = choice
    else:
        if choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names function {choice.function.name!r}, which is not in tools "
                                 f"({', '.join(names)})", param="tool_choice.function.name")
        p.mode, p.named = "named", choice.function.name
    if p.mode in ("required", "named"):
        if constraint is not None:
            raise InvalidRequest(f"tool_choice {p.mode!r} cannot be combined with {constraint['param']}",
                                 param="tool_choice")
        by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        if p.mode == "named":
            p.constraint = make_constraint("json_schema", by_name[p.named], f"tools[{names.index(p.named)}]"
                                                                             ".function.parameters")
        else:
            item = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
                               "required": ["name", "arguments"], "additionalProperties": False}
                              for n, s in by_name.items()]}
            schema = {"type": "array", "items": item, "minItems": 1}
            if not p.parallel:
                schema["maxItems"] = 1
            p.constraint = make_constraint("json_schema", schema, "tools")
    return p


# ---------------------------------------------------------------------- parsing


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: Any, args: Any) -> dict | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _from_obj(obj: Any) -> dict | None:
    if not isinstance(obj, dict):
        return None
    return _call(obj.get("name"), obj.get("arguments", obj.get("parameters")))


def _parse_hermes(text: str) -> tuple[str, list[dict]]:
    calls, kept, pos = [], [], 0
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
        try:
            c = _from_obj(json.loads(m.group(1)))
        except ValueError:
            c = None
        if c is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(c)
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def _parse_mistral(text: str) -> tuple[str, list[dict]]:
    head, _, tail = text.partition("[TOOL_CALLS]")
    try:
        objs = json.loads(tail.strip())
    except ValueError:
        return text, []
    objs = objs if isinstance(objs, list) else [objs]
    calls = [c for c in map(_from_obj, objs) if c]
    return (head.strip(), calls) if calls and len(calls) == len(objs) else (text, [])


def _parse_llama3(text: str) -> tuple[str, list[dict]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in body.split(";"):
        try:
            c = _from_obj(json.loads(part))
        except ValueError:
            return text, []
        if c is None:
            return text, []
        calls.append(c)
    return "", calls


_PARSE = {"hermes": _parse_hermes, "mistral": _parse_mistral, "llama3_json": _parse_llama3}


def parse_tool_calls(text: str, parser: str | None = None) -> tuple[str, list[dict]]:
    """(content left, calls) found in ``text`` by ``parser``, or by the first format whose marker it holds."""
    if parser is not None:
        return _PARSE[parser](text)
    for name in ("hermes", "mistral"):
        if _MARKERS[name] in text:
            return _PARSE[name](text)
    return _parse_llama3(text)


def forced_calls(text: str, p: ToolPlan) -> list[dict]:
    """The calls of a ``required`` / named output (constrained JSON). Cut short by max_tokens: a named call
    is lost ([]), a ``required`` array keeps its complete elements."""
    try:
        obj = json.loads(text)
    except ValueError:
        if p.mode == "named":
            return []
        obj, at, dec = [], text.find("[") + 1, json.JSONDecoder()
        while 0 < at < len(text):
            try:
                item, at = dec.raw_decode(text, at)
            except ValueError:
                break
            obj.append(item)
            at = len(text) - len(text[at:].lstrip().removeprefix(",").lstrip())
    if p.mode == "named":
        c = _call(p.named, obj)
        return [c] if c else []
    calls = [_from_obj(o) for o in obj] if isinstance(obj, list) else []
    return [c for c in calls if c]


# ---------------------------------------------------------------------- streaming


@dataclass
class ToolStream:
    """Turns a model's text deltas into content and tool-call deltas, as OpenAI streams them.

    ``feed`` returns the content to send now and tool-call deltas (``{"index", "id", "type", "function"}``
    with the name first, then argument pieces); ``finish`` the rest. Text that may be the start of a call is
    held back until it is known not to be one.
    """

    plan: ToolPlan
    parser: str | None = None
    text: str = ""
    sent: int = 0  # characters of text already sent as content
    holding: bool = False  # a call started: everything from here is parsed at the end
    named_id: str | None = None
    calls: list[dict] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self.text += piece
        mode = self.plan.mode
        if mode == "named":  # the name is known up front: stream the arguments as they come
            out = []
            if self.named_id is None:
                self.named_id = new_call_id()
                out.append({"index": 0, "id": self.named_id, "type": "function",
                            "function": {"name": self.plan.named, "arguments": ""}})
            if piece:
                out.append({"index": 0, "function": {"arguments": piece}})
            return "", out
        if mode == "required" or self.holding:
            return "", []
        if mode != "auto":
            return self._release(len(self.text)), []
        rest = self.text[self.sent:]
        markers = [_MARKERS[self.parser]] if self.parser in _MARKERS else (
            [] if self.parser else list(_MARKERS.values()))
        if self.parser in (None, "llama3_json") and not self.text[:self.sent].strip():
            markers += ["{", "<|python_tag|>"]  # a Llama JSON call is the whole answer
        for mk in markers:
            at = rest.find(mk)
            if at >= 0 and (mk not in ("{", "<|python_tag|>") or not rest[:at].strip()):
                self.holding = True
                return self._release(self.sent + at), []
        hold = max((k for mk in markers for k in range(1, len(mk)) if rest.endswith(mk[:k])), default=0)
        return self._release(len(self.text) - hold), []

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet sent, complete tool calls not yet sent) at the end of the output."""
        mode = self.plan.mode
        if mode == "named":
            return "", []
        if mode == "required":
            self.calls = forced_calls(self.text, self.plan)
            return ("" if self.calls else self.text), self._indexed(self.calls)
        if mode != "auto":
            return self._release(len(self.text)), []
        tail = self.text[self.sent:]
        content, calls = parse_tool_calls(tail, self.parser)
        self.calls = calls
        self.sent = len(self.text)
        return (content if calls else tail), self._indexed(calls)

    @staticmethod
    def _indexed(calls: list[dict]) -> list[dict]:
        return [{"index": i, **c} for i, c in enumerate(calls)]

    def called(self) -> bool:
        return bool(self.calls) or (self.plan.mode == "named" and self.named_id is not None)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` when the turn ended (not cut short) with calls."""
    return "tool_calls" if called and reason == "stop" else reason


def complete(text: str, reason: str | None, p: ToolPlan, parser: str | None = None
             ) -> tuple[str | None, list[dict] | None, str | None]:
    """A whole answer as (content, tool_calls or None, finish_reason)."""
    if p.mode == "named":
        calls = forced_calls(text, p)
        return (None if calls else text), (calls or None), finish_reason(reason, bool(calls))
    s = ToolStream(p, parser)
    content, _ = s.feed(text)
    rest, calls = s.finish()
    calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    content = (content + rest) if not calls else (content + rest).strip() or None
    return content, (calls or None), finish_reason(reason, bool(calls))


__all__ = ["PARSERS", "ToolPlan", "ToolStream", "plan", "parse_tool_calls", "complete"]
