"""Batched greedy generation, evaluate(), and the ``python -m spider.evaluate`` command line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from spider import evaluate as evaluate_module
from spider.data.collate import TrainCollator
from spider.data.records import Example, Turn
from spider.evaluate import evaluate, generate_answers, main
from spider.tiny_llava import build_tiny_llava

WORDS = "what color is the circle ? how many squares three blue red , left of a digit .".split()


def _picture(color, box) -> Image.Image:
    image = Image.new("RGB", (48, 48), (250, 250, 250))
    image.paste(color, box)
    return image


# Different images, questions of different lengths (so left padding matters), answers of
# different lengths (so one row stops early).
EXAMPLES = [
    Example(
        "red",
        _picture((220, 20, 20), (8, 8, 30, 30)),
        [Turn("<image>\nWhat color is the circle?", "red circle")],
    ),
    Example(
        "blue",
        _picture((20, 20, 220), (20, 20, 44, 44)),
        [Turn("<image>\nHow many squares?", "three blue squares, left of a digit.")],
    ),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny LLaVA trained until it has memorised both examples (~1 s)."""
    torch.manual_seed(0)
    model, processor = build_tiny_llava(
        WORDS, text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1, seed=0
    )
    batch = TrainCollator(processor)(EXAMPLES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    model.eval()
    return model, processor


def test_generation_returns_the_learned_answers_in_order(trained):
    model, processor = trained
    examples = [EXAMPLES[0], EXAMPLES[1], EXAMPLES[1], EXAMPLES[0], EXAMPLES[1]]
    answers = generate_answers(model, processor, examples, batch_size=2)
    assert answers == [ex.answer for ex in examples]
    assert not model.training


def test_generation_of_an_untrained_model_gives_one_string_per_example():
    model, processor = build_tiny_llava(
        WORDS, text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1
    )
    model.train()
    answers = generate_answers(model, processor, EXAMPLES * 3, batch_size=4, max_new_tokens=3)
    assert len(answers) == 6 and all(isinstance(a, str) for a in answers)
    assert all(len(a.split()) <= 3 for a in answers)  # at most 3 new word tokens, nothing else
    assert model.training  # mode restored


def test_evaluate_scores_and_times(trained):
    pytest.importorskip("spider.metrics")
    model, processor = trained
    seen = []
    result = evaluate(
        model,
        processor,
        EXAMPLES * 2,
        batch_size=3,
        limit=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result["score"] == 1.0
    assert result["n"] == 3
    assert result["seconds"] > 0 and result["examples_per_second"] > 0
    assert seen == [(3, 3)]


@pytest.fixture()
def saved_dir(trained, tmp_path, monkeypatch):
    model, processor = trained
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    asked = {}

    def fake_load_dataset(spec, split="train", seed=0, size=None, image_folder=None,
                          hold_out=False):
        asked.update(spec=spec, split=split, seed=seed)
        return EXAMPLES

    import spider.data

    monkeypatch.setattr(spider.data, "load_dataset", fake_load_dataset)
    return tmp_path / "model", asked


def test_cli_prints_one_json_object_last(saved_dir, capsys):
    pytest.importorskip("spider.metrics")
    path, asked = saved_dir
    main(
        [
            "--model",
            str(path),
            "--data",
            "builtin:toy",
            "--limit",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--seed",
            "5",
        ]
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["score"] == 1.0 and result["n"] == 2
    assert result["model"] == str(path) and result["data"] == "builtin:toy"
    assert asked == {"spec": "builtin:toy", "split": "test", "seed": 5}
    assert "2/2" in captured.err


def test_cli_bad_model_path_is_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(missing), "--data", "builtin:upstream"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(missing) in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_cli_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "x", "--data", "y", "--limit", "0"])
    assert exit_info.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_every_flag_has_help():
    parser = evaluate_module._parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} >= {
        "model",
        "data",
        "split",
        "limit",
        "batch_size",
        "device",
        "seed",
    }
    assert all(a.help for a in flags)
