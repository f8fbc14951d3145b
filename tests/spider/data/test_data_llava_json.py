"""LLaVA-style JSON: reading, every bad-input case, and the export round trip."""

from __future__ import annotations

import json
import pickle

import pytest
from PIL import Image

from spider.data import load_dataset, write_llava_json
from spider.errors import UserError


def _conv(*texts: str) -> list[dict]:
    return [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(texts)]


def _good(rid: str = "a") -> dict:
    return {"id": rid, "image": "img/a.png", "conversations": _conv("<image>\nWhat is it?", "cat")}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("L", (10, 6), 128).save(tmp_path / "img" / "a.png")  # grey: must come back RGB
    return tmp_path


def _write(folder, records) -> str:
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_reads_records_with_defaults(folder):
    rec2 = {"id": 7, "image": "img/a.png", "task": "count", "metric": "cider",
            "references": ["two", "2"],
            "conversations": _conv("Look: <image>", "ok", "How many?", "two")}  # fmt: skip
    path = _write(folder, [_good(), rec2])
    ds = load_dataset(path, split="test")
    assert len(ds) == 2 and ds.tasks == ["vqa", "count"] and ds.name == path
    a, b = ds[0], ds[1]
    assert a.image.mode == "RGB" and a.image.size == (10, 6)
    assert (a.id, a.task, a.metric, a.references) == ("a", "vqa", "exact", ["cat"])
    assert a.question == "<image>\nWhat is it?" and a.answer == "cat"
    assert b.id == "7" and len(b.turns) == 2 and b.turns[1].human == "How many?"
    assert (b.task, b.metric, b.references) == ("count", "cider", ["two", "2"])
    assert len(load_dataset(path, size=1)) == 1
    assert len(load_dataset(str(folder))) == 2  # a folder holding data.json works too


def _case(**changes):
    rec = _good("bad-one")
    for key, value in changes.items():
        if value is None:
            rec.pop(key)
        else:
            rec[key] = value
    return rec


BAD_RECORDS = {
    "missing id": (_case(id=None), "no id", 'no "id" key'),
    "missing image key": (_case(image=None), "bad-one", 'no "image" key'),
    "missing conversations": (_case(conversations=None), "bad-one", 'no "conversations"'),
    "image file missing": (_case(image="img/none.png"), "bad-one", "does not exist"),
    "no gpt turn": (_case(conversations=_conv("<image> hi")), "bad-one", "has no answer"),
    "empty answer": (_case(conversations=_conv("<image> hi", "  ")), "bad-one", "empty answer"),
    "not alternating": (
        _case(
            conversations=[{"from": "human", "value": "<image> a"}, {"from": "human", "value": "b"}]
        ),  # fmt: skip
        "bad-one",
        'should be from "gpt"',
    ),
    "starts with gpt": (
        _case(conversations=[{"from": "gpt", "value": "<image> a"}]),
        "bad-one",
        "alternate",
    ),
    "no image marker": (_case(conversations=_conv("hi", "yo")), "bad-one", "found it 0 times"),
    "marker twice": (
        _case(conversations=_conv("<image> <image> hi", "yo")),
        "bad-one",
        "found it 2 times",
    ),
    "marker in a later turn": (
        _case(conversations=_conv("hi", "yo", "<image> and?", "no")),
        "bad-one",
        "first human",
    ),
    "bad metric": (_case(metric="bleu"), "bad-one", "exact, cider"),
    "bad references": (_case(references="cat"), "bad-one", '"references"'),
    "not an object": ("just text", "no id", "not a JSON object"),
    "duplicate id": (_good("a"), "a", "repeats the id of record 0"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_file_index_and_id(folder, case):
    record, rid, reason = BAD_RECORDS[case]
    path = _write(folder, [_good("a"), record])
    with pytest.raises(UserError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert path in msg and "record 1 " in msg and rid in msg and reason in msg, msg
    assert "\n" not in msg and msg.endswith(".")


def test_malformed_json_gives_line_and_column(folder):
    path = folder / "data.json"
    path.write_text('[\n  {"id": "a",\n   "image": }\n]')
    with pytest.raises(UserError, match=r"not valid JSON: .* at line 3, column 13\.$") as err:
        load_dataset(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [('{"id": "a"}', "JSON list of records, not a dict"), ("[]", "holds no records")],
)
def test_not_a_list_or_empty(folder, content, reason):
    path = folder / "data.json"
    path.write_text(content)
    with pytest.raises(UserError, match=reason) as err:
        load_dataset(str(path))
    assert str(path) in str(err.value)


def test_unreadable_image_fails_on_access_naming_file_and_record(folder):
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    path = _write(folder, [_good("a"), _case(image="img/broken.png")])
    ds = load_dataset(path)  # existence is checked up front, decoding on access
    assert ds[0].answer == "cat"
    with pytest.raises(UserError) as err:
        ds[1]
    msg = str(err.value)
    assert path in msg and "record 1" in msg and "bad-one" in msg and "broken.png" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec", ["builtin:counting", "builtin:upstream"])
def test_export_round_trip(tmp_path, spec):
    source = load_dataset(spec, "test", size=12)
    out = write_llava_json(source, tmp_path / "out")
    assert out == tmp_path / "out" / "data.json"
    back = load_dataset(str(out))
    assert len(back) == 12 and back.tasks == source.tasks
    for x, y in zip(source, back, strict=True):
        assert (x.id, x.turns, x.task, x.metric, x.references) == (
            y.id, y.turns, y.task, y.metric, y.references)  # fmt: skip
        assert x.image.tobytes() == y.image.tobytes()  # PNG is lossless


def test_export_refuses_to_overwrite_without_force(tmp_path):
    ds = load_dataset("builtin:digit-sum", "test", size=2)
    write_llava_json(ds, tmp_path)
    with pytest.raises(UserError, match="already exists; pass --force"):
        write_llava_json(ds, tmp_path)
    write_llava_json(load_dataset("builtin:digit-sum", "test", size=3), tmp_path, force=True)
    assert len(load_dataset(str(tmp_path / "data.json"))) == 3


def test_json_dataset_pickles(folder):
    ds = load_dataset(_write(folder, [_good()]))
    assert pickle.loads(pickle.dumps(ds))[0].answer == "cat"
