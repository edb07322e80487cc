"""ChatGPT-page HTML back to the Markdown ChatGPT wrote.

ShareGPT captured assistant turns as the HTML the ChatGPT web page rendered from
the model's Markdown.  We walk the DOM parsed by Lexbor (``selectolax``) and
emit that Markdown again: paragraphs, headings, emphasis, links, inline code,
nested lists, tables, blockquotes and fenced code blocks.

Why not ``markdownify`` (what FastChat used): it works on BeautifulSoup (~10x
slower to parse), escapes ``*`` and ``_`` in prose (text the model then learns),
and needs regex repair afterwards for the code-block header ("python" + "Copy
code" button) that ChatGPT puts inside ``<pre>``; FastChat even deleted every
``<div>``/``<span>`` with regexes first, which also hits ``<div>`` written
literally inside code.  Here a code block's language comes from its
``language-*`` class (or the header) and its text is taken verbatim from the
``<code>`` node, so HTML inside code survives as text.
"""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser

_WS = re.compile(r"[ \t\n\r\f]+")
_SPACES = re.compile(r"  +")
_BACKTICKS = re.compile(r"`+")
_LANG_CLASS = re.compile(r"(?:^|\s)(?:language|lang)-([^\s]+)")
_LANG_NAME = re.compile(r"[\w+#.\-]{1,30}")
_HEADING = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
# Elements that are page furniture, never content.
_SKIP = frozenset({"button", "svg", "script", "style", "noscript", "template", "head", "title", "meta", "link",
                   "input", "select", "textarea", "iframe", "canvas", "video", "audio", "form", "nav"})
# Block containers whose children are laid out as blocks.
_CONTAINERS = frozenset({"div", "section", "article", "main", "body", "html", "header", "footer", "aside",
                         "figure", "figcaption", "details", "summary", "center", "dl", "dd", "dt"})

# What a ChatGPT-page HTML answer looks like (after the "N / M" counter): it opens
# with a block tag (usually <div class="markdown prose ...">) and closes with one.
_BLOCK_TAGS = r"(?:div|p|ol|ul|pre|h[1-6]|table|blockquote)"
_HTML_START = re.compile(r"\s*<" + _BLOCK_TAGS + r"(?:\s[^<>]*)?>", re.I)
_HTML_END = re.compile(r"</" + _BLOCK_TAGS + r"\s*>\s*$", re.I)
_CHATGPT_WRAPPER = re.compile(r'\s*<div class="[^"]*(?:markdown|prose|request-)', re.I)


def looks_like_html(text: str) -> bool:
    """True for an answer captured as page HTML (not for Markdown that mentions a tag)."""
    if not _HTML_START.match(text):
        return False
    return bool(_HTML_END.search(text[-64:]) or _CHATGPT_WRAPPER.match(text))


def html_to_markdown(html: str) -> str:
    """Markdown for one assistant answer captured as ChatGPT-page HTML."""
    body = LexborHTMLParser(html).body
    if body is None:
        return ""
    blocks: list[str] = []
    _blocks(body, blocks)
    md = "\n\n".join(blocks).strip()
    if looks_like_html(md):
        # the answer *was* about HTML (escaped in the page); keep it from being
        # parsed as HTML again, so cleaning stays idempotent
        md = "\\" + md.lstrip()
    return md


# ----------------------------------------------------------------------------- blocks


def _blocks(node, blocks: list[str]) -> None:
    """Append the Markdown blocks of ``node``'s children to ``blocks``."""
    inline: list[str] = []
    for child in node.iter(include_text=True):
        tag = child.tag
        if tag == "-text":
            inline.append(_collapse(child.text_content))
        elif tag == "p":
            _flush(inline, blocks)
            _para(child, blocks)
        elif tag in _CONTAINERS:
            _flush(inline, blocks)
            _blocks(child, blocks)
        elif tag == "pre":
            _flush(inline, blocks)
            blocks.append(_code_block(child))
        elif tag == "ul" or tag == "ol":
            _flush(inline, blocks)
            text = _list(child, tag == "ol")
            if text:
                blocks.append(text)
        elif tag in _HEADING:
            _flush(inline, blocks)
            text = _inline_text(child).replace("\n", " ").strip()
            if text:
                blocks.append("#" * _HEADING[tag] + " " + text)
        elif tag == "table":
            _flush(inline, blocks)
            text = _table(child)
            if text:
                blocks.append(text)
        elif tag == "blockquote":
            _flush(inline, blocks)
            sub: list[str] = []
            _blocks(child, sub)
            if sub:
                blocks.append("\n".join("> " + ln if ln else ">" for ln in "\n\n".join(sub).split("\n")))
        elif tag == "hr":
            _flush(inline, blocks)
            blocks.append("---")
        elif tag in _SKIP or tag[0] == "-":
            continue
        else:
            _inline_node(child, tag, inline)
    _flush(inline, blocks)


def _collapse(text: str) -> str:
    """HTML whitespace collapsing; most text nodes need none, and `in` is cheaper than a regex."""
    if "\n" in text or "  " in text or "\t" in text or "\r" in text or "\f" in text:
        return _WS.sub(" ", text)
    return text


def _flush(inline: list[str], blocks: list[str]) -> None:
    if not inline:
        return
    text = _tidy_inline("".join(inline))
    inline.clear()
    if text:
        blocks.append(text)


def _tidy_inline(text: str) -> str:
    """Collapse HTML whitespace; keep the line breaks that came from <br>."""
    if "  " in text:
        text = _SPACES.sub(" ", text)
    if "\n" not in text:
        return text.strip()
    return "\n".join(ln.strip() for ln in text.split("\n")).strip()


