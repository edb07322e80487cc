"""Shared fixtures: tiny tokenizers and models built offline in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# CI explores the same examples every run (a red CI is then reproducible); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; a worktree under /work/wt/NAME finds it one level higher.
SHARED_DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if p.is_dir()),
                   ROOT.parent / "shared" / "data")
ARTIFACTS = ROOT / "tests" / "artifacts"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "Hello! How can I help you today? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Write a Python function that adds two numbers: def add(a, b): return a + b",
    "USER: ASSISTANT: ### Human: ### Assistant: ### Instruction: ### Response: [INST] [/INST]",
    "A chat between a curious user and an artificial intelligence assistant.",
    "你好，世界！我是一个聊天助手。 こんにちは 😀 🎉 café naïve",
    "1 2 3 4 5 6 7 8 9 10 numbers, punctuation; quotes \"like\" 'this' (and) [that] {too}",
] * 20


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, input: str | None = None, timeout: float = 300, check: bool = False, **kw):
    """Run `python -m vicuna ARGS` as a user would; returns CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "vicuna", *map(str, args)], input=input, capture_output=True, text=True,
        timeout=timeout, env=cli_env(), **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vicuna {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def bradley_terry_battles(truth: dict[str, float], n: int, seed: int, tie_rate: float = 0.0
                          ) -> list[tuple[str, str, str]]:
    """``n`` (model_a, model_b, winner) battles whose expected score follows the Bradley-Terry model with
    ``truth`` ratings: what the rating maths must recover, and the votes the arena's leaderboard is fed.

    Ties are drawn with probability ``tie_rate * 2 * min(p, 1 - p)`` and taken half out of wins, half out of
    losses, so a's expected score (win 1, tie 0.5) stays exactly p.
    """
    rng = np.random.default_rng(seed)
    names = list(truth)
    battles = []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        p = 1.0 / (1.0 + 10 ** ((truth[b] - truth[a]) / 400))
        p_tie = tie_rate * 2 * min(p, 1 - p)
        u = rng.random()
        if u < p - p_tie / 2:
            winner = "model_a"
        elif u < p + p_tie / 2:
            winner = "tie" if rng.random() < 0.5 else "tie (bothbad)"
        else:
            winner = "model_b"
        battles.append((a, b, winner))
    return battles


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from vicuna.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(scope="session")
def sp_tokenizer():
    from vicuna.tiny import train_sentencepiece_tokenizer

    return train_sentencepiece_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(params=["bpe", "sentencepiece"])
def any_tokenizer(request, bpe_tokenizer, sp_tokenizer):
    return bpe_tokenizer if request.param == "bpe" else sp_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A saved random tiny LLaMA (byte-level BPE, vicuna_v1.1 chat template)."""
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("tiny-llama")
    return save_model(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, path)


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory, sp_tokenizer):
    """A saved random tiny LLaMA with a SentencePiece tokenizer (like real Vicuna)."""
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("tiny-llama-sp")
    return save_model(make_tiny_llama(sp_tokenizer, seed=1), sp_tokenizer, path)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default real model (SmolLM2-135M-Instruct, float32 HF folder), imported once per machine.

    `make install` imports it; when run outside make the first use imports it (about a minute).
    """
    from vicuna.weights.gguf import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The real model loaded once per test session (tests must not change its weights)."""
    from vicuna.model import load_model

    return load_model(real_model_dir, device="cpu")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
