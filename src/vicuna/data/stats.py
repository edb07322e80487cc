"""`vicuna data stats`: what is in a ShareGPT file, before you train on it."""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np

from ..files import write_figure
from .filter import detect_language, language_text
from .sharegpt import SYSTEM, BadRecords, iter_samples

PERCENTILES = (50, 90, 99)


def _dist(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    out = {"count": int(a.size), "mean": round(float(a.mean()), 1), "min": int(a.min())}
    out.update({f"p{p}": int(np.percentile(a, p, method="nearest")) for p in PERCENTILES})
    out["max"] = int(a.max())
    return out


def compute_stats(path: str, *, tokenizer=None, template=None, max_length: int | None = None,
                  languages: bool = True, strict: bool = False) -> tuple[dict, dict[str, list[int]]]:
    """(statistics, raw per-sample lengths) for the samples of ``path``."""
    from .split import sample_length  # needs the template code only with a tokenizer

    bad = BadRecords(path, strict)
    turns, exchanges, chars, tokens = [], [], [], []
    langs: collections.Counter = collections.Counter()
    models: collections.Counter = collections.Counter()
    unrenderable = 0
    n_system = 0
    for _n, _obj, s in iter_samples(path, bad, desc="stats"):
        conv = s["conversations"]
        chat = [t for t in conv if t["from"] != SYSTEM]
        n_system += len(conv) != len(chat)
        turns.append(len(chat))
        exchanges.append(len(chat) // 2)
        chars.append(sum(len(t["value"]) for t in conv))
        models[str(s.get("model") or "unknown")] += 1
        if languages:
            langs[detect_language(language_text(conv))] += 1
        if tokenizer is not None:
            try:
                tokens.append(sample_length(tokenizer, template, s))
            except Exception:  # roles that do not alternate, trailing human turn: not renderable for training
                unrenderable += 1
    stats: dict[str, Any] = {
        "file": str(path),
        "samples": len(turns),
        "bad_records": bad.count,
        "with_system_message": n_system,
        "turns_per_sample": _dist(turns),
        "exchanges_per_sample": _dist(exchanges),
        "chars_per_sample": _dist(chars),
        "models": dict(models.most_common()),
    }
    if languages:
        stats["languages"] = dict(langs.most_common())
    if tokenizer is not None:
        stats["tokens_per_sample"] = _dist(tokens)
        stats["template"] = template.name
        stats["not_renderable"] = unrenderable
        if max_length:
            stats["max_length"] = max_length
            stats["longer_than_max_length"] = sum(t > max_length for t in tokens)
    if bad.count:
        stats["bad_record_reasons"] = bad.reasons
    return stats, {"tokens": tokens, "chars": chars}


def format_stats(stats: dict) -> str:
    """A plain-text summary (stdout-friendly, no terminal codes)."""
    lines = [f"{stats['file']}: {stats['samples']} samples, {stats['bad_records']} bad records"]
    for key in ("turns_per_sample", "exchanges_per_sample", "chars_per_sample", "tokens_per_sample"):
        d = stats.get(key)
        if d and d.get("count"):
            cols = "  ".join(f"{k} {d[k]}" for k in ("mean", "min", *(f"p{p}" for p in PERCENTILES), "max"))
            lines.append(f"  {key.replace('_', ' '):<22} {cols}")
    if "longer_than_max_length" in stats:
        lines.append(f"  longer than {stats['max_length']} tokens: {stats['longer_than_max_length']}")
    for key in ("languages", "models"):
        if stats.get(key):
            top = list(stats[key].items())
            shown = ", ".join(f"{k} {v}" for k, v in top[:10]) + (f", ... ({len(top)} in all)" if len(top) > 10 else "")
            lines.append(f"  {key:<22} {shown}")
    return "\n".join(lines)


def plot_lengths(lengths: list[int], path: str, *, unit: str, title: str, max_length: int | None = None) -> None:
    """Histogram of per-sample lengths, written as an image (PNG/SVG/PDF by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#4c72b0")
    if max_length:
        ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max length {max_length}")
        ax.legend()
    ax.set_xlabel(f"{unit} per sample")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    try:
        write_figure(path, fig)
    finally:
        plt.close(fig)


def stats_json(stats: dict) -> str:
    return json.dumps(stats, indent=2, ensure_ascii=False)
