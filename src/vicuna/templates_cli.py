"""`vicuna templates list|show|render`: inspect the conversation templates."""

from __future__ import annotations

import json
import sys

from .commands import area_parser, command
from .conversation import TemplateError, get_template, list_templates
from .errors import UsageError


def add_commands(sub) -> None:
    verbs = area_parser(sub, "templates", "list, show and render conversation templates")
    command(verbs, "list", _list, "list the registered templates")
    p = command(verbs, "show", _show, "show a template's settings, an example and its HF chat_template")
    p.add_argument("name")
    p.add_argument("--jinja", action="store_true", help="print only the Hugging Face chat_template (Jinja)")
    p = command(
        verbs, "render", _render, "print the exact generation prompt for a list of messages",
        description="Print the exact prompt a model would see.\n\nexample:\n"
        '  echo \'[{"role":"user","content":"Hi"}]\' | vicuna templates render vicuna_v1.1',
    )
    p.add_argument("name")
    p.add_argument("--messages", default="-", help="JSON file with [{role, content}, ...]; - reads stdin")
    p.add_argument("--bos", default="<s>", help="BOS token text")
    p.add_argument("--eos", default="</s>", help="EOS token text")
    p.add_argument("--no-generation-prompt", action="store_true", help="do not end with the assistant prefix")


def _list(args) -> None:
    for t in list_templates():
        print(f"{t.name:<14} {t.description}")


def _show(args) -> None:
    t = _get(args.name)
    if args.jinja:
        print(t.to_jinja())
        return
    info = t.describe()
    info["chat_template"] = t.to_jinja()
    print(json.dumps(info, indent=2, ensure_ascii=False))


def _render(args) -> None:
    t = _get(args.name)
    try:
        raw = sys.stdin.read() if args.messages == "-" else open(args.messages, encoding="utf-8").read()
        messages = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read messages from {args.messages}: {e}") from None
    if not isinstance(messages, list):
        raise UsageError("messages must be a JSON list of {\"role\", \"content\"} objects")
    try:
        text = t.render(messages, add_generation_prompt=not args.no_generation_prompt, bos_token=args.bos,
                        eos_token=args.eos)
    except TemplateError as e:
        raise UsageError(str(e)) from None
    sys.stdout.write(text + "\n")


def _get(name):
    try:
        return get_template(name)
    except TemplateError as e:
        raise UsageError(str(e)) from None