def _para(node, blocks: list[str]) -> None:
    text = _tidy_inline(_inline_text(node))
    if text:
        blocks.append(text)


def _code_block(pre) -> str:
    code = pre.css_first("code")
    lang = ""
    if code is not None:
        m = _LANG_CLASS.search(code.attributes.get("class") or "")
        if m:
            lang = m.group(1)
        text = code.text(deep=True)
    else:
        text = "".join(n.text(deep=True) for n in pre.iter(include_text=True) if n.tag not in _SKIP)
    if not lang and code is not None:
        # ChatGPT's header, before the code: <div ...><span>python</span><button>Copy code</button></div>
        for node in pre.traverse():
            if node.tag == "code":
                break
            if node.tag == "span":
                cand = node.text(deep=True).strip()
                if _LANG_NAME.fullmatch(cand) and cand.lower() != "copy code":
                    lang = cand
                    break
    text = text.rstrip("\n")
    runs = _BACKTICKS.findall(text)
    fence = "`" * max(3, max(map(len, runs), default=0) + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _list(node, ordered: bool) -> str:
    try:
        n = int(node.attributes.get("start") or 1) if ordered else 0
    except ValueError:
        n = 1
    parts: list[list[str]] = []
    loose = False
    for li in node.iter():
        if li.tag in _SKIP:
            continue
        sub: list[str] = []
        _blocks(li, sub)  # a stray element directly inside the list is laid out as an item too
        if li.tag != "li" and not sub:
            continue
        parts.append(sub)
        if not loose and any(c.tag == "p" for c in li.iter()):
            loose = True  # ChatGPT renders a list with blank lines between items with <li><p>
    items: list[str] = []
    for sub in parts:
        marker = f"{n}. " if ordered else "- "
        n += 1
        body = "\n\n".join(sub) if loose else "\n".join(sub)
        indent = " " * len(marker)
        lines = body.split("\n")
        items.append(marker + lines[0] + "".join("\n" + (indent + ln if ln else "") for ln in lines[1:]))
    items = [it.rstrip() for it in items]
    return ("\n\n" if loose else "\n").join(items)


def _table(table) -> str:
    rows: list[list[str]] = []
    for tr in table.css("tr"):
        cells = [_cell(c) for c in tr.iter() if c.tag in ("td", "th")]
        if cells:
            rows.append(cells)
    if not rows:
        return ""
    width = max(map(len, rows))
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * width]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _cell(node) -> str:
    return _WS.sub(" ", _inline_text(node)).strip().replace("|", "\\|")


# ----------------------------------------------------------------------------- inline


def _inline_text(node) -> str:
    out: list[str] = []
    _inline(node, out)
    return "".join(out)


def _inline(node, out: list[str]) -> None:
    for child in node.iter(include_text=True):
        tag = child.tag
        if tag == "-text":
            out.append(_collapse(child.text_content))
        else:
            _inline_node(child, tag, out)


def _inline_node(child, tag: str, out: list[str]) -> None:
    if tag == "strong" or tag == "b":
        _wrap(child, "**", out)
    elif tag == "em" or tag == "i":
        _wrap(child, "*", out)
    elif tag == "code":
        out.append(_inline_code(child.text(deep=True)))
    elif tag == "a":
        text = _WS.sub(" ", _inline_text(child)).strip()
        href = (child.attributes.get("href") or "").strip()
        if not href or href.startswith("javascript:"):
            out.append(text)
        elif not text or text == href:
            out.append(href)  # ChatGPT auto-links bare URLs: the source was the URL itself
        else:
            out.append(f"[{text}]({href})")
    elif tag == "br":
        out.append("\n")
    elif tag == "del" or tag == "s" or tag == "strike":
        _wrap(child, "~~", out)
    elif tag == "img":
        alt = child.attributes.get("alt") or ""
        src = child.attributes.get("src") or ""
        if src:
            out.append(f"![{alt}]({src})")
    elif tag == "span" and "katex" in (child.attributes.get("class") or ""):
        out.append(_math(child))
    elif tag in _SKIP or tag[0] == "-":
        return
    elif tag == "p" or tag in _CONTAINERS or tag == "li" or tag in _HEADING:
        out.append(" ")  # a block inside inline content (e.g. a table cell): keep words apart
        _inline(child, out)
        out.append(" ")
    else:  # span, sup, sub, u, mark, ... : transparent
        _inline(child, out)


def _wrap(node, mark: str, out: list[str]) -> None:
    inner = _WS.sub(" ", _inline_text(node))
    core = inner.strip()
    if not core:
        out.append(inner)
        return
    # "<b> x </b>" -> " **x** ": emphasis markers must touch the text
    lead = " " if inner[0] == " " else ""
    trail = " " if inner[-1] == " " else ""
    out.append(f"{lead}{mark}{core}{mark}{trail}")


def _inline_code(text: str) -> str:
    runs = _BACKTICKS.findall(text)
    fence = "`" * (max(map(len, runs), default=0) + 1)
    if text.startswith("`") or text.endswith("`"):
        return f"{fence} {text} {fence}"
    return f"{fence}{text}{fence}"


def _math(span) -> str:
    ann = span.css_first('annotation[encoding="application/x-tex"]')
    if ann is None:
        return span.text(deep=True)
    tex = ann.text(deep=True).strip()
    parent = span.parent
    display = "katex-display" in (span.attributes.get("class") or "") or (
        parent is not None and "katex-display" in (parent.attributes.get("class") or ""))
    return f"$${tex}$$" if display else f"${tex}$"
