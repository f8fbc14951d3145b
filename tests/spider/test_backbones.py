"""``python -m spider.train`` on LLaVA-style backbones other than the bundled CLIP + Llama.

Each backbone is a tiny ``LlavaForConditionalGeneration`` built here from configs (random
weights) and saved with ``save_pretrained``, with the processor and chat format its family
ships with, because that is where real models differ from the bundled one:

- SigLIP towers have no CLS token: features ``full``, no extra image token, an unused
  attention-pooling head; CLIP towers drop the CLS token (``default``) and, as in
  LLaVA-1.5, take features from the second-to-last layer, so the last layer is dead weight.
- Qwen2 speaks ChatML (``<|im_start|>``/``<|im_end|>``, ``<|im_end|>`` ends answers), adds
  no BOS, ties ``lm_head`` to the embeddings (as Qwen2-0.5B does) and has no pad token.
- Mistral uses ``[INST] ... [/INST]`` with a BOS and has no pad token either.

The vocabulary is the bundled tiny model's word-level one (plus the template tokens), so the
built-in datasets tokenize without unknown words.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from spider.models import load_model
from spider.naming import parse_param_name
from spider.rundir import RunDir
from spider.train import main

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"  # its tokenizer knows every built-in word
BACKBONES = ("siglip+qwen2", "siglip+mistral", "clip+qwen2", "clip+mistral")
IMAGE_SIZE, PATCH = 32, 16  # 2x2 = 4 image tokens whichever tower
LAYERS = 2

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %} [/INST]"
    "{% else %} {% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)
# Small and quick: 3 steps of 4 examples, 8 test examples per evaluated split.
SPIDER_RUN = ["--steps", "3", "--eval-every", "3", "--save-every", "3", "--log-every", "1",
              "--eval-limit", "8", "--batch-size", "4", "--train-size", "32", "--lr", "1e-3",
              "--warmup-steps", "0", "--device", "cpu", "--method", "spider"]
ONE_STEP = ["--steps", "1", "--eval-every", "1", "--save-every", "1", "--log-every", "1",
            "--eval-limit", "1", "--batch-size", "2", "--train-size", "4", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- the backbones
def _tokenizer(language: str):
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    if language == "qwen2":
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.bos_token = None
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A", pair="$A $B")  # Qwen2 adds no BOS
    else:
        tokenizer.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
    tokenizer.pad_token = None  # neither family ships one
    return tokenizer


def build_backbone(backbone: str, out: Path) -> Path:
    """Save a tiny LLaVA with ``backbone``'s vision tower, language model and chat format."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision, language = backbone.split("+")
    tokenizer = _tokenizer(language)
    siglip = vision == "siglip"
    vision_config = (SiglipVisionConfig if siglip else CLIPVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH)
    tied = language == "qwen2"
    text_config = (Qwen2Config if language == "qwen2" else MistralConfig)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=tied)
    strategy = "full" if siglip else "default"
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy, vision_feature_layer=-1 if siglip else -2,
        projector_hidden_act="gelu", tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = (SiglipImageProcessorPil(size=size) if siglip else
                       CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy=strategy, image_token="<image>",
        num_additional_image_tokens=0 if siglip else 1,
        chat_template=CHATML if language == "qwen2" else INST)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {name: build_backbone(name, root / name.replace("+", "-")) for name in BACKBONES}


@pytest.fixture(scope="module", params=BACKBONES)
def spider_run(request, backbone_dirs, tmp_path_factory) -> tuple[str, Path, RunDir]:
    """One real ``spider.train`` run (SPIDER, 3 steps) on the backbone."""
    model_dir = backbone_dirs[request.param]
    out = tmp_path_factory.mktemp("runs") / request.param.replace("+", "-")
    info = main(["--model", str(model_dir), "--output-dir", str(out), *SPIDER_RUN])
    assert info["status"] == "done"
    return request.param, model_dir, RunDir(out)


def _components(names) -> set[str]:
    return {parse_param_name(n).component for n in names}


# ---------------------------------------------------------------------------- SPIDER runs
def test_processor_gives_one_image_token_per_vision_feature(backbone_dirs):
    from spider.data import load_dataset
    from spider.data.collate import TrainCollator

    example = load_dataset("builtin:counting", "train", size=1)[0]
    for name, model_dir in backbone_dirs.items():
        model, processor = load_model(model_dir)
        batch = TrainCollator(processor)([example])
        n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():  # projected features, one (tokens, hidden) tensor per image
            features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        assert n_tokens == features[0].shape[0] == (IMAGE_SIZE // PATCH) ** 2, name
        # The chat format is the family's own: the answer follows its generation prompt.
        first_answer = int((batch["labels"][0] != -100).nonzero()[0])
        before = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:first_answer])
        assert before[-2:] == (["<|im_start|>", "assistant"] if "qwen2" in name
                               else ["?", "[/INST]"]), name


