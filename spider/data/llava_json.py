"""Read and write LLaVA-style JSON datasets.

The format (one file, images beside it)::

    [{"id": "q1", "image": "images/q1.png",
      "conversations": [{"from": "human", "value": "<image>\\nHow many circles?"},
                        {"from": "gpt", "value": "three"}],
      "task": "counting", "metric": "exact", "references": ["three", "3"]}, ...]

``image`` is relative to the JSON file's folder (absolute paths work too). Turns alternate
human / gpt, starting with human and ending with gpt; the first human text holds ``<image>``
exactly once and no other turn holds it. ``task`` (default ``vqa``), ``metric`` (``exact`` or
``cider``, default ``exact``) and ``references`` (acceptable last answers) are optional;
other keys are ignored.

Everything is checked when the file is read, except whether each image decodes: images are
opened when an example is accessed. Any problem is a :class:`UserError` whose one sentence
names the file and the record (index and id).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from spider.data.dataset import ExampleDataset
from spider.data.records import IMAGE_MARKER, Example, Turn
from spider.errors import UserError

METRICS = ("exact", "cider")
DEFAULT_TASK = "vqa"
DEFAULT_METRIC = "exact"
DATA_FILE = "data.json"  # the file name export writes, and looked for when given a folder


@dataclass(frozen=True)
class Record:
    """A checked record whose image has not been opened yet."""

    index: int
    id: str
    image_path: Path
    turns: list[Turn]
    task: str
    metric: str
    references: list[str]


def _where(path: Path | str, index: int, rid: object = None) -> str:
    who = f'id "{rid}"' if rid is not None else "no id"
    return f"record {index} ({who}) in {path}"


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so it cannot be a JSON dataset.") from None
    except OSError as err:
        raise UserError(f"could not read {path}: {err.strerror or err}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}."
        ) from None


def _parse_turns(where: str, conversations: Any) -> list[Turn]:
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f'{where} needs "conversations" to be a non-empty list of turns.')
    texts: list[str] = []
    for k, turn in enumerate(conversations):
        expected = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f'{where}: turn {k} must be an object with a string "value".')
        if "from" not in turn:
            raise UserError(f'{where}: turn {k} has no "from" key (expected "{expected}").')
        if turn["from"] != expected:
            raise UserError(
                f'{where}: turn {k} is from "{turn["from"]}" but should be from '
                f'"{expected}" (turns alternate human, gpt, starting with human).'
            )
        texts.append(turn["value"])
    if len(texts) % 2 == 1:
        raise UserError(
            f"{where} has no answer: its last human turn is not followed by a gpt turn."
        )
    humans, answers = texts[0::2], texts[1::2]
    for k, answer in enumerate(answers):
        if not answer.strip():
            raise UserError(f"{where} has an empty answer in turn {2 * k + 1}.")
    n_markers = [h.count(IMAGE_MARKER) for h in humans]
    if n_markers[0] != 1 or sum(n_markers) != 1:
        raise UserError(
            f"{where} must mention {IMAGE_MARKER} exactly once, in its first human turn "
            f"(found it {sum(n_markers)} times)."
        )
    return [Turn(h, a) for h, a in zip(humans, answers, strict=True)]


def _parse_record(path: Path, folder: Path, index: int, rec: Any) -> Record:
    if not isinstance(rec, dict):
        raise UserError(f"{_where(path, index)} is a {type(rec).__name__}, not a JSON object.")
    rid = rec.get("id")
    if rid is None:
        raise UserError(f'{_where(path, index)} has no "id" key.')
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise UserError(f'{_where(path, index, rid)} needs "id" to be a non-empty string.')
    rid = str(rid)
    where = _where(path, index, rid)

    image = rec.get("image")
    if "image" not in rec:
        raise UserError(f'{where} has no "image" key.')
    if not isinstance(image, str) or not image:
        raise UserError(f'{where} needs "image" to be a path string.')
    image_path = folder / image
    if not image_path.is_file():
        raise UserError(f"{where} names image {image_path}, which does not exist.")

    if "conversations" not in rec:
        raise UserError(f'{where} has no "conversations" key.')
    turns = _parse_turns(where, rec["conversations"])

    task = rec.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or not task.strip():
        raise UserError(f'{where} needs "task" to be a non-empty string.')
    metric = rec.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise UserError(f'{where} has metric "{metric}"; use one of: {", ".join(METRICS)}.')
    refs = rec.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise UserError(f'{where} needs "references" to be a list of non-empty strings.')
    return Record(index, rid, image_path, turns, task, metric, list(refs))


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read and check every record of a LLaVA-style JSON file (images are not opened)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path} must hold a JSON list of records, not a {type(data).__name__}.")
    if not data:
        raise UserError(f"{path} holds no records; a dataset needs at least one.")
    folder = path.parent
    records: list[Record] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(data):
        rec = _parse_record(path, folder, index, raw)
        if rec.id in first_index:
            raise UserError(
                f"{_where(path, index, rec.id)} repeats the id of record {first_index[rec.id]}; "
                "ids must be unique."
            )
        first_index[rec.id] = index
        records.append(rec)
    return records


def load_image(path: Path | str, rec: Record) -> Image.Image:
    """Open a record's image as RGB; a file PIL cannot decode is a UserError naming it."""
    try:
        with Image.open(rec.image_path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].rstrip(".")
        raise UserError(
            f"{_where(path, rec.index, rec.id)}: image {rec.image_path} could not be read ({reason})."
        ) from None


