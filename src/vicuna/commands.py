"""The argparse building blocks every area's CLI uses: one formatter, one way to add an area or a command.

They live apart from ``cli.py`` (the entry point, which imports every area) so that areas never import
the entry point: dependencies point one way, ``cli → areas → commands``.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep hand-written examples in descriptions and show defaults (unless the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def area_parser(sub, name: str, help: str, description: str | None = None):
    """Create `vicuna NAME` with its own verbs; returns the verbs' subparsers."""
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(area_parser=p)
    return p.add_subparsers(dest="verb", metavar="VERB")


def command(sub, name: str, func, help: str, description: str | None = None):
    """Create one command with the shared formatter; returns its parser."""
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p
