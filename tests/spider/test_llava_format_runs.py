"""A file laid out as LLaVA's own training files are, through ``spider.train``,
``spider.evaluate`` and ``spider.data``: images under ``--image-folder``, text-only records
mixed with image records, an opening gpt turn, ``<image>`` after the question, repeated
integer ids, and no ``--eval-data`` (a deterministic held-out part is evaluated instead)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from spider.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def llava_layout(tmp_path_factory):
    """``root/images/...`` and ``root/json/mix.json`` whose image paths are relative to
    ``root/images`` (as ``llava_v1_5_mix665k.json`` is to its image folder)."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images" / "coco").mkdir(parents=True)
    (root / "json").mkdir()
    records = []
    for i in range(40):
        color = list(COLORS)[i % 3]
        if i % 4 == 3:  # text-only
            records.append({"id": i // 2, "conversations": [
                {"from": "human", "value": "What color is the square?"},
                {"from": "gpt", "value": color}]})
            continue
        name = f"coco/{i:03d}.png"
        Image.new("RGB", (48, 48), COLORS[color]).save(root / "images" / name)
        question = ("What color is the circle?\n<image>" if i % 2 else
                    "<image>\nWhat color is the circle?")
        conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": color}]
        if i % 5 == 0:
            conversations.insert(0, {"from": "gpt", "value": "Hello."})  # dropped, as LLaVA does
        records.append({"id": i // 2, "image": name, "conversations": conversations})
    path = root / "json" / "mix.json"
    path.write_text(json.dumps(records))
    return root, path


def test_training_holds_out_part_of_the_file_and_says_so(llava_layout, tmp_path, capsys):
    from spider.train import main

    root, path = llava_layout
    out = tmp_path / "run"
    info = main(["--data", str(path), "--image-folder", str(root / "images"),
                 "--output-dir", str(out), "--steps", "2", "--eval-every", "2",
                 "--save-every", "2", "--log-every", "1", "--batch-size", "8",
                 "--eval-limit", "10", "--device", "cpu", "--warmup-steps", "0"])
    assert info["status"] == "done"
    run = RunDir(out).read_run()
    assert run["downstream_eval"] == {"kind": "held_out", "data": str(path), "examples": 2,
                                      "of": 40, "share": 0.05}
    assert run["config"]["image_folder"] == str(root / "images")
    downstream = [e for e in RunDir(out).read_events()
                  if e.get("event") == "eval" and e["split"] == "downstream"
                  and e["metric"] == "score"]
    assert downstream and all(e["n"] == 2 for e in downstream)  # the held-out 2, not all 40
    err = capsys.readouterr().err
    assert "2 of the 40 records" in err and "held out of training" in err


def test_an_eval_data_file_is_recorded_as_such(llava_layout, tmp_path):
    from spider.data import downstream_data

    root, path = llava_layout
    train, test, source = downstream_data(str(path), str(path), image_folder=root / "images")
    assert len(train) == len(test) == 40
    assert source == {"kind": "eval_data", "data": str(path), "examples": 40}
    assert downstream_data("builtin:counting")[2]["kind"] == "test_split"


def test_evaluate_and_show_take_the_image_folder_and_the_held_out_part(llava_layout, capsys):
    from spider.data.__main__ import main as data_main
    from spider.evaluate import main as evaluate_main

    root, path = llava_layout
    evaluate_main(["--model", "sample_checkpoints/tiny-llava-base", "--data", str(path),
                   "--image-folder", str(root / "images"), "--held-out", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and result["split"] == "held-out"
    data_main(["show", str(path), "--image-folder", str(root / "images"), "--n", "4"])
    shown = capsys.readouterr().out
    assert "40 examples" in shown and "image=none" in shown and "image=48x48" in shown
    with pytest.raises(SystemExit) as exit_info:
        data_main(["show", str(path), "--n", "1"])  # images are not beside the JSON file
    assert exit_info.value.code == 2
    assert "which does not exist" in capsys.readouterr().err
