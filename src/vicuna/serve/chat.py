"""`vicuna chat`: talk to a model in the terminal.

Streams answers (Markdown via rich on a terminal, plain text when piped),
keeps input history, and has slash commands for the things one does while
debugging a chat model: reset, undo, regenerate, change the system prompt or a
sampling setting, save/load the conversation, show the rendered prompt.
Piped stdin answers each line and exits 0, so it scripts like `ollama run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..commands import command
from ..conversation import TemplateError, encode, render_prompt, split_system
from ..errors import UsageError, VicunaError
from ..files import write_json
from ..generation import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, GenerationError, SamplingParams, generate_stream,
                          sampling_params)
from ..model import DEFAULT_MODEL_NAME, LoadedModel
from .launch import ModelConfig, add_flags, from_flags, load_hf_model

HELP = """Commands:
  /help                 this help
  /exit, /quit          leave (Ctrl+D works too)
  /reset                forget the conversation
  /undo                 drop the last exchange
  /regen                answer the last message again
  /system [TEXT]        set the system prompt (no text: the template's default)
  /set KEY VALUE        temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed
  /save FILE            save the conversation as JSON
  /load FILE            load a conversation saved with /save
  /stats                context use and speed of the last answer
  /prompt               show the exact prompt the model sees next
Ctrl+C stops the current answer; the session goes on."""

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int,
            "repetition_penalty": float, "seed": int}


def add_commands(sub) -> None:
    p = command(
        sub, "chat", run, "chat with a model in the terminal",
        description="Chat with a model in the terminal, streaming its answers.\n\n"
        "examples:\n"
        f"  vicuna chat                                  # the default model, {DEFAULT_MODEL_NAME}\n"
        "  vicuna chat --model-path demo                # the tiny bundled demo model\n"
        "  vicuna chat --model-path lmsys/vicuna-7b-v1.5 --device cuda\n"
        "  echo 'Hello' | vicuna chat --model-path DIR  # answer piped lines, then exit\n\n" + HELP,
    )
    add_flags(p, ModelConfig, "model", skip=("backend", "threads"))  # the serve flags; chat runs transformers
    g = p.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt (default: the template's)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: the model's generation_config.json, else {DEFAULT_TEMPERATURE})")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens "
                   "whose probabilities sum to P (default: the model's, else 1.0)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample among the K most likely tokens; 0 = off (default: the model's, else 0)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages tokens already in the prompt or answer (default: the model's, else 1)")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--multiline", action="store_true", help="multi-line input; submit with Esc then Enter")
    g.add_argument("--plain", action="store_true", help="print plain text, not rendered Markdown")
    g.add_argument("--history-file", default=str(Path.home() / ".cache" / "vicuna" / "chat_history"),
                   help="where input history is kept (terminal only)")
    # --debug also exists on `vicuna` itself; SUPPRESS keeps either spelling working
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the rendered prompt and tokens/s")


class ChatSession:
    """The conversation state and the slash commands, independent of the terminal."""

    def __init__(self, lm: LoadedModel, settings: dict, system: str | None = None):
        self.lm = lm
        self.settings = {k: v for k, v in settings.items() if v is not None}  # what the user set
        self.params = self._params(self.settings)  # validates them
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last_stats: dict[str, float] = {}

    def conversation(self, extra: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.messages + (extra or [])

    def prompt_ids(self, notice) -> tuple[str, list[int]]:
        """Render the prompt; drop the oldest exchanges (with a notice) if it would not fit."""
        reserve = min(self.params.max_new_tokens, self.lm.context_length // 2)
        while True:
            text = render_prompt(self.lm.template, self.conversation(), self.lm.tokenizer)
            ids = encode(self.lm.tokenizer, text)
            if len(ids) + reserve <= self.lm.context_length or len(self.messages) <= 1:
                break
            del self.messages[:2]
            notice("[context full: dropped the oldest exchange]")
        if len(ids) >= self.lm.context_length:
            self.messages.pop()
            raise GenerationError(
                f"this message is {len(ids)} tokens with the prompt, but the model's context is "
                f"{self.lm.context_length}; send something shorter", param="messages")
        return text, ids

    def stream(self, notice, debug=None):
        """Yield text deltas answering the last user message; stores the answer."""
        text, ids = self.prompt_ids(notice)
        if debug:
            debug(f"[prompt, {len(ids)} tokens]\n{text}")
        room = self.lm.context_length - len(ids)
        params = self.params.with_(max_new_tokens=min(self.params.max_new_tokens, room))
        answer, start, count = [], time.perf_counter(), 0
        self.messages.append({"role": "assistant", "content": ""})
        try:
            for ev in generate_stream(self.lm.model, self.lm.tokenizer, ids, params):
                answer.append(ev.text)
                self.messages[-1]["content"] = "".join(answer)
                count = ev.completion_tokens
                yield ev.text
        finally:
            elapsed = time.perf_counter() - start
            self.last_stats = {"prompt_tokens": len(ids), "completion_tokens": count, "seconds": elapsed,
                               "tokens_per_s": count / elapsed if elapsed > 0 else 0.0}

    # ---------------------------------------------------------------- commands
    def set(self, key: str, value: str) -> str:
        if key not in SETTABLE:
            raise UsageError(f"cannot set {key!r}; settable: {', '.join(SETTABLE)}")
        try:
            parsed = SETTABLE[key](value)
        except ValueError:
            raise UsageError(f"{key} needs a {SETTABLE[key].__name__}, got {value!r}") from None
        try:
            self.params = self._params({**self.settings, key: parsed})
        except GenerationError as e:
            raise UsageError(f"/set {key}: {e}") from None
        self.settings[key] = parsed
        return f"{key} = {parsed}"

    def _params(self, settings: dict) -> SamplingParams:
        """The model's defaults under the user's settings (the one builder every path uses)."""
        settings = dict(settings)
        return sampling_params(self.lm.defaults, max_new_tokens=settings.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                               strip_leading=True, **settings)

    def save(self, path: str) -> str:
        data = {"model": self.lm.name, "template": self.lm.template.name, "system": self.system,
                "messages": self.messages, "params": {k: v for k, v in asdict(self.params).items()
                                                      if k in SETTABLE}}
        target = write_json(Path(path).expanduser(), data)
        return f"saved {len(self.messages)} messages to {target}"

    def load(self, path: str) -> str:
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            messages = data["messages"]
            if messages:
                split_system(messages)  # validates roles and content
        except (OSError, ValueError, KeyError, TypeError, TemplateError) as e:
            raise UsageError(f"cannot load a conversation from {path}: {e}") from None
        self.messages, self.system = messages, data.get("system")
        return f"loaded {len(messages)} messages from {path}"

    def stats(self) -> str:
        text = render_prompt(self.lm.template, self.conversation([{"role": "user", "content": ""}]), self.lm.tokenizer)
        used = len(encode(self.lm.tokenizer, text))
        s = self.last_stats
        last = (f"last answer: {s['completion_tokens']} tokens in {s['seconds']:.2f} s "
                f"({s['tokens_per_s']:.1f} tokens/s)") if s else "no answer yet"
        return (f"model {self.lm.name} ({self.lm.template.name}, {self.lm.device}); "
                f"{len(self.messages) // 2} exchanges, {used}/{self.lm.context_length} context tokens; {last}")


class Terminal:
    """Input and output: prompt_toolkit + rich on a terminal, plain lines when piped."""

    def __init__(self, args):
        self.interactive = sys.stdin.isatty()
        self.pretty = sys.stdout.isatty() and not args.plain
        self.multiline = args.multiline
        self._session = None
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            try:
                Path(args.history_file).parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(args.history_file)
            except OSError:
                history = InMemoryHistory()
            self._session = PromptSession(history=history)
        if self.pretty:
            from rich.console import Console

            self.console = Console()

    def read(self) -> str | None:
        """The next input, or None at end of input."""
        if not self.interactive:
            line = sys.stdin.readline()
            return None if not line else line.rstrip("\n")
        while True:
            try:
                return self._session.prompt("USER: ", multiline=self.multiline)
            except KeyboardInterrupt:
                self.info("(Ctrl+C at the prompt does nothing; /exit or Ctrl+D to leave)")
            except EOFError:
                return None

    def info(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def show_answer(self, deltas) -> None:
        """Stream deltas to the screen; Ctrl+C stops the answer."""
        if self.pretty:
            from rich.live import Live
            from rich.markdown import Markdown

            text = ""
            self.console.print("[bold]ASSISTANT:[/bold]")
            with Live(Markdown(""), console=self.console, refresh_per_second=12, vertical_overflow="visible") as live:
                for d in deltas:
                    text += d
                    live.update(Markdown(text))
        else:
            if self.interactive:
                sys.stdout.write("ASSISTANT: ")
            for d in deltas:
                sys.stdout.write(d)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()


def run(args) -> int:
    lm = load_hf_model(from_flags(ModelConfig, args))
    try:
        session = ChatSession(lm, {k: getattr(args, k) for k in SETTABLE}, args.system)
    except GenerationError as e:
        raise UsageError(f"--{e.param.replace('_', '-')}: {e}") from None
    params = session.params
    term = Terminal(args)
    debug = term.info if getattr(args, "debug", False) else None
    if term.interactive:
        how = "greedy" if params.greedy else f"temperature {params.temperature:g}"
        if params.top_p < 1:
            how += f", top_p {params.top_p:g}"
        term.info(f"Chatting with {lm.name} (template {lm.template.name}, {lm.device}, {how}). "
                  "Type /help for commands.")
    while True:
        line = term.read()
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if handle_command(session, term, line.strip(), debug) == "exit":
                    return 0
                continue
            session.messages.append({"role": "user", "content": line})
            answer(session, term, debug)
        except VicunaError as e:
            term.info(f"error: {e}")


def answer(session: ChatSession, term: Terminal, debug) -> None:
    gen = session.stream(term.info, debug)
    try:
        term.show_answer(gen)
    except KeyboardInterrupt:
        gen.close()  # stops generation at once; the partial answer stays in the history
        sys.stdout.write("\n")
        term.info("[stopped]")
    if debug and session.last_stats:
        s = session.last_stats
        debug(f"[{s['completion_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s]")


def handle_command(session: ChatSession, term: Terminal, line: str, debug) -> str | None:
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        term.info(HELP)
    elif name == "/reset":
        session.messages.clear()
        term.info("[conversation reset]")
    elif name == "/undo":
        if len(session.messages) >= 2:
            del session.messages[-2:]
            term.info("[dropped the last exchange]")
        else:
            term.info("[nothing to undo]")
    elif name == "/regen":
        if len(session.messages) < 2:
            term.info("[nothing to regenerate]")
        else:
            session.messages.pop()
            answer(session, term, debug)
    elif name == "/system":
        session.system = rest or None
        term.info(f"[system prompt: {rest}]" if rest else "[system prompt: the template's default]")
    elif name == "/set":
        key, _, value = rest.partition(" ")
        term.info(f"[{session.set(key.strip(), value.strip())}]")
    elif name == "/save":
        if not rest:
            raise UsageError("usage: /save FILE")
        term.info(f"[{session.save(rest)}]")
    elif name == "/load":
        if not rest:
            raise UsageError("usage: /load FILE")
        term.info(f"[{session.load(rest)}]")
    elif name == "/stats":
        term.info(session.stats())
    elif name == "/prompt":
        term.info(render_prompt(session.lm.template, session.conversation([{"role": "user", "content": "…"}]),
                                session.lm.tokenizer))
    else:
        term.info(f"unknown command {name}; /help lists them")
    return None
