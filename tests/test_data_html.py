"""Golden tests for ChatGPT-page HTML -> Markdown, and property tests of cleaning."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vicuna.data.clean import CleanConfig, Cleaner, clean_value
from vicuna.data.html2md import html_to_markdown, looks_like_html

WRAP = '<div class="markdown prose w-full break-words dark:prose-invert light">{}</div>'


def code_block(lang: str, body_html: str) -> str:
    """A code block exactly as the ChatGPT page rendered it (header, Copy code button, hljs spans)."""
    return (
        '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 '
        'bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">' + lang + '</span><button class="flex ml-auto '
        'gap-2"><svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" class="h-4 w-4" '
        'height="1em" width="1em" xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 2 0 0 '
        '1-2 2H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" rx="1" ry="1">'
        '</rect></svg>Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs '
        'language-' + lang + '">' + body_html + '</code></div></div></pre>'
    )


PYTHON = code_block(
    "python",
    '<span class="hljs-keyword">def</span> <span class="hljs-title function_">fib</span>(<span class="hljs-params">'
    'n</span>):\n    <span class="hljs-string">"""Return the n-th Fibonacci number."""</span>\n    a, b = <span '
    'class="hljs-number">0</span>, <span class="hljs-number">1</span>\n    <span class="hljs-keyword">for</span> _ '
    '<span class="hljs-keyword">in</span> <span class="hljs-built_in">range</span>(n):\n        a, b = b, a + b\n'
    '\n\n    <span class="hljs-keyword">return</span> a  <span class="hljs-comment"># 2 * 3 and __dunder__ stay</span>\n',
)
HTML_IN_CODE = code_block(
    "html",
    '<span class="hljs-meta">&lt;!DOCTYPE <span class="hljs-keyword">html</span>&gt;</span>\n<span class="hljs-tag">&lt;'
    '<span class="hljs-name">div</span> <span class="hljs-attr">class</span>=<span class="hljs-string">"card"</span>'
    '&gt;</span>\n  <span class="hljs-tag">&lt;<span class="hljs-name">p</span>&gt;</span>Tom &amp;amp; Jerry &lt; 3'
    '<span class="hljs-tag">&lt;/<span class="hljs-name">p</span>&gt;</span>\n<span class="hljs-tag">&lt;/<span '
    'class="hljs-name">div</span>&gt;</span>\n',
)
JS = code_block(
    "javascript",
    '<span class="hljs-keyword">const</span> md = <span class="hljs-string">`use ```fences``` here`</span>;\n'
    '<span class="hljs-variable language_">console</span>.<span class="hljs-title function_">log</span>(md);\n',
)


def test_paragraphs_emphasis_links_inline_code():
    html = WRAP.format(
        "<p>Sure! Here is <strong>bold</strong>, <em>italic</em>, <del>gone</del>, <code>x = y * 2</code> "
        'and a <a href="https://docs.python.org/3/" target="_new">link to the docs</a>.\nSee '
        '<a href="https://example.com" target="_new">https://example.com</a> too.</p>'
        "<p>Use <code>`backticks`</code> like <b> this </b>.</p>"
    )
    assert html_to_markdown(html) == (
        "Sure! Here is **bold**, *italic*, ~~gone~~, `x = y * 2` and a "
        "[link to the docs](https://docs.python.org/3/). See https://example.com too.\n\n"
        "Use `` `backticks` `` like **this** ."
    )


def test_code_blocks_keep_language_and_verbatim_code():
    html = WRAP.format("<p>Three languages:</p>" + PYTHON + HTML_IN_CODE + JS)
    assert html_to_markdown(html) == (
        "Three languages:\n\n"
        "```python\n"
        "def fib(n):\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "\n\n"
        "    return a  # 2 * 3 and __dunder__ stay\n"
        "```\n\n"
        "```html\n"
        "<!DOCTYPE html>\n"
        '<div class="card">\n'
        "  <p>Tom &amp; Jerry < 3</p>\n"
        "</div>\n"
        "```\n\n"
        "````javascript\n"
        "const md = `use ```fences``` here`;\n"
        "console.log(md);\n"
        "````"
    )


def test_code_block_language_from_header_when_class_missing():
    html = WRAP.format(code_block("rust", "fn main() {}\n").replace("hljs language-rust", "hljs"))
    assert html_to_markdown(html) == "```rust\nfn main() {}\n```"


def test_nested_lists_tight_and_loose():
    html = WRAP.format(
        "<p>Plan:</p><ol><li>Prepare<ul><li>wash <em>carefully</em></li><li>cut<ol start=\"3\"><li>small</li>"
        "<li>smaller</li></ol></li></ul></li><li>Cook</li></ol>"
        "<ul><li><p>First point.</p></li><li><p>Second point:</p>" + PYTHON.replace("language-python", "language-py")
        + "</li></ul>"
    )
    md = html_to_markdown(html)
    assert md.startswith(
        "Plan:\n\n"
        "1. Prepare\n"
        "   - wash *carefully*\n"
        "   - cut\n"
        "     3. small\n"
        "     4. smaller\n"
        "2. Cook\n\n"
        "- First point.\n\n"
        "- Second point:\n\n"
        "  ```py\n"
        "  def fib(n):\n"
    )
    assert "\n  ```" in md and md.endswith("```")


def test_table_headings_blockquote_hr():
    html = WRAP.format(
        "<h2>Comparison</h2><table><thead><tr><th>Model</th><th>Params</th><th>Notes</th></tr></thead><tbody>"
        "<tr><td>Vicuna</td><td>13B</td><td>fine-tuned <strong>LLaMA</strong></td></tr>"
        "<tr><td>Alpaca</td><td>7B</td><td>a|b <code>x</code></td></tr></tbody></table>"
        "<blockquote><p>Quoted line one.</p><p>Line two.</p></blockquote><hr><h3>End</h3>"
    )
    assert html_to_markdown(html) == (
        "## Comparison\n\n"
        "| Model | Params | Notes |\n"
        "| --- | --- | --- |\n"
        "| Vicuna | 13B | fine-tuned **LLaMA** |\n"
        "| Alpaca | 7B | a\\|b `x` |\n\n"
        "> Quoted line one.\n>\n> Line two.\n\n"
        "---\n\n"
        "### End"
    )


def test_line_breaks_entities_and_images():
    html = WRAP.format('<p>a &lt; b &amp;&amp; c &gt; d<br>next line</p><p><img src="https://x/y.png" alt="chart"></p>')
    assert html_to_markdown(html) == "a < b && c > d\nnext line\n\n![chart](https://x/y.png)"


def katex(tex: str) -> str:
    return ('<span class="katex"><span class="katex-mathml"><math xmlns="http://www.w3.org/1998/Math/MathML">'
            '<semantics><mrow><mi>x</mi></mrow><annotation encoding="application/x-tex">' + tex + '</annotation>'
            '</semantics></math></span><span class="katex-html" aria-hidden="true"><span class="base">'
            '<span class="mord">x</span></span></span></span>')


def test_katex_math_back_to_tex():
    html = WRAP.format('<p>Area is <span class="math math-inline">' + katex(r"\pi r^2") + "</span> here.</p>"
                       '<div class="math math-display"><span class="katex-display">' + katex("E = mc^2")
                       + "</span></div>")
    assert html_to_markdown(html) == "Area is $\\pi r^2$ here.\n\n$$E = mc^2$$"


def test_page_debris_removed_by_clean_value():
    html = "2 / 2" + WRAP.format("<p>Answer.</p>" + PYTHON)
    md, converted = clean_value(html, is_gpt=True)
    assert converted and md.startswith("Answer.\n\n```python\ndef fib(n):")
    assert "Copy code" not in md and "2 / 2" not in md
    # text captured without HTML (older dumps): counters, copy counters, "```pythonCopy code"
    text = "1 / 1Here:\n```pythonCopy codeprint(1)\n```\nCopy12 chars / 3 words"
    assert clean_value(text, is_gpt=True) == ("Here:\n```python\nprint(1)\n```", False)
    # a human turn is never parsed as HTML: what the user typed is content
    assert clean_value("3 / 3<p>why does <b>this</b> not render?</p>", is_gpt=False)[0] == \
        "<p>why does <b>this</b> not render?</p>"
    # fractions are not counters
    assert clean_value("1 / 2 = 0.5", is_gpt=True)[0] == "1 / 2 = 0.5"
    assert clean_value("3 / 4 cups of flour", is_gpt=False)[0] == "3 / 4 cups of flour"
    assert clean_value("1 / 1", is_gpt=False)[0] == ""


def test_looks_like_html_is_not_fooled_by_markdown_about_html():
    assert looks_like_html(WRAP.format("<p>x</p>"))
    assert looks_like_html("<p>x</p>")
    assert not looks_like_html("Use a <div> element to group things.")
    assert not looks_like_html("```html\n<div>x</div>\n```")


def test_answer_about_html_stays_literal_and_idempotent():
    html = WRAP.format("<p>&lt;p&gt;Hello&lt;/p&gt;</p>")
    first, _ = clean_value(html, is_gpt=True)
    again, converted = clean_value(first, is_gpt=True)
    assert again == first and not converted
    assert "Hello" in first


# --------------------------------------------------------------------------- properties

html_fragments = st.lists(st.sampled_from([
    "<p>", "</p>", "<div class=\"markdown prose\">", "</div>", "<ul>", "<ol start=\"2\">", "<li>", "</li>", "</ul>",
    "<pre>", "</pre>", "<code class=\"language-py\">", "</code>", "<table>", "<tr>", "<td>", "<th>", "<b>", "</b>",
    "<a href=\"u\">", "</a>", "<br>", "<blockquote>", "<h2>", "&lt;", "&amp;", "Copy code", "1 / 2", "2 / 2",
    "Copy3 chars / 1 words", "```", "`", "*", "|", "\n", "  ", "text", "Too many requests in 1 hour. Try again later.",
    "\ud83d", "\u200b", "OpenAI", '<span class="katex">', '<annotation encoding="application/x-tex">', "</span>",
]) | st.text(max_size=8), max_size=40).map("".join)

values = st.one_of(st.text(max_size=200), html_fragments, html_fragments.map(lambda s: WRAP.format(s)))
turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "system", "bard", "x"]),
                              "value": values})
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                        max_size=3), max_leaves=10)
sample = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=5), st.integers()), "conversations": st.lists(turn, max_size=6)},
    optional={"model": st.text(max_size=5), "extra": json_value},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(sample, json_value))
def test_clean_never_crashes_and_is_idempotent(obj):
    cleaner = Cleaner()
    first = cleaner.clean(obj, 1)
    if first.sample is None:
        assert first.reason and first.detail is not None
        return
    json.dumps(first.sample, ensure_ascii=False)  # serialisable
    second = cleaner.clean(json.loads(json.dumps(first.sample)), 1)
    assert second.sample == first.sample, (first.sample, second.reason, second.detail)
    assert "html_converted" not in second.changes


@settings(max_examples=300, deadline=None)
@given(html_fragments | st.text(max_size=300))
def test_value_cleaning_is_a_fixed_point(text):
    for is_gpt in (True, False):
        once, _ = clean_value(text, is_gpt)
        assert clean_value(once, is_gpt)[0] == once


@pytest.mark.parametrize("reply", [
    "Too many requests in 1 hour. Try again later.",
    "!Too many requests in 1 hour. Try again later.",
    "Network error",
    '<div class="flex flex-col"><div class="py-2 px-3 border text-gray-600 rounded-md text-sm border-red-500 '
    'bg-red-500/10">An error occurred. If this issue persists please contact us through our help center at '
    'help.openai.com.</div></div>',
    WRAP.format("<p>There was an error generating a response</p>"),
])
def test_error_pages_are_dropped(reply):
    sample = {"id": "e", "conversations": [{"from": "human", "value": "Please explain transformers in detail."},
                                           {"from": "gpt", "value": reply}]}
    out = Cleaner(CleanConfig(blocked_words=())).clean(sample, 1)
    assert out.sample is None and out.reason == "error_page", out


def test_a_system_turn_after_a_dropped_gpt_turn_is_rejected_not_kept():
    """Regression (hypothesis): [gpt, system] used to become a kept, system-only sample."""
    obj = {"id": "x", "conversations": [{"from": "gpt", "value": ""}, {"from": "system", "value": "0" * 16}]}
    out = Cleaner(CleanConfig()).clean(obj, 1)
    assert out.sample is None and out.reason == "roles_not_alternating"
