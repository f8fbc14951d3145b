"""``python -m spider.pretrain``: reproducible from its seed, saves a loadable model with a
model card; and the bundled base model really knows its upstream tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spider.data import load_dataset
from spider.evaluate import evaluate
from spider.models import load_model
from spider.pretrain import main

BUNDLED = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "tiny-llava-base"
TINY_RUN = ["--steps", "3", "--batch-size", "4", "--train-size", "32", "--eval-limit", "8",
            "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_seed_same_model_and_a_model_card(tmp_path, capsys):
    main(["--output-dir", str(tmp_path / "a"), "--seed", "4", *TINY_RUN])
    main(["--output-dir", str(tmp_path / "b"), "--seed", "4", *TINY_RUN])
    main(["--output-dir", str(tmp_path / "c"), "--seed", "5", *TINY_RUN])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["output_dir"] == str(tmp_path / "c")
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c
    facts = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert facts["steps"] == 3 and facts["upstream_test"]["n"] == 8
    card = (tmp_path / "a" / "README.md").read_text()
    assert "3 AdamW steps" in card and "--seed 4" in card
    model, processor = load_model(tmp_path / "a")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_an_existing_model_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "model"
    main(["--output-dir", str(out), "--seed", "1", *TINY_RUN])
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(out), "--seed", "2", *TINY_RUN])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --output-dir") and "--overwrite" in err[-1]
    assert (out / "model.safetensors").read_bytes() == before
    main(["--output-dir", str(out), "--seed", "2", "--overwrite", *TINY_RUN])
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_bundled_base_model_knows_its_upstream_tasks():
    """The committed model scores >= 0.85 on upstream test examples it never trained on."""
    model, processor = load_model(BUNDLED)
    test = load_dataset("builtin:upstream", "test")
    result = evaluate(model, processor, test, batch_size=64, limit=160)
    assert result["n"] == 160
    assert result["score"] >= 0.85, result
    assert min(task["score"] for task in result["tasks"].values()) >= 0.75, result
    card_facts = json.loads((BUNDLED / "pretrain.json").read_text())
    assert card_facts["upstream_test"]["score"] >= 0.85
    assert card_facts["train_seconds"] <= 20 * 60
