"""Synthetic ShareGPT conversations with ChatGPT-page HTML, for benchmarks and tests.

Shaped like the real dump: 1-4 exchanges; answers in the page's markup
(``<div class="markdown prose">``, code blocks with the language header, "Copy
code" button and highlight.js spans, nested lists, tables); and the usual
debris — regenerate counters, error pages, identity leaks, duplicates, a leading
assistant turn, a trailing question — in known proportions.
"""

from __future__ import annotations

import html
import random

WORDS = ("the model data train token answer python function value list table request server cache "
         "memory quickly simple example because however result return input output string number "
         "user system design test error file network thread process query index").split()

CODE = {
    "python": ["def {w}(x):", "    return x + 1", "", "for i in range(10):", "    print({w}(i))  # <b>not</b> html"],
    "javascript": ["const {w} = (a, b) => a + b;", "document.querySelector('<div>').innerHTML = `${{x}}`;",
                   "console.log({w}(1, 2));"],
    "html": ['<div class="{w}">', "  <p>Hello &amp; welcome</p>", "</div>"],
    "bash": ["pip install {w}", "echo \"done\" > /tmp/{w}.log"],
    "sql": ["SELECT * FROM {w} WHERE id < 10;"],
}
WRAP = '<div class="markdown prose w-full break-words dark:prose-invert light">{}</div>'


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _sentence(rng: random.Random) -> str:
    s = _words(rng, rng.randint(6, 16)).capitalize()
    r = rng.random()
    if r < 0.2:
        s += f" <strong>{_words(rng, 2)}</strong>"
    elif r < 0.35:
        s += f" <code>{rng.choice(WORDS)}()</code>"
    elif r < 0.45:
        s += f' <a href="https://example.com/{rng.choice(WORDS)}" target="_new">{_words(rng, 2)}</a>'
    elif r < 0.55:
        s += f" <em>{_words(rng, 2)}</em>"
    return s + "."


def _para(rng: random.Random) -> str:
    return "<p>" + " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) + "</p>"


def _hl(line: str) -> str:
    """Escape a code line and add highlight.js-like spans around a few words."""
    esc = html.escape(line, quote=False)
    for kw in ("def", "return", "for", "const", "SELECT", "FROM", "echo"):
        esc = esc.replace(kw + " ", f'<span class="hljs-keyword">{kw}</span> ', 1)
    return esc


def _code(rng: random.Random) -> str:
    lang = rng.choice(list(CODE))
    w = rng.choice(WORDS)
    lines = [ln.format(w=w) for ln in CODE[lang]] * rng.randint(1, 3)
    body = "\n".join(_hl(ln) for ln in lines) + "\n"
    return (
        '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 '
        f'bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">{lang}</span><button class="flex ml-auto '
        'gap-2"><svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" class="h-4 w-4" '
        'height="1em" width="1em" xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 2 0 0 '
        '1-2 2H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" rx="1" ry="1">'
        '</rect></svg>Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre '
        f'hljs language-{lang}">{body}</code></div></div></pre>'
    )


def _list(rng: random.Random, depth: int = 0) -> str:
    tag = rng.choice(("ol", "ul"))
    items = []
    for _ in range(rng.randint(2, 5)):
        item = _sentence(rng)
        if depth == 0 and rng.random() < 0.2:
            item += _list(rng, depth + 1)
        items.append(f"<li>{item}</li>")
    return f"<{tag}>" + "".join(items) + f"</{tag}>"


def _table(rng: random.Random) -> str:
    cols = rng.randint(2, 4)
    head = "".join(f"<th>{rng.choice(WORDS)}</th>" for _ in range(cols))
    rows = "".join("<tr>" + "".join(f"<td>{_words(rng, 2)}</td>" for _ in range(cols)) + "</tr>"
                   for _ in range(rng.randint(2, 5)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def answer_html(rng: random.Random) -> str:
    parts = [_para(rng)]
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        parts.append(_code(rng) if r < 0.3 else _list(rng) if r < 0.55 else _table(rng) if r < 0.65
                     else f"<h3>{_words(rng, 3)}</h3>" if r < 0.75 else _para(rng))
    return WRAP.format("".join(parts))


def question(rng: random.Random) -> str:
    q = _words(rng, rng.randint(5, 30)).capitalize() + "?"
    return (f"{rng.randint(1, 2)} / 2" + q) if rng.random() < 0.1 else q


def conversation(rng: random.Random, i: int) -> dict:
    """One synthetic sample; about 15% carry a defect that `clean` must drop or repair."""
    turns = []
    for _ in range(rng.randint(1, 4)):
        turns.append({"from": "human", "value": question(rng)})
        turns.append({"from": "gpt", "value": answer_html(rng)})
    r = rng.random()
    if r < 0.03:
        turns[-1]["value"] = "Too many requests in 1 hour. Try again later."
    elif r < 0.06:
        turns[-1]["value"] = WRAP.format("<p>As a model trained by OpenAI, I cannot do that.</p>")
    elif r < 0.08:
        turns.insert(0, {"from": "gpt", "value": WRAP.format(_para(rng))})
    elif r < 0.10:
        turns.append({"from": "human", "value": question(rng)})
    elif r < 0.12:
        turns[1]["from"] = "human"
    elif r < 0.14:
        turns[-1]["value"] = ""
    elif r < 0.16:
        turns[0]["from"] = rng.choice(("user", "USER"))
        turns[1]["from"] = rng.choice(("assistant", "chatgpt", "bard"))
    return {"id": f"syn{i}", "conversations": turns}


def corpus(n: int, seed: int = 0, duplicates: float = 0.02) -> list[dict]:
    """``n`` samples; a fraction are exact duplicates (same id or same first exchange)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if out and rng.random() < duplicates:
            dup = dict(rng.choice(out))
            if rng.random() < 0.5:
                dup["id"] = f"syn{i}"  # same content, new id
            out.append(dup)
        else:
            out.append(conversation(rng, i))
    return out
