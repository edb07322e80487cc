"""Conversation templates: the one place where messages become prompt text.

Everything that turns a chat into tokens goes through here — data splitting,
training masks, serving, evaluation — so a prompt seen in training is byte for
byte the prompt seen in serving.

A template is data (one row in ``TEMPLATES``), not a class per model.  It renders

* a *generation prompt* that ends with the assistant prefix, and
* a *training rendering*: the same text plus the character spans of every
  assistant output (including the token that closes the turn), from which
  :func:`tokenize_conversation` builds labels using the token offsets of **one**
  tokenization of the whole text, so masks are right by construction for any
  fast tokenizer.

Format strings may use ``{bos}``, ``{eos}``, ``{system}`` and ``{content}``.
Rendered text contains the BOS token where the model expects one, so it must be
tokenized with ``add_special_tokens=False`` (see :func:`encode`) — the same
convention as Hugging Face chat templates.

This module must not import torch: the data tools use it without a model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

ROLES = ("system", "user", "assistant")
_MARKER = "{#- vicuna template: %s -#}"
_MARKER_RE = re.compile(r"\{#- vicuna template: (\S+) -#\}")


class TemplateError(ValueError):
    """A conversation cannot be rendered (bad roles, unknown template, ...)."""


@dataclass(frozen=True)
class Template:
    """A chat prompt format. See the module docstring for the placeholders."""

    name: str
    description: str
    system: str = ""  # default system message ("" means none)
    prefix: str = "{bos}"  # once, at the very start
    system_fmt: str = "{system}"  # emitted once when a system message is set
    user_fmt: str = "{content}"
    # When set and a system message exists, the first user turn carries the
    # system message inside it (Llama 2, Mistral) and system_fmt is not used.
    first_user_fmt: str | None = None
    assistant_prefix: str = ""  # ends the generation prompt
    assistant_lead: str = ""  # between the prefix and the content (trained: generated after the prompt)
    assistant_end: str = "{eos}"  # closes an assistant turn (trained)
    assistant_sep: str = ""  # after the end (not trained)
    stop_strs: tuple[str, ...] = ()  # extra text stops, for models trained elsewhere
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens besides EOS
    name_pattern: str = ""  # regex matched against a model's name or type

    # ------------------------------------------------------------------ render
    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> str:
        """The prompt text for ``messages`` (OpenAI-style role/content dicts)."""
        return self._render(messages, add_generation_prompt, bos_token, eos_token)[0]

    def render_for_training(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """Text of a whole conversation and the ``[start, end)`` character spans
        the model learns to produce: each assistant content plus its closing token."""
        if not messages or _role(messages[-1]) != "assistant":
            raise TemplateError("a training conversation must end with an assistant message")
        return self._render(messages, False, bos_token, eos_token)

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, turns = split_system(messages, self.system)
        fill = {"bos": bos_token or "", "eos": eos_token or "", "system": system}
        if "{eos}" in self.assistant_end and not eos_token:
            raise TemplateError(
                f"template {self.name!r} ends assistant turns with the EOS token, "
                "but the tokenizer has none; set eos_token in the tokenizer config"
            )
        out: list[str] = [_fill(self.prefix, fill)]
        use_first = bool(system) and self.first_user_fmt is not None
        if system and not use_first:
            out.append(_fill(self.system_fmt, fill))
        spans: list[tuple[int, int]] = []
        for i, msg in enumerate(turns):
            content = msg["content"]
            if msg["role"] == "user":
                fmt = self.first_user_fmt if (use_first and i == 0) else self.user_fmt
                out.append(_fill(fmt, fill, content))
            else:
                out.append(_fill(self.assistant_prefix, fill))
                # the span starts where the generation prompt ends: the model must also learn to
                # emit the lead (e.g. the space a tokenizer may split off as its own token)
                start = sum(map(len, out))
                out.append(_fill(self.assistant_lead, fill) + content + _fill(self.assistant_end, fill))
                spans.append((start, start + len(out[-1])))
                out.append(_fill(self.assistant_sep, fill))
        if add_generation_prompt:
            if turns and turns[-1]["role"] == "assistant":
                raise TemplateError("the last message is from the assistant; nothing to answer")
            out.append(_fill(self.assistant_prefix, fill))
        return "".join(out), spans

    # ------------------------------------------------------------------- stops
    def stop_token_strings(self, eos_token: str | None) -> list[str]:
        """Special-token strings that end an assistant turn."""
        toks = [eos_token] if eos_token else []
        return toks + [t for t in self.stop_tokens if t not in toks]

    # ------------------------------------------------------------------ export
    def to_jinja(self) -> str:
        """This template as a Hugging Face ``chat_template`` (Jinja).

        ``tokenizer.apply_chat_template`` with it gives byte-identical text to
        :meth:`render`; the leading marker lets :func:`resolve_template` map a
        saved tokenizer back to this row of the table.
        """

        def lit(fmt: str) -> str:
            parts = re.split(r"(\{bos\}|\{eos\}|\{system\}|\{content\})", fmt)
            exprs = {
                "{bos}": "{{ bos_token or '' }}",
                "{eos}": "{{ eos_token or '' }}",
                "{system}": "{{ system }}",
                "{content}": "{{ message['content'] }}",
            }
            return "".join(exprs.get(p) or ("{{ " + json.dumps(p) + " }}" if p else "") for p in parts)

        first = self.first_user_fmt
        user = (
            "{%- if loop.first and system -%}" + lit(first) + "{%- else -%}" + lit(self.user_fmt) + "{%- endif -%}"
            if first is not None
            else lit(self.user_fmt)
        )
        return (
            _MARKER % self.name
            + "{%- if messages and messages[0]['role'] == 'system' -%}"
            + "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            + "{%- else -%}{%- set system = " + json.dumps(self.system) + " -%}{%- set turns = messages -%}{%- endif -%}"
            + lit(self.prefix)
            + ("{%- if system -%}" + lit(self.system_fmt) + "{%- endif -%}" if first is None else "")
            + "{%- for message in turns -%}"
            + "{%- if message['role'] == 'user' -%}" + user
            + "{%- elif message['role'] == 'assistant' -%}"
            + lit(self.assistant_prefix + self.assistant_lead + "{content}" + self.assistant_end + self.assistant_sep)
            + "{%- else -%}{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
            + "{%- endif -%}{%- endfor -%}"
            + "{%- if add_generation_prompt -%}" + lit(self.assistant_prefix) + "{%- endif -%}"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "default_system": self.system,
            "stop_strs": list(self.stop_strs),
            "stop_tokens": ["<eos>", *self.stop_tokens],
            "example": self.render(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Who are you?"}],
                bos_token="<s>", eos_token="</s>",
            ),
        }


def _fill(fmt: str, values: dict[str, str], content: str = "") -> str:
    # str.format would choke on braces in user content; substitute our four names only.
    return re.sub(
        r"\{(bos|eos|system|content)\}",
        lambda m: content if m.group(1) == "content" else values[m.group(1)],
        fmt,
    )


def _role(msg: dict[str, Any]) -> str:
    return msg.get("role", "") if isinstance(msg, dict) else ""


def message_text(content: Any) -> str:
    """Message content as plain text: OpenAI/Gradio may send a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise TemplateError("only text content parts are supported")
        return "".join(texts)
    if content is None:
        return ""
    raise TemplateError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def split_system(messages: Sequence[dict[str, Any]], default_system: str = "") -> tuple[str, list[dict[str, str]]]:
    """Validate roles and return (system message, alternating user/assistant turns).

    A leading system message replaces the template's default system prompt.
    """
    system = default_system
    turns: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        role = _role(msg)
        if role not in ROLES:
            raise TemplateError(f"message {i}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = message_text(msg.get("content"))
        if role == "system":
            if i != 0:
                raise TemplateError(f"message {i}: a system message is only allowed first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(f"message {i}: expected a {expected} message, got {role}; roles must alternate")
        turns.append({"role": role, "content": content})
    if not turns:
        raise TemplateError("the conversation has no user message")
    return system, turns


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            name="vicuna_v0",
            description="Vicuna v0 : '### Human: .. ### Assistant: ..'",
            system=VICUNA_SYSTEM.replace("user", "human"),
            system_fmt="{system}\n",
            user_fmt="### Human: {content}\n",
            assistant_prefix="### Assistant:",
            assistant_lead=" ",
            assistant_sep="\n",
            stop_strs=("###",),
            name_pattern=r"vicuna.*v0|delta-v0",
        ),
        Template(
            name="vicuna_v1.1",
            description="Vicuna v1.1+ : 'SYSTEM USER: .. ASSISTANT: ..</s>' (also v1.3, v1.5)",
            system=VICUNA_SYSTEM,
            system_fmt="{system} ",
            user_fmt="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            assistant_lead=" ",
            name_pattern=r"vicuna|demo-model|longchat",
        ),
        Template(
            name="llama-2",
            description="Llama 2 chat : '<s>[INST] <<SYS>>..<</SYS>> .. [/INST] .. </s>'",
            prefix="",
            user_fmt="{bos}[INST] {content} [/INST]",
            first_user_fmt="{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
            assistant_lead=" ",
            assistant_end=" {eos}",
            name_pattern=r"llama-?2.*chat",
        ),
        Template(
            name="llama-3",
            description="Llama 3 instruct : header ids and <|eot_id|>",
            system_fmt="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user_fmt="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_end="<|eot_id|>",
            stop_tokens=("<|eot_id|>",),
            name_pattern=r"llama-?3",
        ),
        Template(
            name="chatml",
            description="ChatML : <|im_start|>role\\n..<|im_end|> (Qwen, OpenHermes, Yi)",
            prefix="",
            system_fmt="<|im_start|>system\n{system}<|im_end|>\n",
            user_fmt="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            assistant_end="<|im_end|>",
            assistant_sep="\n",
            stop_tokens=("<|im_end|>",),
            name_pattern=r"qwen|chatml|hermes|yi-.*chat",
        ),
        Template(
            name="mistral",
            description="Mistral instruct v0.1/v0.2 : '<s>[INST] .. [/INST] ..</s>'",
            user_fmt="[INST] {content} [/INST]",
            first_user_fmt="[INST] {system}\n\n{content} [/INST]",
            assistant_lead=" ",
            name_pattern=r"mistral|mixtral",
        ),
        Template(
            name="alpaca",
            description="Alpaca : '### Instruction: .. ### Response: ..'",
            system="Below is an instruction that describes a task. Write a response that appropriately completes the request.",
            system_fmt="{system}\n\n",
            user_fmt="### Instruction:\n{content}\n\n",
            assistant_prefix="### Response:\n",
            assistant_sep="\n\n",
            stop_strs=("###",),
            name_pattern=r"alpaca",
        ),
        Template(
            name="gemma",
            description="Gemma : '<start_of_turn>user ..<end_of_turn> <start_of_turn>model ..<end_of_turn>' "
                        "(a system message opens the first user turn)",
            user_fmt="<start_of_turn>user\n{content}<end_of_turn>\n",
            first_user_fmt="<start_of_turn>user\n{system}\n\n{content}<end_of_turn>\n",
            assistant_prefix="<start_of_turn>model\n",
            assistant_end="<end_of_turn>",
            assistant_sep="\n",
            stop_tokens=("<end_of_turn>",),
            name_pattern=r"gemma",
        ),
        Template(
            name="zephyr",
            description="Zephyr : <|system|> <|user|> <|assistant|> blocks closed by </s>",
            prefix="",
            system_fmt="<|system|>\n{system}{eos}\n",
            user_fmt="<|user|>\n{content}{eos}\n",
            assistant_prefix="<|assistant|>\n",
            assistant_sep="\n",
            name_pattern=r"zephyr",
        ),
    ]
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown conversation template {name!r}; available: {', '.join(TEMPLATES)}") from None


