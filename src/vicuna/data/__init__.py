"""Data pipeline for ShareGPT-style conversations: clean, filter, split, inspect.

Modules (one-way dependencies, ``cli`` on top):

* :mod:`.io` — streaming JSON/JSONL readers and atomic writers (usable by any area);
* :mod:`.sharegpt` — the record format: role aliases, validation, messages for templates;
* :mod:`.html2md` — ChatGPT-page HTML to Markdown (the hot loop of ``clean``);
* :mod:`.clean`, :mod:`.filter`, :mod:`.split`, :mod:`.stats`, :mod:`.ops`, :mod:`.convert`;
* :mod:`.cli` — ``vicuna data ...``.
"""

from ..errors import UsageError


class DataError(UsageError):
    """Bad data-pipeline input or usage (exit code 2); the message says what to fix."""
