"""Training in a tokenizer's own chat_template: assistant spans found from the template itself.

Fast: tiny tokenizers and models, plus SmolLM2's shipped tokenizer (no weights loaded).
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from vicuna.conversation import (
    IGNORE_INDEX, TEMPLATES, JinjaTemplate, UntrainableTemplate, assistant_label_texts, render_prompt,
    render_training, resolve_template, tokenize_conversation,
)
from vicuna.conversation import _MARKER_RE

S, U, A = "system", "user", "assistant"


def conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CONVS = [
    conv((U, "Hi"), (A, "Hello!")),
    conv((S, "Be nice."), (U, "question 你好?"), (A, "I am fine, 你好 😀"), (U, "code?"),
         (A, "def add(a, b): return a + b"), (U, "and?"), (A, "Paris.")),
    conv((U, "a"), (A, " leading space, trailing newline\n"), (U, "b"), (A, "\nstarts with a newline")),
    conv((S, ""), (U, "empty system: the template's default applies"), (A, "ok")),
]

# A SmolLM2-style ChatML template (default system prompt injected when the chat has none), not one of ours.
FOREIGN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TURN = "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
GEN_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
FOREIGN_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant"  # CONVS[0] up to its answer's "\n"
# not prefix-stable: the system header counts the messages
COUNTING = ("{{ '<|im_start|>system\nturns: ' ~ (messages | length) ~ '<|im_end|>\n' }}"
            "{% for m in messages %}" + CHATML_TURN + "{% endfor %}" + GEN_PROMPT)
USERS_COUNTING = ("{{ '<|im_start|>system\nturns: ' ~ (messages | selectattr('role', 'equalto', 'user') | list "
                  "| length) ~ '<|im_end|>\n' }}{% for m in messages %}" + CHATML_TURN + "{% endfor %}" + GEN_PROMPT)
# not prefix-stable: the last assistant turn is rendered differently from earlier ones
LAST_DIFFERENT = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}"
                  "{{ '<|im_start|>assistant final\n' + m['content'] + '<|im_end|>\n' }}"
                  "{% else %}" + CHATML_TURN + "{% endif %}{% endfor %}" + GEN_PROMPT)
# {% generation %} blocks: their spans are used as they are (here they include the "\n")
GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
              "{% else %}" + CHATML_TURN + "{% endif %}{% endfor %}" + GEN_PROMPT)
GENERATION_NOWHERE = ("{% for m in messages %}" + CHATML_TURN + "{% if false %}{% generation %}{% endgeneration %}"
                      "{% endif %}{% endfor %}" + GEN_PROMPT)


@pytest.fixture
def with_template():
    """Set a chat_template on a (session-wide) tokenizer for one test, then restore it."""
    restore = []

    def use(tok, source):
        restore.append((tok, tok.chat_template))
        tok.chat_template = source
        template = resolve_template(tokenizer=tok)
        assert isinstance(template, JinjaTemplate)  # treated as foreign
        return template

    yield use
    for tok, old in reversed(restore):
        tok.chat_template = old


def foreign_copy(template) -> str:
    """One of our templates as a jinja chat_template without the marker that maps it back to our table."""
    source = _MARKER_RE.sub("", template.to_jinja())
    assert source != template.to_jinja()
    return source


# ----------------------------------------------------------------------------- the real template


@pytest.fixture(scope="session")
def real_model_dir():  # TODO(templates): conftest's session fixture replaces this once it lands on main
    from pathlib import Path

    path = Path("/work/models/SmolLM2-135M-Instruct")
    if not path.is_dir():
        pytest.skip("SmolLM2-135M-Instruct is not imported here")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.mark.real_model
@pytest.mark.parametrize("messages", CONVS, ids=["one-turn", "system-unicode", "whitespace", "empty-system"])
def test_smollm2_template_trains_exactly_the_assistant_texts(smollm2_tokenizer, messages):
    tok = smollm2_tokenizer
    template = resolve_template(tokenizer=tok)
    assert isinstance(template, JinjaTemplate) and "SmolLM" in template.source
    tc = tokenize_conversation(tok, template, messages)
    # decoded targets: each assistant text plus <|im_end|>, and nothing else (not the "\n" after it)
    answers = [m["content"] for m in messages if m["role"] == A]
    assert assistant_label_texts(tok, tc) == [a + "<|im_end|>" for a in answers]
    # one tokenization of exactly what apply_chat_template renders
    text = tok.apply_chat_template([m for m in messages if m["content"] or m["role"] != S], tokenize=False)
    assert tc.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    # the default system prompt is in the text only when the chat has none, and never trained
    has_system = bool(messages[0]["role"] == S and messages[0]["content"])
    assert ("named SmolLM" in text) != has_system
    # what precedes each answer tokenizes as the generation prompt does at serving time
    first = next(i for i, x in enumerate(tc.labels) if x != IGNORE_INDEX)
    upto = messages[: next(i for i, m in enumerate(messages) if m["role"] == A)]
    assert tc.input_ids[:first] == tok(render_prompt(template, upto, tok), add_special_tokens=False)["input_ids"]
    # the token after every trained <|im_end|> is the template's "\n", untrained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [k for k, x in enumerate(tc.labels) if x == im_end]
    assert len(ends) == len(answers) and all(tc.labels[k + 1] == IGNORE_INDEX for k in ends)
    assert tok.decode(tc.input_ids[ends[-1] + 1:]) == "\n"


# ----------------------------------------------------------------------------- our templates, as foreign


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_our_templates_exported_to_jinja_give_the_native_masks(name, any_tokenizer, with_template):
    native = TEMPLATES[name]
    foreign = with_template(any_tokenizer, foreign_copy(native))
    for messages in CONVS:
        ours = tokenize_conversation(any_tokenizer, native, messages)
        theirs = tokenize_conversation(any_tokenizer, foreign, messages)
        assert theirs.input_ids == ours.input_ids
        assert theirs.labels == ours.labels, assistant_label_texts(any_tokenizer, theirs)


# ----------------------------------------------------------------------------- refusals and generation blocks


HEADER = "<|im_start|>system\nturns: "


@pytest.mark.parametrize("source, messages, message", [
    # the prompt for the first answer says "turns: 1", the answered conversation "turns: 2"
    (COUNTING, CONVS[0], "message 1 (assistant): the generation prompt for it is not the start of its own rendering "
                         f"(they differ at character {len(HEADER)}: '1<|im_end|>"),
    (LAST_DIFFERENT, CONVS[0], "message 1 (assistant): the generation prompt for it is not the start of its own "
                               f"rendering (they differ at character {len(FOREIGN_PROMPT)}: '\\n' vs ' final\\n"),
    # counting only user turns keeps each answer's own render stable; the whole conversation then differs
    (USERS_COUNTING, CONVS[2], "message 1 (assistant): rendering the conversation up to it is not the start of the "
                               f"whole conversation's rendering (they differ at character {len(HEADER)}: '1<|im_end|>"),
], ids=["turn-count", "last-turn-different", "user-count"])
def test_non_prefix_stable_templates_are_refused_with_the_reason(bpe_tokenizer, with_template, source, messages,
                                                                 message):
    template = with_template(bpe_tokenizer, source)
    with pytest.raises(UntrainableTemplate) as err:
        tokenize_conversation(bpe_tokenizer, template, messages)
    assert str(err.value).startswith("the chat_template is not prefix-stable: " + message), str(err.value)
    assert str(err.value).endswith("pass --conv-template NAME (see `vicuna templates list`), "
                                   "or give the template {% generation %} blocks")


def test_generation_blocks_are_used_as_written(bpe_tokenizer, with_template):
    template = with_template(bpe_tokenizer, GENERATION)
    for messages in CONVS:
        tc = tokenize_conversation(bpe_tokenizer, template, messages)
        answers = [m["content"] for m in messages if m["role"] == A]
        assert assistant_label_texts(bpe_tokenizer, tc) == [a + "<|im_end|>\n" for a in answers]
    template = with_template(bpe_tokenizer, GENERATION_NOWHERE)
    with pytest.raises(UntrainableTemplate, match="generation %} blocks mark nothing"):
        render_training(template, CONVS[0], bpe_tokenizer)
