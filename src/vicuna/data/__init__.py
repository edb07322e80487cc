"""Data pipeline for ShareGPT-style conversations: clean, filter, split, inspect.

Modules (one-way dependencies, ``cli`` on top):

* :mod:`.sharegpt` — the record format: role aliases, validation, messages for templates;
* :mod:`.html2md` — ChatGPT-page HTML to Markdown (the hot loop of ``clean``);
* :mod:`.clean`, :mod:`.filter`, :mod:`.split`, :mod:`.stats`, :mod:`.ops`, :mod:`.convert`;
* :mod:`.cli` — ``vicuna data ...``.

Files are read and written through :mod:`vicuna.files` (streaming readers, atomic writes);
bad input is a :class:`vicuna.errors.DataError`.
"""
