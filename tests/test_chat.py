"""The terminal chat, driven in a real pseudo-terminal (pexpect) and through a pipe."""

import json
import sys

import pexpect
import pytest

from conftest import cli_env, run_cli


@pytest.fixture(scope="module")
def long_talker(tmp_path_factory, bpe_tokenizer):
    """A random model with a long context: greedy answers run for thousands of tokens (for Ctrl+C)."""
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("long-talker")
    model = make_tiny_llama(bpe_tokenizer, hidden_size=128, num_layers=4, max_position_embeddings=8192)
    return save_model(model, bpe_tokenizer, path)


def spawn_chat(model_dir, *extra, tmp_path):
    env = cli_env() | {"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "COLUMNS": "120"}
    child = pexpect.spawn(
        sys.executable, ["-m", "vicuna", "chat", "--model-path", str(model_dir), "--temperature", "0",
                         "--history-file", str(tmp_path / "history"), *extra],
        env=env, encoding="utf-8", timeout=90, dimensions=(50, 120),
    )
    child.expect("Type /help for commands")
    child.expect("USER:")
    return child


def test_pty_chat_stream_reset_save_load(tiny_model_dir, tmp_path):
    child = spawn_chat(tiny_model_dir, "--max-new-tokens", "12", tmp_path=tmp_path)
    child.sendline("Hello there")
    child.expect("ASSISTANT:")
    child.expect("USER:")
    child.sendline("/stats")
    child.expect(r"1 exchanges, \d+/512 context tokens; last answer: \d+ tokens")
    child.sendline(f"/save {tmp_path / 'conv.json'}")
    child.expect("saved 2 messages")
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "Hello there" and saved["template"] == "vicuna_v1.1"
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.sendline("/stats")
    child.expect("0 exchanges")
    child.sendline(f"/load {tmp_path / 'conv.json'}")
    child.expect("loaded 2 messages")
    child.sendline("/stats")
    child.expect("1 exchanges")
    child.sendline("/undo")
    child.expect("dropped the last exchange")
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Hello there" in (tmp_path / "history").read_text()  # input history is kept


def test_ctrl_c_stops_the_answer_not_the_session(long_talker, tmp_path):
    child = spawn_chat(long_talker, "--max-new-tokens", "6000", "--plain", tmp_path=tmp_path)
    child.sendline("Tell me everything")
    child.expect("ASSISTANT: ")
    child.expect(r"\S{5}")  # some streamed text arrived
    child.sendintr()
    child.expect(r"\[stopped\]", timeout=30)
    child.expect("USER:")
    child.sendline("/stats")
    child.expect(r"last answer: (\d+) tokens")
    assert 0 < int(child.match.group(1)) < 6000  # cut short, partial answer kept
    child.expect("USER:")
    child.sendcontrol("d")  # Ctrl+D at the prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_answers_each_line_and_exits_zero(tiny_model_dir, tmp_path):
    proc = run_cli("chat", "--model-path", tiny_model_dir, "--temperature", "0", "--max-new-tokens", "8",
                   input="Hello\n/stats\nWho are you?\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip("\n").split("\n")) >= 2  # one answer per message line
    assert "1 exchanges" in proc.stderr
    assert "Chatting with" not in proc.stdout  # banners never pollute piped output
    # greedy answers are reproducible run to run
    again = run_cli("chat", "--model-path", tiny_model_dir, "--temperature", "0", "--max-new-tokens", "8",
                    input="Hello\n/stats\nWho are you?\n")
    assert again.stdout == proc.stdout


def test_debug_shows_prompt_and_speed(tiny_model_dir):
    proc = run_cli("chat", "--model-path", tiny_model_dir, "--max-new-tokens", "4", "--debug",
                   "--system", "Be terse.", input="Hi\n")
    assert proc.returncode == 0
    assert "<s>Be terse. USER: Hi ASSISTANT:" in proc.stderr and "tokens/s]" in proc.stderr


def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = run_cli("chat", "--model-path", tmp_path / "missing", input="Hi\n")
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_history_that_outgrows_the_context_drops_oldest_turns_with_a_notice(tiny_model_dir):
    long_line = "hello world " * 25  # ~200 tokens per message; the model's context is 512
    proc = run_cli("chat", "--model-path", tiny_model_dir, "--temperature", "0", "--max-new-tokens", "16",
                   input=f"{long_line}\n{long_line}\n{long_line}\n{long_line}\n/stats\n")
    assert proc.returncode == 0, proc.stderr
    assert "[context full: dropped the oldest exchange]" in proc.stderr
    assert "exchanges" in proc.stderr and "/512 context tokens" in proc.stderr
    too_long = run_cli("chat", "--model-path", tiny_model_dir, "--max-new-tokens", "16",
                       input="word " * 2000 + "\nHi\n")
    assert too_long.returncode == 0
    assert "error: this message is" in too_long.stderr and "context is 512" in too_long.stderr
    assert too_long.stdout.strip()  # the session went on and answered "Hi"
