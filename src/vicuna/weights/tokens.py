"""Check and repair special tokens, so a model stops where it should.

After applying delta weights users met blank BOS/EOS in the tokenizer files,
a generation_config whose EOS is not the token the model was trained to end
with (it then never stops), and 32001-token tokenizers on 32000-row
embeddings.  The tokenizer's own special-token strings are the reference; the
config and generation_config follow them; the stop ids come from the
conversation template (``vicuna.conversation.stop_token_ids``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..conversation import TEMPLATES, Template, TemplateError, resolve_template, stop_token_ids
from ..errors import CheckpointError, UsageError
from ..files import replace_dir, write_json
from .checkpoint import Checkpoint, ShardWriter, copy_other_files, embedding_rows, resolve_shard_size

# When a tokenizer's token string is blank, these are tried after the config's id.
CONVENTIONAL = {"bos": ("<s>",), "eos": ("</s>",), "unk": ("<unk>",)}


@dataclass
class TokenReport:
    changes: list[str] = field(default_factory=list)  # what is (or was) wrong and its repair
    problems: list[str] = field(default_factory=list)  # wrong, but not repairable here
    template: str | None = None
    written: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.changes and not self.problems


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def fix_tokens(model_dir, conv_template: str | None = None, check_only: bool = False,
               resize_embeddings: bool = False) -> TokenReport:
    """Find (and unless ``check_only``, repair) special-token inconsistencies in ``model_dir``."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    config = _read_json(path / "config.json")
    if config is None:
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    gen = _read_json(path / "generation_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raise many types; the message is what matters
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
    r = TokenReport()
    tok_changed = False

    # 1. special-token strings in the tokenizer
    vocab = tok.get_vocab()
    for role in ("bos", "eos", "unk"):
        s = getattr(tok, f"{role}_token")
        if s and s in vocab:
            continue
        cand = None
        cid = config.get(f"{role}_token_id")
        if isinstance(cid, int) and 0 <= cid < len(tok):
            cand = tok.convert_ids_to_tokens(cid)
        cand = cand or next((c for c in CONVENTIONAL[role] if c in vocab), None)
        if cand:
            r.changes.append(f"tokenizer: {role}_token {s!r} -> {cand!r} (id {vocab[cand]})")
            setattr(tok, f"{role}_token", cand)
            tok_changed = True
        elif role != "unk" or s:  # byte-level BPE tokenizers rightly have no unk token
            state = "blank" if not s else f"{s!r}, which is not in the vocabulary"
            r.problems.append(f"tokenizer: {role}_token is {state}, and no candidate was found; "
                              f"set {role}_token in tokenizer_config.json")

    # 2. chat template
    try:
        template = resolve_template(conv_template, tok, model_name=path.resolve().name,
                                    model_type=str(config.get("model_type", "")))
    except TemplateError as e:
        if conv_template:
            raise UsageError(str(e)) from None
        template = None
        r.problems.append(f"chat template: {e}")
    if template is not None:
        r.template = template.name
    if isinstance(template, Template):
        want = template.to_jinja()
        if tok.chat_template != want:
            state = "missing" if not tok.chat_template else "a different template"
            r.changes.append(f"tokenizer: chat_template is {state} -> {template.name}")
            tok.chat_template = want
            tok_changed = True

    # 3. vocabulary vs embedding rows
    ck = Checkpoint(path)
    emb = embedding_rows(ck)
    ids = {role: getattr(tok, f"{role}_token_id") for role in ("bos", "eos", "pad")}
    grow: list[str] = []
    if emb is not None:
        name, rows = emb
        if len(tok) > rows:
            extra = tok.convert_ids_to_tokens(list(range(rows, min(len(tok), rows + 3))))
            if resize_embeddings:
                grow = _rows_to_grow(ck, name)
                r.changes.append(f"weights: {', '.join(grow)} {rows} -> {len(tok)} rows for "
                                 f"{', '.join(map(repr, extra))}{'...' if len(tok) - rows > 3 else ''} "
                                 "(new rows = mean of the existing ones)")
                rows = len(tok)
            else:
                r.problems.append(
                    f"the tokenizer has {len(tok)} tokens but {name} has {rows} rows: ids {rows}..{len(tok) - 1} "
                    f"(e.g. {', '.join(map(repr, extra))}) have no embedding. Use the tokenizer saved with these "
                    "weights, or add --resize-embeddings to give the added tokens rows (they need training)"
                )
        if config.get("vocab_size") != rows:
            r.changes.append(f"config.json: vocab_size {config.get('vocab_size')} -> {rows} (rows of {name})")
            config["vocab_size"] = rows
        for role, i in ids.items():
            if i is not None and i >= rows:
                r.problems.append(f"tokenizer: {role} token id {i} has no embedding row ({name} has {rows})")

    # 4. config.json ids follow the tokenizer
    cfg_changed = any(c.startswith("config.json") for c in r.changes)
    for role, i in ids.items():
        cur = config.get(f"{role}_token_id")
        if i is None or cur == i or (isinstance(cur, list) and role == "eos" and i in cur):
            continue
        r.changes.append(f"config.json: {role}_token_id {cur} -> {i} ({getattr(tok, f'{role}_token')!r})")
        config[f"{role}_token_id"] = i
        cfg_changed = True

    # 5. generation_config.json: EOS ids are where generation stops
    stops = stop_token_ids(template, tok) if template is not None else [i for i in [ids["eos"]] if i is not None]
    gen_changed = False
    if gen is None:
        gen = {"bos_token_id": ids["bos"], "eos_token_id": stops[0] if len(stops) == 1 else stops}
        if ids["pad"] is not None:
            gen["pad_token_id"] = ids["pad"]
        r.changes.append(f"generation_config.json: missing -> created with eos_token_id {gen['eos_token_id']}")
        gen_changed = True
    else:
        cur = gen.get("eos_token_id")
        cur_list = cur if isinstance(cur, list) else [] if cur is None else [cur]
        # keep extra ids that are some template's end-of-turn token (a model may know more stops)
        known = {t for tpl in TEMPLATES.values() for t in tpl.stop_tokens}
        keep = [i for i in cur_list if i not in stops and isinstance(i, int) and 0 <= i < len(tok)
                and tok.convert_ids_to_tokens(i) in known]
        want = stops + keep
        if set(cur_list) != set(want) and want:
            new = want[0] if len(want) == 1 else want
            names = ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in want)
            r.changes.append(f"generation_config.json: eos_token_id {cur} -> {new} ({names})")
            gen["eos_token_id"] = new
            gen_changed = True
        for role in ("bos", "pad"):
            if ids[role] is not None and f"{role}_token_id" in gen and gen[f"{role}_token_id"] != ids[role]:
                r.changes.append(f"generation_config.json: {role}_token_id {gen[f'{role}_token_id']} -> {ids[role]}")
                gen[f"{role}_token_id"] = ids[role]
                gen_changed = True

    if check_only or not r.changes:
        return r
    if grow:  # first: it replaces the folder, copying the other files as they are now
        _grow_rows(ck, grow, len(tok))
        r.written.append("weights")
    if tok_changed:
        r.written += _save_tokenizer(tok, path)
    if cfg_changed:
        write_json(path / "config.json", config)
        r.written.append("config.json")
    if gen_changed:
        write_json(path / "generation_config.json", gen)
        r.written.append("generation_config.json")
    return r