def test_spider_run_writes_statistics_for_exactly_the_trainable_parameters(spider_run):
    name, model_dir, run = spider_run
    info = run.read_run()
    assert info["status"] == "done" and info["method"] == "spider"
    assert info["trainable"]["vision"]["trainable"] == 0  # frozen by default
    assert info["trainable"]["llm"]["trainable"] > 0 and info["trainable"]["projector"][
        "trainable"] > 0

    base, _ = load_model(model_dir)
    expected = {n: p.numel() for n, p in base.named_parameters()
                if parse_param_name(n).component in ("llm", "projector")}
    layers = run.read_layers()
    assert sorted({r["step"] for r in layers}) == [1, 2, 3]
    for step in (1, 2, 3):
        rows = {r["param"]: r for r in layers if r["step"] == step}
        assert {p: r["numel"] for p, r in rows.items()} == expected, name
    assert sum(expected.values()) == info["trainable"]["total"]["trainable"]
    # Qwen2 ties lm_head to the embeddings: one trained tensor, listed once.
    assert ("lm_head.weight" in expected) == ("mistral" in name)
    for row in layers:
        for column in ("mask_mean", "mask_density", "importance_pre_mean",
                       "importance_ft_mean", "frac_ft_gt_pre"):
            assert 0.0 <= row[column] <= 1.0, (name, row["param"], column)
    # Some entries are pinned to theta0 and some move (ARCHITECTURE.md, "The SPIDER rule": about half get w > 0).
    last = [r for r in layers if r["step"] == 3 and r["numel"] >= 64]
    assert all(0.0 < r["mask_density"] < 1.0 for r in last), name
    scores = [e for e in run.read_events() if e["event"] == "eval" and e["metric"] == "score"]
    assert sorted({e["step"] for e in scores}) == [0, 3]
    assert all(0.0 <= e["value"] <= 1.0 for e in scores)


