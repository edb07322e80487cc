"""`vicuna data split`: cut long conversations at exchange boundaries to fit the context.

Lengths are measured the way training sees them: the chunk is rendered with the
conversation template (system prompt, role tags, BOS/EOS) and tokenized as one
text (:mod:`vicuna.conversation`), so "fits in 2048 tokens" is exact, not an
estimate from per-message token counts plus a guessed overhead (FastChat added
6 tokens per message and dropped the last exchange when it overflowed).

Packing is greedy: a chunk takes as many consecutive exchanges as fit.  Per-pair
token counts only *propose* where to cut; every emitted chunk is verified by a
full render + tokenize, and grown or shrunk until it is the longest prefix that
fits.  An exchange that is too long on its own is truncated (the answer is cut)
or dropped, per ``--long-pair``, and counted in the report either way.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conversation import (
    JinjaTemplate, Template, TemplateError, UntrainableTemplate, encode, render_training, resolve_template,
)
from ..errors import DataError
from ..files import RecordWriter, check_output, write_json
from .sharegpt import GPT, HUMAN, BadRecords, BadSample, iter_samples, to_messages, trim_turns

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (or a hub id when online)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path}: {e}") from None


def load_template(name: str | None, tokenizer, tokenizer_path: str = "") -> Template | JinjaTemplate:
    """The template by name; ``None``/``"auto"`` picks it as `vicuna train` does: the tokenizer's own
    chat_template (ours or foreign), else a match on the tokenizer's directory name."""
    try:
        return resolve_template(None if name in (None, "auto") else name, tokenizer=tokenizer,
                                model_name=Path(tokenizer_path).name if tokenizer_path else "")
    except TemplateError as e:
        raise DataError(str(e)) from None


@dataclass
class SplitReport:
    input: str
    output: str
    max_length: int
    template: str
    samples: int = 0
    chunks: int = 0
    split_samples: int = 0  # samples cut into two or more chunks
    events: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)

    def note(self, event: str, sid: str) -> None:
        self.events[event] += 1
        ex = self.examples.setdefault(event, [])
        if len(ex) < 5:
            ex.append(sid)


class Splitter:
    def __init__(self, tokenizer, template: Template | JinjaTemplate, max_length: int, long_pair: str = "drop"):
        if max_length < 8:
            raise DataError(f"--max-length {max_length} is too small")
        if long_pair not in ("drop", "truncate"):
            raise DataError(f"--long-pair must be 'drop' or 'truncate', not {long_pair!r}")
        self.tok, self.template, self.max_length, self.long_pair = tokenizer, template, max_length, long_pair

    def length(self, system: list[dict], pairs: list[tuple[dict, dict]]) -> int:
        """Tokens of ``system + pairs`` rendered for training (BOS and EOS included)."""
        turns = list(system) + [t for p in pairs for t in p]
        return len(encode(self.tok, render_training(self.template, to_messages(turns), self.tok)[0]))

    def split(self, sample: dict, report: SplitReport) -> list[dict]:
        """Chunks of ``sample`` (ids ``{id}_{k}``); every one fits in ``max_length`` tokens."""
        sid = sample["id"]
        system, body, trimmed = trim_turns(sample["conversations"])
        for event in trimmed:
            report.note(event, sid)
        pairs = [(body[i], body[i + 1]) for i in range(0, len(body), 2)]
        if not pairs:
            report.note("no_exchange", sid)
            return []
        try:
            singles = [self.length(system, [p]) for p in pairs]
            # tokens shared by every chunk (BOS, system prompt): estimated once per sample
            shared = singles[0] + singles[1] - self.length(system, pairs[:2]) if len(pairs) > 1 else 0
        except UntrainableTemplate:
            raise
        except TemplateError as e:
            raise BadSample("template", f"cannot render with {self.template.name}: {e}") from None
        chunks: list[list] = []
        i = 0
        while i < len(pairs):
            if singles[i] > self.max_length:
                fixed = self._long_pair(system, pairs[i], sid, report)
                if fixed is not None:
                    chunks.append([fixed])
                i += 1
                continue
            j, est = i + 1, singles[i]
            while j < len(pairs) and singles[j] <= self.max_length and est + singles[j] - shared <= self.max_length:
                est += singles[j] - shared
                j += 1
            # verify; shrink while too long, else grow while the next exchange still fits
            shrunk = False
            while j - i > 1 and self.length(system, pairs[i:j]) > self.max_length:
                j -= 1
                shrunk = True
            while not shrunk and j < len(pairs) and singles[j] <= self.max_length and \
                    self.length(system, pairs[i:j + 1]) <= self.max_length:
                j += 1
            chunks.append(pairs[i:j])
            i = j
        if len(chunks) > 1:
            report.split_samples += 1
        out = []
        extra = {k: v for k, v in sample.items() if k not in ("id", "conversations")}
        for k, chunk in enumerate(chunks):
            conv = list(system) + [t for p in chunk for t in p]
            out.append({"id": f"{sid}_{k}", "conversations": conv, **extra})
        return out

    def _long_pair(self, system, pair, sid: str, report: SplitReport):
        """Truncate the answer so the exchange fits, or drop it (``--long-pair``)."""
        human, gpt = pair
        if self.long_pair == "drop":
            report.note("long_pair_dropped", sid)
            return None
        if self.length(system, [(human, {"from": GPT, "value": gpt["value"][:1]})]) > self.max_length:
            report.note("long_pair_dropped_prompt_too_long", sid)
            return None
        lo, hi = 1, len(gpt["value"])  # longest answer prefix that fits: binary search on characters
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.length(system, [(human, {"from": GPT, "value": gpt["value"][:mid]})]) <= self.max_length:
                lo = mid
            else:
                hi = mid - 1
        report.note("long_pair_truncated", sid)
        return human, {"from": GPT, "value": gpt["value"][:lo]}


