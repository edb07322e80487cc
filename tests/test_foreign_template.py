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
    conv((S, ""), (U, "an empty system message replaces the template's default"), (A, "ok")),
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
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tc.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    # the default system prompt is in the text only when the chat has no system message (an empty one
    # replaces it, as in our templates), and never trained
    assert ("named SmolLM" in text) != (messages[0]["role"] == S)
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


NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}" + CHATML_TURN + "{% endfor %}" + GEN_PROMPT)


def test_dataset_skips_what_the_template_refuses_and_stops_on_an_untrainable_template(bpe_tokenizer, with_template):
    from vicuna.errors import TrainInputError
    from vicuna.train.dataset import DataStats, tokenize_dataset

    # a template's own raise_exception (Gemma refuses system messages): that conversation is skipped, counted
    stats = DataStats()
    samples = tokenize_dataset(CONVS, bpe_tokenizer, with_template(bpe_tokenizer, NO_SYSTEM), 512, stats=stats)
    assert len(samples) == 2 and stats.skipped == {
        "template: the tokenizer's chat_template refused this conversation: System role not supported": 2}
    # a template whose spans cannot be found stops everything, naming the conversation and the reason
    with pytest.raises(TrainInputError, match=r"train.json: conversation 0: the chat_template is not prefix-stable"):
        tokenize_dataset(CONVS, bpe_tokenizer, with_template(bpe_tokenizer, COUNTING), 512, source="train.json")


# ----------------------------------------------------------------------------- train, split


def write_sharegpt(path, convs):
    role = {S: "system", U: "human", A: "gpt"}
    path.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": role[m["role"]], "value": m["content"]}
                                                                   for m in c if m["content"]]}
                                for i, c in enumerate(convs)]))
    return path


def with_chat_template(model_dir, path, source):
    """A copy of a model dir whose tokenizer has ``source`` as its chat_template."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = source
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(path, save_jinja_files=False)
    return path


@pytest.fixture
def foreign_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat_template that is not one of ours."""
    return with_chat_template(tiny_model_dir, tmp_path / "foreign", FOREIGN)


@pytest.mark.parametrize("extra", [{}, {"lora": True, "lora_r": 4}], ids=["packed", "packed-lora"])
def test_training_in_a_foreign_template_keeps_it(foreign_model_dir, tmp_path, extra):
    from transformers import AutoTokenizer

    from vicuna.train.config import make_config
    from vicuna.train.trainer import train

    data = write_sharegpt(tmp_path / "train.json", CONVS * 4)
    cfg = make_config(None, {"model_path": str(foreign_model_dir), "data_path": str(data),
                             "output_dir": str(tmp_path / "out"), "max_length": 256, "max_steps": 2,
                             "per_device_batch_size": 2, "learning_rate": 1e-3, **extra})
    assert cfg.packing and cfg.conv_template is None
    out = train(cfg)
    assert AutoTokenizer.from_pretrained(out).chat_template == FOREIGN  # the model keeps its own template
    meta = json.loads((out / "vicuna.json").read_text())
    assert meta["conv_template"] == "tokenizer chat_template" and meta["data"]["kept"] == 16
    assert meta["train"]["steps"] == 2 and meta["lora"] is bool(extra)
    assert (out / ("adapter_config.json" if extra else "model.safetensors")).is_file()


@pytest.mark.real_model
def test_split_with_a_foreign_template_measures_as_training_does(smollm2_tokenizer, real_model_dir, tmp_path):
    from vicuna.data.sharegpt import to_messages
    from vicuna.data.split import split_file

    convs = [CONVS[1]] * 3 + [CONVS[2]]
    inp, out = write_sharegpt(tmp_path / "in.json", convs), tmp_path / "out.jsonl"
    template = resolve_template(tokenizer=smollm2_tokenizer)

    def length(messages):
        return len(tokenize_conversation(smollm2_tokenizer, template, messages).input_ids)

    limit = length(CONVS[1]) - 1  # the longest conversation must be cut
    # no --conv-template: the tokenizer's own chat_template, as `vicuna train` picks it
    report = split_file(str(inp), str(out), tokenizer_path=str(real_model_dir), max_length=limit)
    assert report.template == "tokenizer chat_template" and report.split_samples >= 3
    chunks = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(length(to_messages(c["conversations"])) <= limit for c in chunks)  # measured as training sees it
    body = [t for c in chunks for t in c["conversations"] if t["from"] != "system"]
    assert len(body) == sum(len(c) - (c[0]["role"] == S) for c in convs)  # nothing lost


def test_cli_refuses_a_non_prefix_stable_template_with_the_reason(tiny_model_dir, tmp_path):
    model = with_chat_template(tiny_model_dir, tmp_path / "counting", COUNTING)
    data = write_sharegpt(tmp_path / "train.json", CONVS)
    why = "the chat_template is not prefix-stable: message 1 (assistant): the generation prompt"
    p = run_cli("train", "--model-path", model, "--data-path", data, "--output-dir", tmp_path / "out",
                "--max-length", 128, "--max-steps", 1)
    assert p.returncode == 2 and why in p.stderr and "--conv-template" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "vicuna.json").exists()
    p = run_cli("data", "split", data, "-o", tmp_path / "split.json", "--tokenizer", model, "--max-length", 128)
    assert p.returncode == 2 and why in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "split.json").exists()
