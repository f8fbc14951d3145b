"""Every command of the project (``python -m spider.train``, ``spider.pretrain``,
``spider.data``, ``spider.evaluate``, ``analysis.report``, ``app.jobs``): a bad flag is ONE
``error:`` line naming the flag and exit 2 (not argparse's whole usage text), and ``--help``
shows each default. The parsers are :class:`spider.errors.CliParser`; a syntax-tree check
keeps any new command on it."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from spider.errors import CliParser

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("spider", "analysis", "app")


def _main(module: str):
    import importlib

    return importlib.import_module(module).main


BAD_FLAGS = [
    ("spider.train", ["--lr", "abc"], "--lr"),
    ("spider.train", ["--steps", "1.5"], "--steps"),
    ("spider.train", ["--no-such-flag", "1"], "--no-such-flag"),
    # values argparse takes but the runner refuses: refused before the model loads (no
    # loading output before the error line)
    ("spider.train", ["--method", "nope", "--output-dir", "run"], "unknown method 'nope'"),
    ("spider.train", ["--data", "builtin:nope", "--output-dir", "run"], '"nope"'),
    ("spider.train", ["--option", "mask=zz", "--output-dir", "run"], "'mask'"),
    ("spider.pretrain", ["--steps", "x"], "--steps"),
    ("spider.data.__main__", ["show", "builtin:counting", "--n", "zero"], "--n"),
    ("spider.data.__main__", ["export"], "spec"),
    ("spider.evaluate", ["--model", "m", "--data", "d", "--batch-size", "x"], "--batch-size"),
    ("spider.evaluate", ["--data", "d"], "--model"),
    ("analysis.report", ["somewhere", "--output"], "--output"),
    ("app.jobs", ["list", "--root", "MISSING"], "--root"),
    ("app.jobs", ["list"], "--root"),
]


@pytest.mark.parametrize(("module", "argv", "flag"), BAD_FLAGS,
                         ids=[f"{m}-{' '.join(a)}" for m, a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_error_line_naming_it_and_exit_2(module, argv, flag, capsys,
                                                         tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "MISSING" and friends do not exist here
    with pytest.raises(SystemExit) as end:
        _main(module)(argv)
    assert end.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and flag in lines[0], lines[0]
    assert "usage:" not in captured.err and captured.out == ""
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_job_name_with_a_path_is_refused_by_the_command(tmp_path, capsys):
    from app import jobs

    root = tmp_path / "runs"
    (root / jobs.QUEUE / "pending").mkdir(parents=True)
    victim = tmp_path / "victim.json"
    victim.write_text('{"mine": true}')
    with pytest.raises(SystemExit) as end:
        jobs.main(["cancel", "--root", str(root), "../../victim"])
    assert end.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: run name '../../victim'")
    assert victim.read_text() == '{"mine": true}'  # neither deleted nor rewritten


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from analysis import report
    from app import jobs
    from spider import evaluate, train
    from spider.data import __main__ as data_cli

    return {"spider.train": train._parser(), "spider.data": data_cli._parser(),
            "spider.evaluate": evaluate._parser(), "analysis.report": report._parser(),
            "app.jobs": jobs._parser()}


def _with_subcommands(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _with_subcommands(sub)


def test_help_shows_each_default():
    from spider.train import RunConfig

    for name, parser in _parsers().items():
        assert isinstance(parser, CliParser), name
        for each in _with_subcommands(parser):
            formatter = each._get_formatter()
            for action in each._actions:
                if (not action.option_strings or action.nargs == 0
                        or action.default in (None, False, argparse.SUPPRESS)):
                    continue
                assert "default" in formatter._get_help_string(action), (name, action.dest)
    # the runner's flags default to RunConfig's fields (argparse itself sees no default)
    text = " ".join(_parsers()["spider.train"].format_help().split())
    for field in dataclasses.fields(RunConfig):
        if "help" in field.metadata and field.type not in ("bool", "dict") and \
                field.default not in (None, "", dataclasses.MISSING):
            said = "default" in field.metadata["help"]  # in its own words
            assert said or f"(default: {field.default})" in text, field.name


def test_pretrain_help_shows_defaults(capsys):
    from spider.pretrain import main

    with pytest.raises(SystemExit) as end:
        main(["--help"])
    assert end.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS" in text and "(default: " in text


def _commands() -> list[Path]:
    files = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")
                   if "__pycache__" not in p.parts)
    return [p for p in files if "__main__" in p.read_text(encoding="utf-8")]


def test_every_command_parses_with_the_shared_parser():
    """No ``argparse.ArgumentParser(...)`` in the code: a new command gets CliParser (and
    with it the one-line errors) or this fails."""
    offenders = []
    commands = _commands()
    assert len(commands) >= 6, commands
    for path in (p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "ArgumentParser":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    for path in commands:
        text = path.read_text(encoding="utf-8")
        if "argparse" in text or "parse_args" in text:
            assert "CliParser" in text, path
