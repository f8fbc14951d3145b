"""Read and write LLaVA-style JSON datasets, as the LLaVA repository writes them.

The format (one file; images beside it, or under ``--image-folder``)::

    [{"id": "q1", "image": "images/q1.png",
      "conversations": [{"from": "human", "value": "<image>\\nHow many circles?"},
                        {"from": "gpt", "value": "three"}],
      "task": "counting", "metric": "exact", "references": ["three", "3"]}, ...]

What LLaVA's own files hold, and how it is read:

- ``image`` is a path relative to the image folder (``image_folder``, LLaVA's
  ``--image-folder``; by default the JSON file's folder; absolute paths work too), or a list
  of paths for a multi-image record. A record without ``image`` is text-only: the language
  model alone sees it (``llava_v1_5_mix665k.json`` holds 40,688 of them).
- ``id`` is a string or an integer; ids need not be unique (LLaVA's files repeat some), so a
  repeated id is a warning and error messages name records by index as well.
- Turns alternate human / gpt and end with gpt. A conversation whose first turn is from gpt
  drops that turn, as LLaVA's preprocessing does.
- The first human text holds one ``<image>`` per image, before or after the question (the
  model's chat template decides where the image goes, as LLaVA moves it to the front); no
  later turn holds one.
- ``task`` (default ``vqa``), ``metric`` (``exact`` or ``cider``, default ``exact``) and
  ``references`` (acceptable last answers) are Spiderscope's optional additions; other keys
  are ignored.

Everything is checked when the file is read, except whether each image decodes: images are
opened when an example is accessed. Any problem is a :class:`UserError` whose one sentence
names the file and the record (index and id).

Held-out evaluation: :func:`held_out_indices` picks, from the file alone, the records that
training leaves out to evaluate on when no separate evaluation file is given.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
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
HOLD_OUT_SHARE = 0.05  # of a training file's records, evaluated on when --eval-data is absent
HOLD_OUT_MAX = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """A checked record whose images have not been opened yet (none: text-only)."""

    index: int
    id: str
    image_paths: tuple[Path, ...]
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
    except RecursionError:
        raise UserError(f"{path} is not usable JSON: it nests too deeply.") from None


def _parse_turns(where: str, conversations: Any, n_images: int) -> list[Turn]:
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f'{where} needs "conversations" to be a non-empty list of turns.')
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f'{where}: turn {k} must be an object with a string "value".')
        if "from" not in turn:
            raise UserError(f'{where}: turn {k} has no "from" key (expected "human" or "gpt").')
    # LLaVA's preprocessing skips a conversation's opening gpt turn.
    skip = 1 if conversations[0]["from"] == "gpt" else 0
    texts: list[str] = []
    for k, turn in enumerate(conversations[skip:], start=skip):
        expected = "human" if (k - skip) % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise UserError(
                f'{where}: turn {k} is from "{turn["from"]}" but should be from '
                f'"{expected}" (turns alternate human, gpt, starting with human).'
            )
        texts.append(turn["value"])
    if not texts:
        raise UserError(f"{where} has only a gpt turn: no question to answer.")
    if len(texts) % 2 == 1:
        raise UserError(
            f"{where} has no answer: its last human turn is not followed by a gpt turn."
        )
    humans, answers = texts[0::2], texts[1::2]
    for k, answer in enumerate(answers):
        if not answer.strip():
            raise UserError(f"{where} has an empty answer in turn {skip + 2 * k + 1}.")
    for k, human in enumerate(humans[1:], start=1):
        if IMAGE_MARKER in human:
            raise UserError(
                f"{where} has {IMAGE_MARKER} in turn {skip + 2 * k}, a later human turn; "
                f"every {IMAGE_MARKER} must be in the first human turn."
            )
    found = humans[0].count(IMAGE_MARKER)
    if n_images == 0 and found:
        raise UserError(
            f'{where} mentions {IMAGE_MARKER} but has no "image" key (a record without one '
            "is text-only)."
        )
    if found != n_images:
        raise UserError(
            f"{where} must mention {IMAGE_MARKER} once per image ({n_images}) in its first "
            f"human turn (found it {found} times)."
        )
    return [Turn(h, a) for h, a in zip(humans, answers, strict=True)]


def _image_paths(where: str, rec: dict, folder: Path) -> tuple[Path, ...]:
    if "image" not in rec:
        return ()  # text-only
    image = rec["image"]
    names = image if isinstance(image, list) else [image]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f'{where} needs "image" to be a path string or a list of them.')
    paths = tuple(folder / name for name in names)
    for path in paths:
        if not path.is_file():
            raise UserError(f"{where} names image {path}, which does not exist.")
    return paths


def _parse_record(path: Path, folder: Path, index: int, rec: Any) -> Record:
    if not isinstance(rec, dict):
        raise UserError(f"{_where(path, index)} is a {type(rec).__name__}, not a JSON object.")
    rid = rec.get("id")
    if rid is None:
        raise UserError(f'{_where(path, index)} has no "id" key.')
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise UserError(
            f'{_where(path, index, rid)} needs "id" to be a non-empty string or an integer.'
        )
    rid = str(rid)
    where = _where(path, index, rid)

    image_paths = _image_paths(where, rec, folder)
    if "conversations" not in rec:
        raise UserError(f'{where} has no "conversations" key.')
    turns = _parse_turns(where, rec["conversations"], len(image_paths))

    task = rec.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or not task.strip():
        raise UserError(f'{where} needs "task" to be a non-empty string.')
    metric = rec.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or metric not in METRICS:
        raise UserError(f'{where} has metric "{metric}"; use one of: {", ".join(METRICS)}.')
    refs = rec.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise UserError(f'{where} needs "references" to be a list of non-empty strings.')
    return Record(index, rid, image_paths, turns, task, metric, list(refs))


def _image_folder(path: Path, image_folder: str | os.PathLike | None) -> Path:
    if image_folder is None:
        return path.parent
    folder = Path(image_folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--image-folder {image_folder} is not a folder.")
    return folder


def read_records(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[Record]:
    """Read and check every record of a LLaVA-style JSON file (images are not opened).

    Image paths are relative to ``image_folder`` (default: the file's folder). Repeated ids
    are reported once, as a warning on the ``spider.data.llava_json`` logger.
    """
    path = Path(path)
    folder = _image_folder(path, image_folder)
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path} must hold a JSON list of records, not a {type(data).__name__}.")
    if not data:
        raise UserError(f"{path} holds no records; a dataset needs at least one.")
    records: list[Record] = []
    first_index: dict[str, int] = {}
    repeats: list[tuple[int, Record]] = []
    for index, raw in enumerate(data):
        rec = _parse_record(path, folder, index, raw)
        if rec.id in first_index:
            repeats.append((first_index[rec.id], rec))
        else:
            first_index[rec.id] = index
        records.append(rec)
    if repeats:
        first, rec = repeats[0]
        log.warning(
            "warning: %d record(s) of %s repeat an earlier id (first: record %d repeats id "
            '"%s" of record %d); records are told apart by index.',
            len(repeats), path, rec.index, rec.id, first,
        )
    return records


def held_out_indices(n: int) -> list[int]:
    """The records of an ``n``-record file kept out of training for evaluation.

    5 % of them (at least 1, at most 1,000), evenly spaced through the file so that every
    part of a file assembled from several sources is represented. It depends on ``n``
    alone: the same file gives the same split whatever the seed.
    """
    if n < 2:
        raise UserError(
            f"a dataset of {n} record(s) is too small to hold records out for evaluation."
        )
    k = min(max(1, round(n * HOLD_OUT_SHARE)), HOLD_OUT_MAX)
    return [int((j + 0.5) * n / k) for j in range(k)]


def load_image(path: Path | str, rec: Record, image_path: Path) -> Image.Image:
    """Open one of a record's images as RGB; a file PIL cannot decode is a UserError."""
    try:
        with Image.open(image_path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].rstrip(".")
        raise UserError(
            f"{_where(path, rec.index, rec.id)}: image {image_path} could not be read ({reason})."
        ) from None


def to_example(path: Path | str, rec: Record) -> Example:
    images = [load_image(path, rec, p) for p in rec.image_paths]
    return Example(
        id=rec.id,
        image=None if not images else images[0] if len(images) == 1 else images,
        turns=list(rec.turns),
        task=rec.task,
        metric=rec.metric,
        references=list(rec.references),
    )


def read_llava_json(
    path: str | os.PathLike,
    size: int | None = None,
    split: str = "train",
    image_folder: str | os.PathLike | None = None,
    hold_out: bool = False,
) -> ExampleDataset:
    """A dataset over the file's records (the first ``size`` of them when given).

    Without ``hold_out`` the file is taken whole and ``split`` only labels the dataset.
    With it, ``split="test"`` is the part :func:`held_out_indices` picks and ``"train"``
    the rest.
    """
    records = read_records(path, image_folder)
    if hold_out:
        held = set(held_out_indices(len(records)))
        records = [r for i, r in enumerate(records) if (i in held) == (split == "test")]
    records = records[:size]
    tasks = list(dict.fromkeys(r.task for r in records))
    make = functools.partial(_example_at, path, records)  # picklable, unlike a lambda
    return ExampleDataset(str(path), make, len(records), tasks, split)


def read_held_out_split(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> tuple[ExampleDataset, ExampleDataset]:
    """``(train, test)`` of one file read once: ``test`` is what :func:`held_out_indices`
    keeps out, ``train`` the rest (in file order)."""
    records = read_records(path, image_folder)
    held = set(held_out_indices(len(records)))
    parts = []
    for split in ("train", "test"):
        chosen = [r for i, r in enumerate(records) if (i in held) == (split == "test")]
        tasks = list(dict.fromkeys(r.task for r in chosen))
        make = functools.partial(_example_at, path, chosen)
        parts.append(ExampleDataset(str(path), make, len(chosen), tasks, split))
    return parts[0], parts[1]


def _example_at(path: Path | str, records: Sequence[Record], index: int) -> Example:
    return to_example(path, records[index])


# ---------------------------------------------------------------------------------------
# Writing


def _file_stem(example_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", example_id).strip("._") or "image"


def to_record(example: Example, images: str | Sequence[str]) -> dict[str, Any]:
    """The JSON record of ``example`` whose pictures are stored at ``images`` (relative
    paths: one string, a list for a multi-image example, empty for a text-only one)."""
    images = [images] if isinstance(images, str) else list(images)
    conversations = []
    for turn in example.turns:
        conversations += [
            {"from": "human", "value": turn.human},
            {"from": "gpt", "value": turn.gpt},
        ]
    rec: dict[str, Any] = {"id": example.id}
    if images:
        rec["image"] = images[0] if len(images) == 1 else images
    rec.update(conversations=conversations, task=example.task, metric=example.metric)
    if example.references != [example.answer]:
        rec["references"] = list(example.references)
    return rec


def write_llava_json(
    examples: Iterable[Example], directory: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write ``directory/data.json`` and one PNG per picture under ``directory/images/``.

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
        names = []
        for picture in example.images:
            name, n = f"{stem}.png", 1
            while name in used:
                n += 1
                name = f"{stem}-{n}.png"
            used.add(name)
            picture.save(images / name, format="PNG")
            names.append(f"images/{name}")
        records.append(to_record(example, names))
    tmp = target.with_name(f".{DATA_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target