def test_spider_checkpoint_loads_back_trained_and_vision_untouched(spider_run):
    name, model_dir, run = spider_run
    checkpoint = run.checkpoint_dir(3)
    assert checkpoint.name == "step-000003"
    saved = load_file(checkpoint / "weights.safetensors")
    trained, _ = load_model(checkpoint)
    base, _ = load_model(model_dir)
    trained_state, base_state = trained.state_dict(), base.state_dict()

    assert set(saved) == {r["param"] for r in run.read_layers() if r["step"] == 3}
    for param, tensor in saved.items():
        assert torch.equal(trained_state[param], tensor), (name, param)
        assert not torch.equal(base_state[param], tensor), (name, param)  # it trained
    vision = [n for n in base_state if parse_param_name(n).component == "vision"]
    assert vision and all(torch.equal(trained_state[n], base_state[n]) for n in vision)
    if "qwen2" in name:  # the tied lm_head follows the trained embeddings
        assert torch.equal(trained_state["lm_head.weight"],
                           saved["model.language_model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_half_precision_checkpoint_trains_every_tensor(dtype, backbone_dirs, tmp_path):
    """Real LLaVA checkpoints are saved in float16 or bfloat16. AdamW on float16 weights
    ends in a non-finite loss (its eps, 1e-8, is 0 in float16); on bfloat16 weights it rounds away every update
    smaller than 2**-8 of the weight (all of RMSNorm's, with their weights at 1)."""
    from transformers import AutoModelForImageTextToText

    half = tmp_path / "half"
    shutil.copytree(backbone_dirs["clip+mistral"], half)
    AutoModelForImageTextToText.from_pretrained(half, dtype=dtype).save_pretrained(half)
    info = main(["--model", str(half), "--output-dir", str(tmp_path / "run"), *SPIDER_RUN])
    assert info["status"] == "done"
    rows = [r for r in RunDir(tmp_path / "run").read_layers() if r["step"] == 3]
    assert rows and [r["param"] for r in rows if not r["update_norm"] > 0] == []


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_token(backbone_dirs):
    from spider.data.collate import ensure_pad_token
    from spider.errors import UserError

    _, processor = load_model(backbone_dirs["clip+mistral"])
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token is None  # as saved, like Mistral's
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.unk_token = None
    with pytest.raises(UserError, match="no pad, end-of-sequence or unknown token"):
        ensure_pad_token(tokenizer)


# ---------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_vision_and_last_layers_select_the_right_parameters(backbone, backbone_dirs,
                                                                   tmp_path):
    model_dir = backbone_dirs[backbone]
    info = main(["--model", str(model_dir), "--output-dir", str(tmp_path / "run"), *ONE_STEP,
                 "--method", "full", "--train", "vision,llm", "--train-last-layers", "1"])
    assert info["status"] == "done"
    base, _ = load_model(model_dir)
    expected = set()
    for param, _ in base.named_parameters():
        parsed = parse_param_name(param)
        if parsed.component == "vision" or (parsed.component == "llm"
                                            and parsed.layer == LAYERS - 1):
            expected.add(param)
    params = {r["param"] for r in RunDir(tmp_path / "run").read_layers()}
    assert params == expected
    assert _components(params) == {"vision", "llm"}
    trainable = info["trainable"]
    assert trainable["projector"]["trainable"] == 0 and trainable["vision"]["frozen"] == 0
    assert trainable["llm"]["trainable"] == sum(
        p.numel() for n, p in base.named_parameters() if n in expected and "language" in n)
    # Embeddings, the final norm and lm_head stay frozen with --train-last-layers.
    assert not any("embed_tokens" in p or p.startswith("lm_head") or p.endswith("model.norm.weight")
                   for p in params)


@pytest.mark.parametrize("backbone", ["siglip+qwen2", "clip+mistral"])
def test_lora_adapts_the_decoder_projections_and_merges(backbone, backbone_dirs, tmp_path):
    model_dir = backbone_dirs[backbone]
    out = tmp_path / "run"
    info = main(["--model", str(model_dir), "--output-dir", str(out), *ONE_STEP,
                 "--method", "lora", "--option", "r=2", "--lr", "1e-2"])
    assert info["status"] == "done"
    run = RunDir(out)
    saved = load_file(run.checkpoint_dir(1) / "weights.safetensors")
    assert saved and not any("lora" in n for n in saved)
    base, _ = load_model(model_dir)
    base_state = base.state_dict()
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for layer in range(LAYERS):
        for module in projections:
            parent = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else "mlp"
            param = f"model.language_model.layers.{layer}.{parent}.{module}.weight"
            assert param in saved, param
            assert not torch.equal(saved[param], base_state[param]), param  # merged B @ A
    # LoRA trains adapters only: norms keep their pre-trained values, the tower is untouched.
    trained, _ = load_model(run.checkpoint_dir(1))
    for param, tensor in trained.state_dict().items():
        if "norm" in param or parse_param_name(param).component == "vision":
            assert torch.equal(tensor, base_state[param]), param


# ---------------------------------------------------------------------------- bad input
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "spider.train", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def _last_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_a_text_only_model_directory_is_one_error_line_naming_it(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                 intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(text_only)
    tokenizer.save_pretrained(text_only)
    result = _cli("--model", str(text_only), "--output-dir", str(tmp_path / "run"), *ONE_STEP)
    line = _last_error_line(result)
    assert str(text_only) in line and "'llama' model, not an image-text model" in line


def test_images_that_cannot_be_read_are_one_error_line_naming_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for mode, name in [("RGB", "rgb.png"), ("L", "grey.png"), ("RGBA", "alpha.png"),
                       ("P", "palette.png"), ("I;16", "sixteen.png"), ("CMYK", "cmyk.jpg")]:
        Image.new(mode, (40, 24)).save(data / name)  # any mode and size works: made RGB
    (data / "broken.png").write_bytes(b"not an image at all")
    whole = (data / "rgb.png").read_bytes()
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])
    turn = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "red"}]

    def write(images: list[str]) -> Path:
        records = [{"id": f"r{i}", "image": image, "conversations": turn}
                   for i, image in enumerate(images)]
        path = data / f"data-{len(images)}.json"
        path.write_text(json.dumps(records))
        return path

    good = write(["rgb.png", "grey.png", "alpha.png", "palette.png", "sixteen.png", "cmyk.jpg"])
    info = main(["--data", str(good), "--output-dir", str(tmp_path / "good"), *ONE_STEP])
    assert info["status"] == "done"

    for bad in ("broken.png", "truncated.png"):
        spec = write(["rgb.png", bad]) if bad == "broken.png" else write(["rgb.png", "grey.png",
                                                                          bad])
        out = tmp_path / bad
        line = _last_error_line(_cli("--data", str(spec), "--output-dir", str(out), *ONE_STEP))
        assert str(data / bad) in line and "could not be read" in line, line
        assert not (out / "run.json").exists()  # images are checked before anything is written