def template_special_tokens() -> list[str]:
    """Every special-token string any template uses (for building test tokenizers)."""
    found: list[str] = []
    for t in TEMPLATES.values():
        text = "".join([t.system_fmt, t.user_fmt, t.assistant_prefix, t.assistant_end, *t.stop_tokens])
        for tok in re.findall(r"<\|[a-z_]+\|>|<[a-z]+_of_turn>", text):
            if tok not in found:
                found.append(tok)
    return found


# ----------------------------------------------------------------------------
# Templates that came with a tokenizer and are not ours


class UntrainableTemplate(TemplateError):
    """A tokenizer's own chat_template whose assistant spans cannot be found: training refuses it.

    Unlike a bad conversation (skipped and counted), this is the template's fault, so it stops the run.
    """


_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HINT = "pass --conv-template NAME (see `vicuna templates list`), or give the template {% generation %} blocks"


@dataclass(frozen=True)
class JinjaTemplate:
    """A model's own ``chat_template`` that does not match a registered one.

    Prompts come from ``tokenizer.apply_chat_template``.  For training, the
    assistant spans come from the template itself (:meth:`render_for_training`):
    its ``{% generation %}`` blocks when it has them, else by rendering the
    conversation prefix by prefix.
    """

    source: str
    name: str = "tokenizer chat_template"
    stop_strs: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()
    system: str = ""

    def render(self, messages, *, add_generation_prompt=True, bos_token=None, eos_token=None, tokenizer=None) -> str:
        return self._apply(tokenizer, _as_messages(messages), add_generation_prompt)

    def render_for_training(self, messages, *, tokenizer=None, **_) -> tuple[str, list[tuple[int, int]]]:
        """Text of a whole conversation and the character spans the model learns to produce.

        With ``{% generation %}`` blocks, the spans are exactly what they mark.  Otherwise each
        assistant message ``i`` is found by difference: the render of ``messages[:i]`` with the
        generation prompt must be a prefix of the render of ``messages[:i+1]``, which must be a
        prefix of the whole; the span runs from the end of the prompt up to and including the
        last special token of the turn (its end-of-turn token, e.g. ChatML's ``<|im_end|>``).
        What follows that token (ChatML's "\\n") is the template's separator, written by the
        renderer when the chat goes on and never generated, so it is not trained — as in our own
        templates.  A template that breaks these rules raises :class:`UntrainableTemplate`.
        """
        msgs = _as_messages(messages)
        if msgs[-1]["role"] != "assistant":
            raise TemplateError("a training conversation must end with an assistant message")
        if _GENERATION_RE.search(self.source):
            return self._generation_spans(tokenizer, msgs)
        full = self._apply(tokenizer, msgs, False)
        specials = _special_token_re(tokenizer)
        spans: list[tuple[int, int]] = []
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            prompt = self._apply(tokenizer, msgs[:i], True)
            turn = self._apply(tokenizer, msgs[:i + 1], False)
            _check_prefix(prompt, turn, f"message {i} (assistant): the generation prompt for it is not the start "
                                        "of its own rendering")
            _check_prefix(turn, full, f"message {i} (assistant): rendering the conversation up to it is not the "
                                      "start of the whole conversation's rendering")
            start = len(prompt)
            ends = [m.end() for m in specials.finditer(turn, start)] if specials else []
            if not ends:
                raise UntrainableTemplate(
                    f"message {i} (assistant): the chat_template closes the turn with no special token "
                    f"(it renders as {turn[start:][-40:]!r}), so the model would never learn to stop; {_HINT}")
            spans.append((start, ends[-1]))
        return full, spans

    def _generation_spans(self, tokenizer, msgs):
        # the renderer apply_chat_template itself uses for return_assistant_tokens_mask; we want the
        # character spans (to share the offsets -> labels code), not its token mask
        from transformers.utils.chat_template_utils import render_jinja_template

        with _refusals():
            texts, indices = render_jinja_template(
                [msgs], chat_template=self.source, return_assistant_tokens_mask=True, add_generation_prompt=False,
                **_tokenizer(tokenizer).special_tokens_map)
        if not indices[0]:
            raise UntrainableTemplate(f"the chat_template's {{% generation %}} blocks mark nothing in this "
                                      f"conversation; {_HINT}")
        return texts[0], [tuple(s) for s in indices[0]]

    def _apply(self, tokenizer, msgs, add_generation_prompt: bool) -> str:
        tokenizer = _tokenizer(tokenizer)
        with _refusals():
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat_template renders ``tools`` itself (it reads the ``tools`` variable)."""
        return bool(re.search(r"\btools\b", self.source))

    def render_with_tools(self, messages, tools, *, tokenizer=None) -> str:
        """The generation prompt through the template's own tool support; assistant calls' arguments are
        given as objects (what HF templates expect)."""
        msgs = []
        for m in messages:
            m = dict(m)
            m["content"] = message_text(m.get("content"))
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(_call_json(c))[
                    "arguments"]}} for c in m["tool_calls"]]
            msgs.append(m)
        with _refusals():
            return _tokenizer(tokenizer).apply_chat_template(msgs, tools=tools or None, tokenize=False,
                                                             add_generation_prompt=True)

    def stop_token_strings(self, eos_token):
        return [eos_token] if eos_token else []

    def to_jinja(self) -> str:
        """The template as it came: a model trained with it keeps it."""
        return self.source


def _tokenizer(tokenizer):
    if tokenizer is None:
        raise TemplateError("rendering a tokenizer's own chat_template needs the tokenizer")
    return tokenizer


@contextlib.contextmanager
def _refusals():
    """A template's own ``raise_exception`` (e.g. Gemma's "System role not supported") as a TemplateError."""
    from jinja2 import TemplateError as JinjaError

    try:
        yield
    except JinjaError as e:
        raise TemplateError(f"the tokenizer's chat_template refused this conversation: {e}") from None


def _as_messages(messages) -> list[dict[str, str]]:
    """Validated plain-text messages, as the template gets them: a leading system message, even an
    empty one, is passed on (it replaces the template's default, as in our own templates)."""
    system, turns = split_system(messages, "")
    return ([{"role": "system", "content": system}] if messages and _role(messages[0]) == "system" else []) + turns


def _check_prefix(prefix: str, whole: str, what: str) -> None:
    if whole.startswith(prefix):
        return
    k = next((i for i, (a, b) in enumerate(zip(prefix, whole)) if a != b), min(len(prefix), len(whole)))
    raise UntrainableTemplate(
        f"the chat_template is not prefix-stable: {what} (they differ at character {k}: "
        f"{prefix[k:k + 30]!r} vs {whole[k:k + 30]!r}), so the assistant's tokens cannot be found; {_HINT}")


def _special_token_re(tokenizer) -> re.Pattern | None:
    """A regex matching any special token string of the tokenizer (EOS, end-of-turn tokens, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    toks = {t.content for t in added.values() if getattr(t, "special", False)}
    toks |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return _alternation(tuple(sorted(t for t in toks if t))) if toks else None


@functools.lru_cache(maxsize=8)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    # longest first, so a token that contains another one wins
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def resolve_template(name: str | None = None, tokenizer: Any = None, model_name: str = "", model_type: str = ""):
    """Pick the template: explicit name > tokenizer chat_template > model name match.

    Never silently falls back to a default: an unknown model is an error that
    lists the choices (unknown models rambling under a wrong prompt was a
    long-standing complaint about FastChat).
    """
    if name:
        return get_template(name)
    source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(source, dict):  # multiple named templates: use the default one
        source = source.get("default")
    if isinstance(source, str) and source.strip():
        m = _MARKER_RE.search(source)
        if m and m.group(1) in TEMPLATES:
            return TEMPLATES[m.group(1)]
        return JinjaTemplate(source=source)
    haystack = f"{model_name} {model_type}".lower()
    # table order is match order: specific rows (vicuna_v0) come before general ones (vicuna_v1.1)
    for t in TEMPLATES.values():
        if t.name_pattern and re.search(t.name_pattern, haystack):
            return t
    raise TemplateError(
        f"cannot tell which conversation template {model_name or 'this model'!r} uses: its tokenizer has no "
        f"chat_template and the name matches none. Pass --conv-template, one of: {', '.join(TEMPLATES)}"
    )


# ----------------------------------------------------------------------------
# Tokenization (duck-typed tokenizer; no torch)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered template text (which already holds BOS where needed)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with(tokenizer, template) -> dict[str, Any]:
    kwargs = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    if isinstance(template, JinjaTemplate):  # rendered by the tokenizer itself
        kwargs["tokenizer"] = tokenizer
    return kwargs


def render_prompt(template, messages, tokenizer, add_generation_prompt: bool = True,
                  tools: list[dict] | None = None) -> str:
    """Generation prompt for ``messages`` with this tokenizer's BOS/EOS strings (without the assistant's
    opening when ``add_generation_prompt`` is false, as /tokenize may ask).

    With ``tools`` (OpenAI tool objects) or tool turns in the history (assistant ``tool_calls``, role ``tool``),
    a tokenizer chat_template that knows tools renders them itself; any other template gets
    :func:`tool_fallback_messages`.
    """
    if tools or _has_tool_turns(messages):
        if isinstance(template, JinjaTemplate) and template.supports_tools:
            return template.render_with_tools(messages, tools, tokenizer=tokenizer)
        messages = tool_fallback_messages(messages, tools, default_system=getattr(template, "system", "") or "")
    return template.render(messages, add_generation_prompt=add_generation_prompt, **_with(tokenizer, template))


# ----------------------------------------------------------------------------
# Tool calling for templates that have no tool support (Hermes style, as Qwen and NousResearch models use)

TOOL_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def _has_tool_turns(messages) -> bool:
    return any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def _call_json(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass  # the API validated arguments already; a raw client of this function keeps its text
    return json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)


def tool_fallback_messages(messages, tools: list[dict] | None, default_system: str = "") -> list[dict[str, str]]:
    """Plain system/user/assistant turns for a template without tool support.

    The tools are described in the system message (after the client's own system text, or the template's
    default), an assistant's calls become ``<tool_call>{"name", "arguments"}</tool_call>`` lines after its
    text, and tool results become a user turn of ``<tool_response>...</tool_response>`` blocks (consecutive
    results, and a user message that follows them, share one turn so roles still alternate).
    """
    msgs = list(messages)
    system = default_system
    if msgs and _role(msgs[0]) == "system":
        system = message_text(msgs[0].get("content"))
        msgs = msgs[1:]
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = (system + "\n\n" if system else "") + TOOL_SYSTEM.format(tools=listed)
    out: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for m in msgs:
        role = _role(m)
        if role == "tool":
            text = f"<tool_response>\n{message_text(m.get('content'))}\n</tool_response>"
            role = "user"
        elif role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in m["tool_calls"])
            content = message_text(m.get("content"))
            text = f"{content}\n{calls}" if content else calls
        else:
            text = message_text(m.get("content"))
        if out and out[-1]["role"] == role == "user":
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def render_training(template, messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Training text of ``messages`` and its assistant spans, for this tokenizer (any template kind)."""
    return template.render_for_training(messages, **_with(tokenizer, template))


