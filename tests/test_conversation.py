"""Conversation templates: golden prompts, HF chat_template parity, masks, resolution."""

import json

import pytest

from conftest import run_cli
from vicuna.conversation import (
    IGNORE_INDEX, TEMPLATES, JinjaTemplate, TemplateError, UntrainableTemplate, assistant_label_texts, get_template,
    render_prompt, render_training, resolve_template, stop_token_ids, tokenize_conversation,
)

VS = ("A chat between a curious user and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VS0 = VS.replace("user", "human")
AS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
H = "<|start_header_id|>{}<|end_header_id|>\n\n".format

C1 = [{"role": "user", "content": "Hi"}]
C2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"}]
C3 = [{"role": "user", "content": c} if i % 2 == 0 else {"role": "assistant", "content": c}
      for i, c in enumerate("ABCDE")]

GOLDEN = {
    "vicuna_v1.1": [
        f"<s>{VS} USER: Hi ASSISTANT:",
        "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Name? ASSISTANT:",
        f"<s>{VS} USER: A ASSISTANT: B</s>USER: C ASSISTANT: D</s>USER: E ASSISTANT:",
    ],
    "vicuna_v0": [
        f"<s>{VS0}\n### Human: Hi\n### Assistant:",
        "<s>Be brief.\n### Human: Hi\n### Assistant: Hello!</s>\n### Human: Name?\n### Assistant:",
        f"<s>{VS0}\n### Human: A\n### Assistant: B</s>\n### Human: C\n### Assistant: D</s>\n### Human: E\n### Assistant:",
    ],
    "llama-2": [
        "<s>[INST] Hi [/INST]",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Name? [/INST]",
        "<s>[INST] A [/INST] B </s><s>[INST] C [/INST] D </s><s>[INST] E [/INST]",
    ],
    "llama-3": [
        "<s>" + H("user") + "Hi<|eot_id|>" + H("assistant"),
        "<s>" + H("system") + "Be brief.<|eot_id|>" + H("user") + "Hi<|eot_id|>" + H("assistant") + "Hello!<|eot_id|>"
        + H("user") + "Name?<|eot_id|>" + H("assistant"),
        "<s>" + H("user") + "A<|eot_id|>" + H("assistant") + "B<|eot_id|>" + H("user") + "C<|eot_id|>"
        + H("assistant") + "D<|eot_id|>" + H("user") + "E<|eot_id|>" + H("assistant"),
    ],
    "chatml": [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n"
        "<|im_start|>assistant\nD<|im_end|>\n<|im_start|>user\nE<|im_end|>\n<|im_start|>assistant\n",
    ],
    "mistral": [
        "<s>[INST] Hi [/INST]",
        "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Name? [/INST]",
        "<s>[INST] A [/INST] B</s>[INST] C [/INST] D</s>[INST] E [/INST]",
    ],
    "alpaca": [
        f"<s>{AS}\n\n### Instruction:\nHi\n\n### Response:\n",
        "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nName?\n\n### Response:\n",
        f"<s>{AS}\n\n### Instruction:\nA\n\n### Response:\nB</s>\n\n### Instruction:\nC\n\n### Response:\nD</s>\n\n"
        "### Instruction:\nE\n\n### Response:\n",
    ],
    "gemma": [
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName?<end_of_turn>\n<start_of_turn>model\n",
        "<s><start_of_turn>user\nA<end_of_turn>\n<start_of_turn>model\nB<end_of_turn>\n<start_of_turn>user\n"
        "C<end_of_turn>\n<start_of_turn>model\nD<end_of_turn>\n<start_of_turn>user\nE<end_of_turn>\n"
        "<start_of_turn>model\n",
    ],
    "zephyr": [
        "<|user|>\nHi</s>\n<|assistant|>\n",
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nName?</s>\n<|assistant|>\n",
        "<|user|>\nA</s>\n<|assistant|>\nB</s>\n<|user|>\nC</s>\n<|assistant|>\nD</s>\n<|user|>\nE</s>\n<|assistant|>\n",
    ],
}


def test_registry_has_required_templates():
    assert set(GOLDEN) <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_prompts(name):
    t = get_template(name)
    for conv, expected in zip((C1, C2, C3), GOLDEN[name]):
        assert t.render(conv, bos_token="<s>", eos_token="</s>") == expected


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_hf_chat_template_is_byte_identical(name, any_tokenizer):
    tok = any_tokenizer
    t = get_template(name)
    tok.chat_template = t.to_jinja()
    try:
        for conv in (C1, C2, C3, C2[1:], C3[:3] + [{"role": "assistant", "content": "x"}]):
            gen = conv[-1]["role"] == "user"
            ours = t.render(conv, add_generation_prompt=gen, bos_token=tok.bos_token, eos_token=tok.eos_token)
            theirs = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert theirs == ours
        # and the saved template maps back to our table row
        assert resolve_template(tokenizer=tok) is t
    finally:
        tok.chat_template = None


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_label_spans_are_exactly_assistant_outputs(name, any_tokenizer):
    tok = any_tokenizer
    t = get_template(name)
    answers = ["I am fine, 你好 😀", "def add(a, b): return a + b", "Paris."]
    msgs = [{"role": "system", "content": "Be nice."}]
    for i, a in enumerate(answers):
        msgs += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": a}]
    tc = tokenize_conversation(tok, t, msgs)
    end = t.stop_token_strings(tok.eos_token)[-1]
    decoded = assistant_label_texts(tok, tc)
    assert [d.strip() for d in decoded] == [f"{a}{end}" if t.assistant_end != " {eos}" else f"{a} {end}"
                                            for a in answers]
    # the ids are one tokenization of the rendered text, and everything else is masked
    text, _ = t.render_for_training(msgs, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert tc.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    trained = [x for x in tc.labels if x != IGNORE_INDEX]
    assert tc.labels[0] == IGNORE_INDEX and trained[-1] == tok.convert_tokens_to_ids(end)
    # the prompt before the first answer tokenizes the same as the generation prompt does
    prompt_ids = tok(render_prompt(t, msgs[:2], tok), add_special_tokens=False)["input_ids"]
    first_trained = next(i for i, x in enumerate(tc.labels) if x != IGNORE_INDEX)
    assert tc.input_ids[:first_trained] == prompt_ids


def test_truncation_is_reported(bpe_tokenizer):
    msgs = [{"role": "user", "content": "hello " * 50}, {"role": "assistant", "content": "fine " * 50}]
    tc = tokenize_conversation(bpe_tokenizer, get_template("vicuna_v1.1"), msgs, max_length=16)
    assert tc.truncated and len(tc.input_ids) == 16 == len(tc.labels)


def test_stop_token_ids(bpe_tokenizer):
    assert stop_token_ids(get_template("vicuna_v1.1"), bpe_tokenizer) == [bpe_tokenizer.eos_token_id]
    ids = stop_token_ids(get_template("llama-3"), bpe_tokenizer)
    assert ids == [bpe_tokenizer.eos_token_id, bpe_tokenizer.convert_tokens_to_ids("<|eot_id|>")]


@pytest.mark.parametrize("bad, msg", [
    ([], "no user message"),
    ([{"role": "assistant", "content": "x"}], "expected a user message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "robot", "content": "a"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed first"),
    ([{"role": "user", "content": 5}], "must be a string"),
])
def test_bad_conversations_raise_clear_errors(bad, msg):
    with pytest.raises(TemplateError, match=msg):
        get_template("vicuna_v1.1").render(bad, eos_token="</s>")


def test_content_parts_and_braces_are_literal():
    t = get_template("chatml")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a {content} "}, {"type": "text", "text": "{eos}"}]}]
    assert t.render(msgs) == "<|im_start|>user\na {content} {eos}<|im_end|>\n<|im_start|>assistant\n"


def test_resolution_order(bpe_tokenizer):
    tok = bpe_tokenizer
    assert tok.chat_template is None
    assert resolve_template("chatml", tok, "vicuna-7b").name == "chatml"  # explicit wins
    assert resolve_template(None, tok, "lmsys/vicuna-7b-v1.5").name == "vicuna_v1.1"
    assert resolve_template(None, tok, "vicuna-7b-delta-v0").name == "vicuna_v0"
    assert resolve_template(None, tok, "meta-llama/Llama-2-7b-chat-hf").name == "llama-2"
    assert resolve_template(None, tok, "Meta-Llama-3-8B-Instruct").name == "llama-3"
    assert resolve_template(None, tok, "Qwen2.5-0.5B-Instruct").name == "chatml"
    assert resolve_template(None, tok, "gemma-3-270m").name == "gemma"  # the base model ships no chat_template
    with pytest.raises(TemplateError, match="Pass --conv-template, one of: vicuna_v0, vicuna_v1.1"):
        resolve_template(None, tok, "my-mystery-model")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    try:
        t = resolve_template(None, tok, "vicuna-7b")  # the tokenizer's own template beats the name
        assert isinstance(t, JinjaTemplate)
        assert render_prompt(t, C2, tok) == "[system] Be brief.\n[user] Hi\n[assistant] Hello!\n[user] Name?\n"
        with pytest.raises(UntrainableTemplate, match="closes the turn with no special token.*--conv-template"):
            render_training(t, C3[:2], tok)  # nothing marks the end of a turn: the model would never stop
    finally:
        tok.chat_template = None


def test_cli_list_show_render(tmp_path):
    out = run_cli("templates", "list", check=True).stdout
    assert all(name in out for name in GOLDEN)
    shown = json.loads(run_cli("templates", "show", "llama-3", check=True).stdout)
    assert shown["stop_tokens"] == ["<eos>", "<|eot_id|>"] and "chat_template" in shown
    p = tmp_path / "m.json"
    p.write_text(json.dumps(C2))
    assert run_cli("templates", "render", "vicuna_v1.1", "--messages", p, check=True).stdout == GOLDEN["vicuna_v1.1"][1] + "\n"
    assert run_cli("templates", "render", "mistral", input=json.dumps(C1), check=True).stdout == "<s>[INST] Hi [/INST]\n"
    bad = run_cli("templates", "render", "vicuna_v1.1", input='[{"role": "bot"}]')
    assert bad.returncode == 2 and "unknown role" in bad.stderr
    nope = run_cli("templates", "show", "nope")
    assert nope.returncode == 2 and "available: vicuna_v0, vicuna_v1.1" in nope.stderr
