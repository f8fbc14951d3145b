"""The tiny LLaVA builder, load_model's offline loading and errors, select_trainable."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from spider.errors import UserError
from spider.models import (
    WORD_PATTERN,
    load_model,
    resolve_model_path,
    select_trainable,
)
from spider.naming import parse_param_name
from spider.tiny_llava import build_tiny_llava

# A vocabulary like the built-in datasets' (kept here so these tests stand alone).
WORDS = (
    "a an the and is there of in at top bottom left right middle , . ? what which how many "
    "color shape digit describe image this sum two digits red green blue yellow orange purple "
    "circle circles square squares triangle triangles zero one two three four five six seven "
    "eight nine ten 0 1 2 3 4 5 6 7 8 9"
).split()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object, object]:
    out = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    model, processor = build_tiny_llava(WORDS, out, seed=1)
    return out, model, processor


def _image(color=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", (48, 48), (245, 245, 245))
    image.paste(color, (10, 10, 30, 30))
    return image


# ---------------------------------------------------------------------------- build + save


def test_saved_directory_loads_offline_with_auto_classes_and_gives_the_same_logits(
    saved, monkeypatch
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, model, processor = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    loaded_processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"

    text = "USER: <image>\nwhat color is the square? ASSISTANT: red"
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    inputs_again = loaded_processor(text=[text], images=[_image()], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    assert torch.allclose(inputs["pixel_values"], inputs_again["pixel_values"])
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = loaded.eval()(**inputs_again).logits
    assert torch.allclose(expected, got, atol=1e-6)


def test_saved_directory_is_small_and_holds_no_pickle(saved):
    out, _, _ = saved
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert sum(files.values()) <= 20 * 2**20


def test_default_size_is_a_few_million_parameters(saved):
    _, model, _ = saved
    count = sum(p.numel() for p in model.parameters())
    assert 1.8e6 <= count <= 5e6
    config = model.config
    assert config.vision_config.image_size == 48 and config.vision_config.patch_size == 16
    assert config.vision_feature_layer == -1


def test_same_seed_same_weights():
    a, _ = build_tiny_llava(
        ["red"], seed=3, text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1
    )
    b, _ = build_tiny_llava(
        ["red"], seed=3, text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1
    )
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_words(saved):
    _, _, processor = saved
    tok = processor.tokenizer
    text = "a red circle in the top left, a blue square at the bottom and 3 digits."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == re.findall(WORD_PATTERN, text)
    assert tok.decode(ids) == text
    assert tok.decode(tok(text.upper())["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_special_tokens(saved):
    _, _, processor = saved
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<unk>", "<s>", "</s>", "<image>")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    assert tok("red")["input_ids"] == [2, tok.convert_tokens_to_ids("red")]  # <s> in front
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok("<image>\nred</s>", add_special_tokens=False)["input_ids"] == [
        4,
        tok.convert_tokens_to_ids("red"),
        3,
    ]


def test_tokenizer_splits_like_spider_data():
    data = pytest.importorskip("spider.data")
    if not hasattr(data, "vocabulary") or not hasattr(data, "split_words"):
        pytest.skip("spider.data has no vocabulary/split_words yet")
    _, processor = build_tiny_llava(data.vocabulary(), text_layers=1, vision_layers=1)
    tok = processor.tokenizer
    for text in [
        "<image>\nWhat shape is red?",
        "a red circle, and two blue squares.",
        "How many? 12",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == data.split_words(text)
    ids = tok(" ".join(data.vocabulary()), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


# ---------------------------------------------------------------------------- processor


def test_image_marker_expands_into_one_token_per_patch(saved):
    _, model, processor = saved
    inputs = processor(
        text=["USER: <image>\nwhat digit is this? ASSISTANT:"],
        images=[_image()],
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == 4).sum()) == (48 // 16) ** 2 == 9
    assert inputs["pixel_values"].shape == (1, 3, 48, 48)
    with torch.no_grad():
        model(**inputs)  # the model agrees: as many image features as image tokens


def test_other_image_sizes_are_resized_not_cropped(saved):
    _, _, processor = saved
    wide = Image.new("RGB", (96, 48), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 48))  # a white stripe on the far left survives
    pixels = processor.image_processor(wide, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48)
    assert pixels[0, :, :, 0].mean() > pixels[0, :, :, -1].mean()


def test_chat_template_has_a_generation_prompt(saved):
    _, _, processor = saved
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: What digit is this?\n<image>\nASSISTANT:"
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "seven"}]})
    assert processor.apply_chat_template(messages).startswith(prompt + " seven</s>")


# ---------------------------------------------------------------------------- load_model


def test_load_model_loads_a_saved_directory(saved):
    out, _, _ = saved
    model, processor = load_model(resolve_model_path(out), device="cpu")
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert processor.tokenizer.convert_tokens_to_ids("red") != processor.tokenizer.unk_token_id
    model16, _ = load_model(out, dtype="bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16


def _copy_without(out: Path, dest: Path, drop: set[str]) -> Path:
    shutil.copytree(out, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


def test_load_model_errors_name_the_path(saved, tmp_path):
    from transformers import LlamaConfig

    out, _, _ = saved
    cases = {}
    cases["missing"] = tmp_path / "nowhere"
    cases["file"] = tmp_path / "weights.txt"
    cases["file"].write_text("not a model")
    cases["no-config"] = tmp_path / "empty"
    cases["no-config"].mkdir()
    cases["llama"] = tmp_path / "llama"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        cases["llama"]
    )
    cases["bad-json"] = tmp_path / "bad-json"
    cases["bad-json"].mkdir()
    (cases["bad-json"] / "config.json").write_text("{not json")
    cases["no-processor"] = _copy_without(
        out,
        tmp_path / "no-processor",
        {"processor_config.json", "tokenizer.json", "tokenizer_config.json"},
    )
    cases["no-image-processor"] = _copy_without(
        out, tmp_path / "no-image-processor", {"processor_config.json"}
    )
    cases["no-weights"] = _copy_without(out, tmp_path / "no-weights", {"model.safetensors"})
    cases["no-template"] = _copy_without(out, tmp_path / "no-template", {"chat_template.jinja"})

    messages = {}
    for case, path in cases.items():
        with pytest.raises(UserError) as err:
            load_model(path)
        messages[case] = str(err.value)
        assert str(path) in messages[case], case
        assert "\n" not in messages[case], case
    assert "does not exist" in messages["missing"]
    assert "no config.json" in messages["no-config"]
    assert "is a 'llama' model, not an image-text model (LLaVA-style)" in messages["llama"]
    assert "no tokenizer files" in messages["no-processor"]
    assert "no image processor files" in messages["no-image-processor"]
    assert "no weights" in messages["no-weights"]
    assert "no chat template" in messages["no-template"]


def test_unknown_device_or_dtype_is_a_user_error(saved):
    out, _, _ = saved
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        load_model(out, device="tpu")
    with pytest.raises(UserError, match="unknown dtype 'float13'"):
        load_model(out, dtype="float13")


# ---------------------------------------------------------------------------- select_trainable


def _numel(model, predicate) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if predicate(parse_param_name(n)))


def test_select_trainable_default_freezes_the_vision_tower(saved):
    _, model, _ = saved
    summary = select_trainable(model)
    vision = _numel(model, lambda p: p.component == "vision")
    assert summary["vision"] == {"trainable": 0, "frozen": vision}
    assert summary["llm"] == {
        "trainable": _numel(model, lambda p: p.component == "llm"),
        "frozen": 0,
    }
    assert summary["projector"]["frozen"] == 0 and summary["projector"]["trainable"] > 0
    total = sum(p.numel() for p in model.parameters())
    assert summary["total"] == {"trainable": total - vision, "frozen": vision}
    for name, param in model.named_parameters():
        assert param.requires_grad == (parse_param_name(name).component != "vision"), name


def test_select_trainable_parts_and_last_layers(saved):
    _, model, _ = saved
    summary = select_trainable(model, parts=["vision"])
    assert summary["total"]["trainable"] == summary["vision"]["trainable"] > 0
    assert summary["llm"]["trainable"] == summary["projector"]["trainable"] == 0

    summary = select_trainable(model, parts=("llm", "projector"), last_layers=1)
    last = model.config.text_config.num_hidden_layers - 1
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        n
        for n, _ in model.named_parameters()
        if parse_param_name(n).component == "projector"
        or (parse_param_name(n).component == "llm" and parse_param_name(n).layer == last)
    }
    assert summary["llm"]["trainable"] == _numel(
        model, lambda p: p.component == "llm" and p.layer == last
    )
    assert (
        "lm_head.weight" not in trained
        and "model.language_model.embed_tokens.weight" not in trained
    )
    select_trainable(model)  # leave the shared fixture as found


def test_select_trainable_attention_or_gate_up_of_every_decoder_layer(saved):
    """``attn``: q/k/v/o weights and biases of every decoder layer; ``mlp_gate_up``: gate
    and up (down frozen); both compose with other parts and with ``last_layers``."""
    _, model, _ = saved
    layers = model.config.text_config.num_hidden_layers

    def trained():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def llm_modules(modules, first=0):
        return {n for n, _ in model.named_parameters()
                if parse_param_name(n).component == "llm"
                and parse_param_name(n).layer is not None
                and parse_param_name(n).layer >= first
                and parse_param_name(n).module in modules}

    select_trainable(model, ["attn"])
    attn = llm_modules({"q_proj", "k_proj", "v_proj", "o_proj"})
    assert trained() == attn and len(attn) >= 4 * layers
    select_trainable(model, ["mlp_gate_up", "projector"])
    gate_up = llm_modules({"gate_proj", "up_proj"})
    projector = {n for n, _ in model.named_parameters()
                 if parse_param_name(n).component == "projector"}
    assert trained() == gate_up | projector and not any("down_proj" in n for n in trained())
    summary = select_trainable(model, ["attn", "mlp_gate_up"], last_layers=1)
    assert trained() == llm_modules({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj"}, first=layers - 1)
    assert summary["llm"]["frozen"] > 0 and summary["vision"]["trainable"] == 0
    with pytest.raises(UserError, match="attn"):
        select_trainable(model, ["everything"])
    with pytest.raises(UserError, match="last_layers"):
        select_trainable(model, ["projector"], last_layers=1)
    select_trainable(model)  # leave the shared fixture as found


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(parts=("llm", "text")), "unknown trainable part 'text'"),
        (dict(last_layers=99), "only 4 layers"),
        (dict(last_layers=0), "positive whole number"),
        (dict(parts=("projector",), last_layers=1), "'llm' is not a trained part"),
    ],
)
def test_select_trainable_rejects_bad_requests(saved, kwargs, message):
    _, model, _ = saved
    with pytest.raises(UserError, match=re.escape(message)):
        select_trainable(model, **kwargs)


# ---------------------------------------------------------------------------- run checkpoints


def _fake_run(tmp_path: Path, base: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A run folder written the way the runner writes one: run.json + one checkpoint."""
    from spider.rundir import WEIGHTS_GROUP, RunDir, model_reference

    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_run({"model": model_reference(base, run.path)})
    return run.write_checkpoint(3, {WEIGHTS_GROUP: weights}, {})


