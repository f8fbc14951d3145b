"""Datasets as lists of :class:`Example`: built-in ones generated from a seed, or your own
LLaVA-style JSON file.

    from spider.data import load_dataset
    train = load_dataset("builtin:counting", split="train", seed=0)
    cell = load_dataset("builtin:counting:oodimg-idq", split="test")
    mine = load_dataset("path/to/data.json")
    llava = load_dataset("llava_v1_5_mix665k.json", image_folder="data/")  # LLaVA's layout

A spec is ``builtin:NAME`` (see :func:`builtin_names`), ``builtin:NAME:CELL`` for a cell of
the 2x2 evaluation (see :func:`cells`), or a path to a JSON file (or a folder holding
``data.json``). Tokenization is not done here; the collator turns Examples into tensors.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from spider.data.builtin import CELL_DATASETS, DATASETS, SPLITS, generate, vocabulary
from spider.data.dataset import ExampleDataset
from spider.data.llava_json import (
    DATA_FILE,
    HOLD_OUT_SHARE,
    held_out_indices,
    read_held_out_split,
    read_llava_json,
    write_llava_json,
)
from spider.data.records import IMAGE_MARKER, Example, Turn
from spider.data.scenes import IMAGE_SIZE
from spider.data.text import number_word, split_words
from spider.errors import UserError

__all__ = [
    "IMAGE_MARKER",
    "HOLD_OUT_SHARE",
    "IMAGE_SIZE",
    "Example",
    "ExampleDataset",
    "Turn",
    "builtin_names",
    "cells",
    "describe_eval_source",
    "downstream_data",
    "held_out_indices",
    "is_builtin",
    "load_dataset",
    "number_word",
    "split_words",
    "vocabulary",
    "write_llava_json",
]

BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    """Names usable as ``builtin:NAME``: ``upstream``, ``counting``, ``digit-sum``."""
    return list(DATASETS)


def _available() -> str:
    return ", ".join(BUILTIN_PREFIX + n for n in DATASETS)


def cells(name: str) -> list[str]:
    """The 2x2 evaluation cells of built-in ``name`` (empty for ``upstream``).

    ``idimg-idq`` in-distribution images and questions (the downstream test split),
    ``idimg-oodq`` upstream questions on downstream images, ``oodimg-idq`` downstream
    questions on images of another look, ``oodimg-oodq`` upstream questions on upstream
    images unrelated to the downstream task.
    """
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in DATASETS:
        raise UserError(f'unknown built-in dataset "{name}"; available: {_available()}.')
    return list(CELL_DATASETS.get(name, {}))


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    seed: int = 0,
    size: int | None = None,
    *,
    image_folder: str | os.PathLike | None = None,
    hold_out: bool = False,
) -> ExampleDataset:
    """Load a dataset from a spec (see the module docstring).

    Built-in datasets: ``split`` is ``train`` or ``test`` (never overlapping), ``seed``
    picks the generated content, ``size`` overrides the default length. JSON files are taken
    whole (``seed`` does not apply) unless ``hold_out``: then ``split="test"`` is the part of
    the file :func:`held_out_indices` keeps out of training and ``"train"`` the rest.
    ``size`` keeps the first ``size`` examples; ``image_folder`` is the root that a JSON
    file's image paths are relative to (default: the file's folder).
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"dataset size must be a positive whole number, not {size!r}.")
    text = os.fspath(spec)
    if text.startswith(BUILTIN_PREFIX):
        return _load_builtin(text, split, seed, size)
    path = json_path(text)
    if hold_out and split not in SPLITS:
        raise UserError(f'split must be "train" or "test", not "{split}".')
    return read_llava_json(path, size, split, image_folder=image_folder, hold_out=hold_out)


def downstream_data(
    data: str,
    eval_data: str = "",
    seed: int = 0,
    size: int | None = None,
    image_folder: str | os.PathLike | None = None,
) -> tuple[ExampleDataset, ExampleDataset, dict]:
    """What a fine-tuning run trains on, what it evaluates downstream on, and a record of
    which evaluation data that is (for ``run.json``).

    ``eval_data`` given: that (its test split when built-in). A built-in ``data``: its test
    split, disjoint from the train split. A JSON ``data`` without ``eval_data``: evaluating
    on the training file would measure memorisation, so a deterministic 5 % of its records
    (:func:`held_out_indices`) is held out of training and evaluated on instead.
    """
    if eval_data or is_builtin(data):
        train = load_dataset(data, "train", seed, size, image_folder=image_folder)
        spec = eval_data or data
        test = load_dataset(spec, "test", seed, image_folder=image_folder)
        kind = "eval_data" if eval_data else "test_split"
        return train, test, {"kind": kind, "data": spec, "examples": len(test)}
    train, test = read_held_out_split(json_path(data), image_folder)
    total = len(train) + len(test)
    if size is not None:
        train = load_dataset(data, "train", size=size, image_folder=image_folder,
                             hold_out=True)
    return train, test, {"kind": "held_out", "data": data, "examples": len(test),
                         "of": total, "share": HOLD_OUT_SHARE}


def describe_eval_source(source: dict) -> str:
    """One line saying what a run's downstream evaluation data is."""
    if source["kind"] == "held_out":
        return (f"downstream evaluation: {source['examples']} of the {source['of']} records of "
                f"{source['data']}, evenly spaced through the file, held out of training; "
                "give --eval-data to evaluate on other data")
    if source["kind"] == "eval_data":
        return f"downstream evaluation: {source['data']} ({source['examples']} examples)"
    return f"downstream evaluation: the test split of {source['data']}"


def is_builtin(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a built-in dataset (else it is a JSON file or folder)."""
    return os.fspath(spec).startswith(BUILTIN_PREFIX)


def json_path(spec: str | os.PathLike) -> Path:
    """The JSON file a non-builtin spec names (a folder stands for its ``data.json``)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / DATA_FILE).is_file():
            raise UserError(f"folder {text} holds no {DATA_FILE}; give the JSON file's path.")
        return path / DATA_FILE
    if not path.exists():
        raise UserError(
            f"data file {text} does not exist (give a LLaVA-style JSON file or one of "
            f"{_available()})."
        )
    return path


def _load_builtin(spec: str, split: str, seed: int, size: int | None) -> ExampleDataset:
    name, _, cell = spec.removeprefix(BUILTIN_PREFIX).partition(":")
    if name not in DATASETS:
        raise UserError(f'unknown built-in dataset "{name}" in {spec}; available: {_available()}.')
    entry = DATASETS[name]
    if cell:
        options = CELL_DATASETS.get(name, {})
        if cell not in options:
            listed = ", ".join(options) if options else "none"
            raise UserError(f'{BUILTIN_PREFIX}{name} has no cell "{cell}"; its cells: {listed}.')
        entry = options[cell]
    if split not in SPLITS:
        raise UserError(f'split must be "train" or "test", not "{split}".')
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, not {seed!r}.")
    length = size if size is not None else entry.sizes[split]
    # A partial of a module-level function (not a lambda) keeps the dataset picklable, so
    # DataLoader workers started with "spawn" can receive it.
    make = functools.partial(_builtin_example, name, cell, seed, split)
    return ExampleDataset(spec, make, length, list(entry.tasks), split)


def _builtin_example(name: str, cell: str, seed: int, split: str, index: int) -> Example:
    entry = CELL_DATASETS[name][cell] if cell else DATASETS[name]
    return generate(entry, seed, split, index).example