def _save_tokenizer(tok, path: Path) -> list[str]:
    """Save next to the model, then move each file in with a rename (no half-written file)."""
    tmp = Path(tempfile.mkdtemp(prefix=".fix-tokens-", dir=path))
    try:
        tok.save_pretrained(tmp)
        names = sorted(f.name for f in tmp.iterdir() if f.is_file())
        for name in names:
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, path / name)
        cfg = _read_json(path / "tokenizer_config.json") or {}
        if "chat_template" in cfg and (path / "chat_template.jinja").exists():
            # an older copy in tokenizer_config.json would shadow the new .jinja file in some readers
            del cfg["chat_template"]
            write_json(path / "tokenizer_config.json", cfg)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows_to_grow(ck: Checkpoint, emb_name: str) -> list[str]:
    """The input embedding and an untied output layer of the same shape."""
    shape = ck.tensors[emb_name].shape
    out = [n for n, i in ck.tensors.items()
           if n != emb_name and i.shape == shape and re.search(r"(^|\.)(lm_head|embed_out|output)\.weight$", n)]
    return [emb_name, *out]


def _grow_rows(ck: Checkpoint, names: list[str], rows: int) -> None:
    """Rewrite the folder's weights with ``names`` grown to ``rows`` rows, then swap folders."""
    path = ck.path
    layout = [(n, (rows, *i.shape[1:]) if n in names else i.shape, i.dtype) for n, i in ck.tensors.items()]
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with ShardWriter(tmp, layout, resolve_shard_size("auto", ck)) as writer:
            for n in ck.names():
                t = ck.get(n)
                if n in names:
                    grown = t.new_empty((rows, *t.shape[1:]))
                    grown[: t.shape[0]] = t
                    # the mean row keeps new tokens' logits ordinary until they are trained
                    grown[t.shape[0]:] = t.float().mean(0).to(t.dtype)
                    t = grown
                writer.add(n, t)
            writer.close()
        copy_other_files(path, tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