def stop_token_ids(template, tokenizer) -> list[int]:
    """Ids that end generation: EOS plus the template's end-of-turn tokens present in the vocab."""
    ids: list[int] = []
    for tok in template.stop_token_strings(tokenizer.eos_token):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def tokenize_conversation(
    tokenizer: Any, template: Template | JinjaTemplate, messages: Sequence[dict[str, Any]], max_length: int | None = None
) -> TokenizedConversation:
    """``input_ids`` and ``labels`` for one conversation, masks from token offsets.

    One tokenization of the whole rendered text; a token is trained when its
    character span overlaps an assistant span (content + end-of-turn token).
    Nothing is re-tokenized piecewise, so there is no "tokenization mismatch".
    """
    text, spans = render_training(template, messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= s:
            continue
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s < spans[j][1] and e > spans[j][0]:
            labels[k] = ids[k]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedConversation(ids, labels, truncated)


def assistant_label_texts(tokenizer: Any, tc: TokenizedConversation) -> list[str]:
    """Decode each contiguous run of trained tokens (for tests and `--debug`)."""
    runs: list[list[int]] = []
    prev = False
    for lab in tc.labels:
        on = lab != IGNORE_INDEX
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(lab)
        prev = on
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def list_templates() -> Iterable[Template]:
    return TEMPLATES.values()
