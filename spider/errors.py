"""User-facing errors.

A ``UserError`` is a mistake in what a person gave us (a path, a flag, a parameter). Command
line entry points catch it and print its one-sentence message with a non-zero exit instead
of a traceback; library callers get an ordinary exception (it subclasses ``ValueError``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(ValueError):
    """A mistake in the user's input, described in one sentence naming the culprit."""


def cli_main(func: F) -> F:
    """Wrap a ``main(argv)`` so that user mistakes end in one clear line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def positive_int(text: str) -> int:
    """argparse type for counts (``--limit``, ``--batch-size``): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, not {value}")
    return value
