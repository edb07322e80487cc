"""Build small LLaMA-architecture models and tokenizers from scratch, offline.

No weights can be downloaded here, so tests, benchmarks and the demo recipe
make their own: a byte-level BPE tokenizer (GPT-2 style) or a SentencePiece
LLaMA tokenizer trained on given text, and a randomly initialised LLaMA.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from .conversation import template_special_tokens

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def special_tokens() -> list[str]:
    return [BOS, EOS, UNK, PAD, *template_special_tokens()]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with BOS/EOS/PAD and every template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=template_special_tokens(), clean_up_tokenization_spaces=False,
    )


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A LLaMA-style SentencePiece (BPE, byte fallback) tokenizer, loaded as ``LlamaTokenizer``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(t.replace("\n", " ") + "\n")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(d, "sp"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
            user_defined_symbols=template_special_tokens(), minloglevel=2, hard_vocab_limit=False,
        )
        os.replace(os.path.join(d, "sp.model"), os.path.join(d, "tokenizer.model"))
        # from_pretrained converts the .model file the way real LLaMA checkpoints are loaded
        tok = LlamaTokenizer.from_pretrained(d, legacy=False)
    tok.add_special_tokens({"pad_token": PAD, "additional_special_tokens": template_special_tokens()})
    return tok


def make_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size: int | None = None, max_position_embeddings: int = 512, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized to ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model, tokenizer, path: str | Path, template_name: str | None = "vicuna_v1.1") -> Path:
    """Save a model dir that ``vicuna.model.load_model`` and other tools understand."""
    from .conversation import get_template

    path = Path(path)
    if template_name:
        tokenizer.chat_template = get_template(template_name).to_jinja()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