def test_load_model_accepts_a_run_checkpoint(saved, tmp_path):
    out, model, _ = saved
    name = "lm_head.weight"
    changed = torch.full_like(dict(model.named_parameters())[name], 0.25)
    checkpoint = _fake_run(tmp_path, out, {name: changed})
    assert resolve_model_path(checkpoint) == str(out.resolve())
    loaded, processor = load_model(checkpoint)
    assert torch.equal(dict(loaded.named_parameters())[name], changed)
    other = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(dict(loaded.named_parameters())[other],
                       dict(model.named_parameters())[other])
    assert processor.tokenizer.convert_tokens_to_ids("red") != processor.tokenizer.unk_token_id


def test_run_checkpoint_finds_its_base_model_when_moved_together(saved, tmp_path):
    out, _, _ = saved
    shutil.copytree(out, tmp_path / "bundle" / "base")
    checkpoint = _fake_run(tmp_path / "bundle" / "runs", tmp_path / "bundle" / "base", {})
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    # run.json's absolute path is stale now; the path relative to the run still holds.
    moved = tmp_path / "moved" / checkpoint.relative_to(tmp_path / "bundle")
    assert resolve_model_path(moved) == str((tmp_path / "moved" / "base").resolve())
    (tmp_path / "moved" / "base" / "config.json").unlink()
    with pytest.raises(UserError, match="base model of run .* is not at"):
        load_model(moved)


def test_run_checkpoint_with_foreign_tensors_is_a_user_error(saved, tmp_path):
    out, _, _ = saved
    checkpoint = _fake_run(tmp_path, out, {"not.a.parameter": torch.zeros(2)})
    with pytest.raises(UserError, match=r"holds tensors its base model lacks \(not.a.parameter\)"):
        load_model(checkpoint)
    bad_shape = _fake_run(tmp_path / "b", out, {"lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="lm_head.weight has shape"):
        load_model(bad_shape)


# ---------------------------------------------------------------------------- the bundled model

BUNDLED = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "tiny-llava-base"


def test_bundled_base_model_loads_offline_and_is_small(monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED, local_files_only=True)
    processor = AutoProcessor.from_pretrained(BUNDLED, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor" and processor.chat_template
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 10e6
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size <= 20 * 2**20
    card = (BUNDLED / "README.md").read_text()
    for heading in ("## Architecture", "## Training", "## Scores on the upstream test split"):
        assert heading in card
