"""Property-based checks of the LLaVA JSON reader: whatever a file holds, reading it gives a
dataset or one clear ``UserError`` sentence, never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from spider.data import load_dataset
from spider.errors import UserError

IMAGES = ("a.png", "missing.png", "sub/../a.png", "", "broken.png")

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=12)
any_json = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
texts = st.sampled_from(["<image>\nWhat?", "What?\n<image>", "<image><image>", "why", "", " ",
                         "<image> and <image>"]) | st.text(max_size=10)
turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", 3]),
                               "value": texts | json_scalars})
records = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=4) | st.integers() | json_scalars,
        "image": st.sampled_from(IMAGES) | st.lists(st.sampled_from(IMAGES), max_size=3)
        | any_json,
        "conversations": st.lists(turns, max_size=5) | any_json,
        "task": st.sampled_from(["vqa", "", 3]) | st.text(max_size=4),
        "metric": st.sampled_from(["exact", "cider", "bleu", None]) | any_json,
        "references": st.lists(st.text(max_size=4), max_size=2) | any_json,
    },
)
files = st.lists(records | any_json, max_size=5) | any_json


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("props")
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "sub").mkdir()
    return folder


def _read_everything(path) -> None:
    try:
        dataset = load_dataset(str(path))
    except UserError as err:
        assert str(err).strip() and "\n" not in str(err)
        return
    assert len(dataset) >= 1
    for i in range(len(dataset)):
        try:
            example = dataset[i]
        except UserError as err:
            assert "\n" not in str(err)
            continue
        assert example.turns and all(t.gpt.strip() for t in example.turns)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=files)
def test_any_json_file_reads_or_is_one_user_error(folder, content):
    path = folder / "data.json"
    path.write_text(json.dumps(content))
    _read_everything(path)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_bytes_read_or_are_one_user_error(folder, raw):
    path = folder / "data.json"
    path.write_bytes(raw)
    _read_everything(path)


def test_deeply_nested_json_is_a_user_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nests too deeply") as err:
        load_dataset(str(path))
    assert str(path) in str(err.value)