def split_file(inp: str, out: str, *, tokenizer_path: str, max_length: int = 2048,
               conv_template: str | None = None, long_pair: str = "drop", report_path: str | None = None,
               strict: bool = False, force: bool = False) -> SplitReport:
    check_output(out, force=force, inputs=[inp])
    if report_path:
        check_output(report_path, force=force, inputs=[inp, out])
    tok = load_tokenizer(tokenizer_path)
    template = load_template(conv_template, tok, tokenizer_path)
    splitter = Splitter(tok, template, max_length, long_pair)
    try:
        floor = splitter.length([], [({"from": HUMAN, "value": "a"}, {"from": GPT, "value": "b"})])
    except TemplateError as e:
        raise DataError(f"cannot render template {template.name!r} with this tokenizer: {e}") from None
    if floor > max_length:
        raise DataError(f"--max-length {max_length} is too small: template {template.name!r} alone (system prompt, "
                        f"role tags, BOS/EOS) takes {floor} tokens with this tokenizer")
    report = SplitReport(str(inp), str(out), max_length, template.name)
    bad = BadRecords(inp, strict)
    with RecordWriter(out, force=force, inputs=[inp]) as w:
        for n, _obj, sample in iter_samples(inp, bad, desc="split"):
            try:
                chunks = splitter.split(sample, report)
            except BadSample as e:
                bad.add(n, None, e.reason, e.detail)
                continue
            except UntrainableTemplate as e:  # the template's fault, not this sample's: stop
                raise DataError(f"sample {sample['id']}: {e}") from None
            report.samples += 1
            for c in chunks:
                w.write(c)
            report.chunks += len(chunks)
    log.info("%d samples -> %d chunks (%d split); %s; %d bad records skipped", report.samples, report.chunks,
             report.split_samples, ", ".join(f"{k} {v}" for k, v in report.events.items()) or "nothing dropped",
             bad.count)
    if report_path:
        write_json(report_path, {
            "input": report.input, "output": report.output, "max_length": max_length, "template": template.name,
            "samples": report.samples, "chunks": report.chunks, "split_samples": report.split_samples,
            "events": dict(report.events), "examples": report.examples, "bad_records": bad.to_dict(),
        })
    return report


def sample_length(tok, template: Template | JinjaTemplate, sample: dict[str, Any]) -> int:
    """Tokens of one whole sample rendered for training (for stats and tests)."""
    return len(encode(tok, render_training(template, to_messages(sample["conversations"]), tok)[0]))
