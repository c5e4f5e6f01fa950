"""Command-line plumbing shared by ``train.py`` and ``eval.py``."""

import ast
import contextlib
import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run``'s ``flags_parser``), with a ``--config.a.b=value``
    override that names no config field reported in one line instead of ml_collections'
    traceback (absl itself reports unknown flags and values of the wrong type)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        message = str(error)
        with contextlib.suppress(ValueError, SyntaxError):  # ml_collections wraps a repr
            message = str(ast.literal_eval(message))
        message = " ".join(message.replace("'", "").split())
        sys.exit(f"error: a --config override names no config field: {message}")