def to_example(path: Path | str, rec: Record) -> Example:
    return Example(
        id=rec.id,
        image=load_image(path, rec),
        turns=list(rec.turns),
        task=rec.task,
        metric=rec.metric,
        references=list(rec.references),
    )


def read_llava_json(
    path: str | os.PathLike, size: int | None = None, split: str = "train"
) -> ExampleDataset:
    """A dataset over the file's records (the first ``size`` of them when given).

    The file is taken whole whatever ``split`` says; ``split`` only labels the dataset.
    """
    records = read_records(path)[:size]
    tasks = list(dict.fromkeys(r.task for r in records))
    make = functools.partial(_example_at, path, records)  # picklable, unlike a lambda
    return ExampleDataset(str(path), make, len(records), tasks, split)


def _example_at(path: Path | str, records: list[Record], index: int) -> Example:
    return to_example(path, records[index])


# ---------------------------------------------------------------------------------------
# Writing


def _file_stem(example_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", example_id).strip("._") or "image"


def to_record(example: Example, image: str) -> dict[str, Any]:
    """The JSON record of ``example`` whose picture is stored at ``image`` (relative path)."""
    conversations = []
    for turn in example.turns:
        conversations += [
            {"from": "human", "value": turn.human},
            {"from": "gpt", "value": turn.gpt},
        ]
    rec: dict[str, Any] = {"id": example.id, "image": image, "conversations": conversations,
                           "task": example.task, "metric": example.metric}  # fmt: skip
    if example.references != [example.answer]:
        rec["references"] = list(example.references)
    return rec


def write_llava_json(
    examples: Iterable[Example], directory: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write ``directory/data.json`` and one PNG per example under ``directory/images/``.

    Refuses to replace an existing non-empty ``data.json`` unless ``force``. The JSON is
    written to a temporary name and renamed, so a reader never sees half a file.
    """
    directory = Path(directory)
    target = directory / DATA_FILE
    if target.is_file() and target.stat().st_size > 0 and not force:
        raise UserError(f"{target} already exists; pass --force (force=True) to overwrite it.")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a folder.")
    images = directory / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"could not create {images}: {err.strerror or err}.") from None
    records, used = [], set()
    for example in examples:
        stem = _file_stem(example.id)
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        example.image.save(images / name, format="PNG")
        records.append(to_record(example, f"images/{name}"))
    tmp = target.with_name(f".{DATA_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target
