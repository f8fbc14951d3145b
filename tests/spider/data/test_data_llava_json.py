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
    "marker without image": (_case(image=None), "bad-one", 'mentions <image> but has no "image"'),
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
        "has only a gpt turn",
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
        "in turn 2, a later human turn; every <image> must be in the first human turn",
    ),
    "image count and markers differ": (
        _case(image=["img/a.png", "img/a.png"]), "bad-one", "once per image (2)"),
    "image list with a non-path": (_case(image=["img/a.png", 3]), "bad-one", '"image"'),
    "id of another type": (_case(id=1.5), "1.5", "non-empty string or an integer"),
    "bad metric": (_case(metric="bleu"), "bad-one", "exact, cider"),
    "bad references": (_case(references="cat"), "bad-one", '"references"'),
    "not an object": ("just text", "no id", "not a JSON object"),
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


# ---------------------------------------------------------------------------- LLaVA's own files
def test_text_only_records_and_image_lists_load_beside_image_records(folder):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "img" / "b.png")
    text_only = {"id": 1, "conversations": _conv("What is 2+2?", "four")}
    pair = {"id": 2, "image": ["img/a.png", "img/b.png"],
            "conversations": _conv("<image>\n<image>\nSame colour?", "no")}
    ds = load_dataset(_write(folder, [_good(), text_only, pair]))
    assert ds[0].images[0].size == (10, 6) and len(ds[0].images) == 1
    assert ds[1].image is None and ds[1].images == [] and ds[1].answer == "four"
    assert [im.getpixel((0, 0)) for im in ds[2].images] == [(128, 128, 128), (0, 0, 255)]


def test_image_folder_is_the_root_of_relative_image_paths(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "train2017" / "1.jpg")
    data = tmp_path / "json" / "mix.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"id": "x", "image": "train2017/1.jpg",
                                 "conversations": _conv("<image>\nWhat?", "a")}]))
    with pytest.raises(UserError, match=r"names image .*json/train2017/1\.jpg, which does not"):
        load_dataset(str(data))  # relative to the JSON file by default
    ds = load_dataset(str(data), image_folder=str(root))
    assert ds[0].image.size == (4, 4)
    with pytest.raises(UserError, match="--image-folder .*nowhere is not a folder"):
        load_dataset(str(data), image_folder=str(tmp_path / "nowhere"))


def test_an_opening_gpt_turn_is_dropped_as_llava_does(folder):
    rec = {"id": "g", "image": "img/a.png",
           "conversations": [{"from": "gpt", "value": "Hello!"}, *_conv("<image>\nWhat?", "cat")]}
    example = load_dataset(_write(folder, [rec]))[0]
    assert [(t.human, t.gpt) for t in example.turns] == [("<image>\nWhat?", "cat")]


def test_the_image_marker_may_follow_the_question(folder):
    rec = _case(conversations=_conv("What is it?\n<image>", "cat"))
    example = load_dataset(_write(folder, [rec]))[0]
    assert example.question == "What is it?\n<image>"


def test_repeated_and_integer_ids_are_a_warning_not_an_error(folder, caplog):
    records = [_good("7"), {**_good("x"), "id": 7}, _good("7"), _good("y")]
    with caplog.at_level("WARNING", logger="spider.data.llava_json"):
        ds = load_dataset(_write(folder, records))
    assert [ds[i].id for i in range(4)] == ["7", "7", "7", "y"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "2 record(s)" in message and 'record 1 repeats id "7" of record 0' in message


def test_held_out_split_is_deterministic_disjoint_and_five_percent(folder):
    from spider.data import held_out_indices

    assert held_out_indices(40) == [10, 30]
    assert held_out_indices(100) == [int((j + 0.5) * 20) for j in range(5)]
    assert len(held_out_indices(100_000)) == 1000 and len(held_out_indices(3)) == 1
    with pytest.raises(UserError, match="too small to hold records out"):
        held_out_indices(1)
    path = _write(folder, [_good(f"r{i}") for i in range(40)])
    train = load_dataset(path, "train", hold_out=True)
    test = load_dataset(path, "test", hold_out=True)
    assert [test[i].id for i in range(len(test))] == ["r10", "r30"]
    train_ids = [train[i].id for i in range(len(train))]
    assert len(train_ids) == 38 and not {"r10", "r30"} & set(train_ids)
    again = load_dataset(path, "test", seed=5, hold_out=True)  # the seed does not move it
    assert [again[i].id for i in range(len(again))] == ["r10", "r30"]
    assert len(load_dataset(path, "test")) == 40  # without hold_out the file is whole


def test_export_round_trips_text_only_and_multi_image_examples(tmp_path):
    from spider.data.records import Example, Turn

    pictures = [Image.new("RGB", (5, 5), (i * 40, 0, 0)) for i in range(3)]
    examples = [Example("t", None, [Turn("Hi?", "hello")]),
                Example("m", pictures[:2], [Turn("<image><image>Same?", "no")]),
                Example("s", pictures[2], [Turn("<image>Red?", "yes")])]
    path = write_llava_json(examples, tmp_path / "out")
    back = load_dataset(str(path))
    assert back[0].image is None and back[0].answer == "hello"
    assert [im.getpixel((0, 0)) for im in back[1].images] == [(0, 0, 0), (40, 0, 0)]
    assert back[2].image.getpixel((0, 0)) == (80, 0, 0)
