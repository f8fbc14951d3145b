"""The project's one error taxonomy (ARCHITECTURE.md, "Errors").

* ``UserError`` — a mistake in what a person gave us (a path, a flag, a parameter): one
  sentence naming the culprit; a command prints ``error: ...`` and exits 2. Library callers
  get an ordinary exception (it subclasses ``ValueError``).
* ``RunFailed`` — the input was fine but the run could not go on (a non-finite loss, out of
  memory): one sentence saying what happened and what to try; ``failed: ...``, exit 1.
* ``RunCancelled`` — stopped on request (SIGTERM, Ctrl-C) after saving: how to continue;
  exit 130, as for Ctrl-C.
* anything else is a bug, and its traceback is printed as Python does.

Every command parses its flags with :class:`CliParser`: a bad flag is one ``error:`` line
naming it, exit 2, the same as a ``UserError``.
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


class RunFailed(RuntimeError):
    """A run that cannot go on although its input was fine; says what to try."""


class RunCancelled(Exception):
    """A run stopped on request after saving its state; says how to continue it."""


EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_CANCELLED = 130


def cli_main(func: F) -> F:
    """Wrap a ``main(argv)`` so that each kind of error ends as the taxonomy above says."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except RunFailed as err:
            print(f"failed: {err}", file=sys.stderr)
            raise SystemExit(EXIT_RUN_FAILED) from None
        except RunCancelled as err:
            print(f"cancelled: {err}", file=sys.stderr)
            raise SystemExit(EXIT_CANCELLED) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_CANCELLED) from None

    return wrapper  # type: ignore[return-value]


class _DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """The argument parser of every command of the project.

    A bad flag or a missing argument is one line, ``error: argument --lr: invalid float
    value: 'abc'`` (naming the flag), and exit 2, like any other ``UserError``, instead of
    argparse's whole usage text; ``--help`` shows each default. Sub-commands
    (``add_subparsers``) are made of this class too.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def positive_int(text: str) -> int:
    """argparse type for counts (``--limit``, ``--batch-size``): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, not {value}")
    return value
