"""Today's image-text-to-text families, each a tiny model built from ``transformers``' own
classes (``tiny_families.py``): the training batch is the processor's own output, the loss
the training path computes equals a direct forward on it, generation gets every tensor too,
and each family runs through the runner, evaluation and ``analysis.load_run``.

Per family the CI part is small (one batch, one runner step, one evaluated example per
split); every registered method through the runner on LLaVA-1.5 and Qwen2.5-VL is ``slow``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from tiny_families import FAMILIES, build_family

from spider.data import load_dataset
from spider.data.collate import GenerationCollator, TrainCollator
from spider.data.records import Example, Turn
from spider.errors import UserError
from spider.evaluate import generate_answers
from spider.loop import LoopHooks
from spider.models import NO_VIDEO_PROCESSOR, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Templates that write no end-of-turn marker after an answer (as LLaVA-1.5's): the collator
# puts the end-of-sequence token there so that the model learns to stop.
NO_MARKER = {"llava", "llava_next"}
SUFFIX = {"paligemma"}  # no chat template: prompt + suffix
MARKER = {"llava_onevision": "<|im_end|>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>",
          "internvl": "<|im_end|>", "idefics3": "<end_of_utterance>",
          "smolvlm": "<end_of_utterance>", "gemma3": "<end_of_turn>", "mistral3": "</s>"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(f, root / f)[0] and root / f for f in FAMILIES}


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    """An image example, a two-turn one with a wide image, and a text-only one."""
    caption = load_dataset("builtin:upstream", "train", size=1)[0]
    wide = Example(id="wide", image=Image.new("RGB", (64, 40), (200, 10, 10)), turns=[
        Turn("What color is the circle?\n<image>", "red"),  # <image> after the question
        Turn("How many shapes are there?", "two")])
    text_only = Example(id="text", image=None, turns=[Turn("What color is the square?", "blue")])
    return [caption, wide, text_only]


def _messages(example: Example, answered: bool) -> list[dict]:
    turns = example.turns if answered else example.turns[:-1]
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": [{"type": "text",
                                                   "text": turn.human.replace("<image>", "").strip()}]},
                     {"role": "assistant", "content": [{"type": "text", "text": turn.gpt}]}]
    if not answered:
        messages.append({"role": "user", "content": [
            {"type": "text", "text": example.turns[-1].human.replace("<image>", "").strip()}]})
    messages[0]["content"][:0] = [{"type": "image"}] * len(example.images)
    return messages


def _reference(family: str, processor, examples: list[Example], answered: bool) -> dict:
    """The processor's own output for ``examples``, prompts written here from the family's
    conventions (not by the collator)."""
    images = [ex.images for ex in examples]
    side = "right" if answered else "left"
    if family in SUFFIX:
        prompts = ["<image>" * len(ex.images) + "\n".join(
            [t for turn in ex.turns[:-1] for t in (turn.human.replace("<image>", "").strip(),
                                                   turn.gpt)]
            + [ex.turns[-1].human.replace("<image>", "").strip()]) for ex in examples]
        extra = {"suffix": [ex.answer for ex in examples]} if answered else {}
        out = processor(text=prompts, images=images, padding=True, padding_side=side,
                        return_tensors="pt", **extra)
        if not answered:
            out.pop("labels", None)
        return dict(out)
    eos = processor.tokenizer.eos_token
    texts = []
    for ex in examples:
        if answered and family in NO_MARKER:
            ex = Example(ex.id, ex.image, [Turn(t.human, t.gpt + eos) for t in ex.turns])
        texts.append(processor.tokenizer.apply_chat_template(
            _messages(ex, answered), chat_template=processor.chat_template, tokenize=False,
            add_generation_prompt=not answered))
    return dict(processor(text=texts, images=images, padding=True, padding_side=side,
                          return_tensors="pt"))


def _expected_labels(family: str, processor, example: Example) -> list[int]:
    tokenizer = processor.tokenizer
    turns = example.turns[-1:] if family in SUFFIX else example.turns
    marker = MARKER.get(family, tokenizer.eos_token)
    ids = []
    for turn in turns:
        ids += tokenizer(turn.gpt, add_special_tokens=False)["input_ids"]
        ids += tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_training_batch_is_the_processors_output_and_the_loss_matches(family, family_dirs,
                                                                     examples):
    model, processor = load_model(family_dirs[family])
    batch = TrainCollator(processor)(examples)
    reference = _reference(family, processor, examples, answered=True)
    reference.pop("labels", None)
    assert set(reference) <= set(batch), sorted(set(reference) - set(batch))
    for key, tensor in reference.items():
        assert torch.equal(batch[key], tensor), (family, key)
    assert set(batch) - set(reference) == {"labels"}
    loss = model(**batch).loss
    direct = model(**reference, labels=batch["labels"]).loss
    assert torch.isfinite(loss) and torch.equal(loss, direct), family
    labels = batch["labels"]
    for row, example in enumerate(examples):
        trained = labels[row][labels[row] != -100].tolist()
        assert trained == _expected_labels(family, processor, example), (family, example.id)
        assert (labels[row][batch["attention_mask"][row] == 0] == -100).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_gets_every_processor_tensor_and_answers(family, family_dirs, examples):
    model, processor = load_model(family_dirs[family])
    batch = GenerationCollator(processor)(examples)
    reference = _reference(family, processor, examples, answered=False)
    assert set(batch) == set(reference), family
    for key, tensor in reference.items():
        assert torch.equal(batch[key], tensor), (family, key)
    answers = generate_answers(model, processor, examples, batch_size=3, max_new_tokens=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize(("family", "key"), [("qwen2_5_vl", "mm_token_type_ids"),
                                             ("gemma3", "token_type_ids"),
                                             ("paligemma", "token_type_ids")])
def test_the_extra_tensors_change_what_the_model_computes(family, key, family_dirs, examples):
    """Qwen2.5-VL's rotary positions and Gemma's bidirectional attention over the image
    come from these tensors: without them the same tokens give other logits."""
    model, processor = load_model(family_dirs[family])
    batch = TrainCollator(processor)(examples[:2])
    with torch.no_grad():
        full = model(**batch).logits
        without = model(**{k: v for k, v in batch.items() if k != key}).logits
    assert (full - without).abs().max() > 1e-4


def test_a_processor_that_refuses_several_images_is_one_clear_error(family_dirs):
    _, processor = load_model(family_dirs["llava"])

    class OneImageOnly:  # as a family whose processor takes one image per prompt
        tokenizer, chat_template = processor.tokenizer, processor.chat_template

        def apply_chat_template(self, *args, **kwargs):
            return processor.apply_chat_template(*args, **kwargs)

        def __call__(self, text, images, **kwargs):
            if images and any(len(per_example) > 1 for per_example in images):
                raise ValueError("one image per prompt")
            return processor(text=text, images=images, **kwargs)

    pair = Example("pair", [Image.new("RGB", (32, 32))] * 2, [Turn("<image><image>same?", "yes")])
    with pytest.raises(UserError, match="example 'pair' has 2 images, but the processor "
                                        r"\(OneImageOnly\) could not take several images"):
        TrainCollator(OneImageOnly())([pair])


def test_video_families_load_without_torchvision(family_dirs):
    """The CPU build of torch has no torchvision that imports, so the video processor of
    Qwen2-VL, LLaVA-OneVision, InternVL and SmolVLM cannot be made: the processor is
    assembled from its image processor (PIL) and tokenizer instead."""
    import transformers.utils

    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed here: AutoProcessor loads these processors whole")
    from transformers import AutoProcessor

    with pytest.raises(Exception):  # noqa: B017 - what spider.models.load_model works around
        AutoProcessor.from_pretrained(family_dirs["qwen2_vl"], local_files_only=True)
    for family in ("qwen2_vl", "llava_onevision", "internvl", "smolvlm", "mistral3"):
        _, processor = load_model(family_dirs[family])
        assert type(processor).__name__ == json.loads(
            (family_dirs[family] / "processor_config.json").read_text())["processor_class"]
        # no video processor: at most the stand-in that refuses videos in one sentence
        assert getattr(processor, "video_processor", None) in (None, NO_VIDEO_PROCESSOR)
        assert type(processor.image_processor).__name__.endswith("Pil"), family
    _, processor = load_model(family_dirs["smolvlm"])
    with pytest.raises(UserError, match="built without torchvision.*not videos"):
        processor.video_processor([[Image.new("RGB", (32, 32))]])


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - SUFFIX))
def test_the_processor_api_works_on_every_loaded_processor(family, family_dirs):
    """What people call on a processor, whether or not it was built without torchvision:
    ``apply_chat_template`` (as text, and tokenized with the images inside the messages),
    ``__call__`` and ``decode``. SmolVLM's ``apply_chat_template`` read its video
    processor's settings and failed with an AttributeError when built without one."""
    _, processor = load_model(family_dirs[family])
    image = Image.new("RGB", (40, 32), (10, 200, 10))
    question = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What color is it?"}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert text == processor.tokenizer.apply_chat_template(
        question, chat_template=processor.chat_template, add_generation_prompt=True,
        tokenize=False)
    direct = processor(text=[text], images=[[image]], return_tensors="pt")
    with_image = [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": "What color is it?"}]}]
    tokenized = processor.apply_chat_template(with_image, add_generation_prompt=True,
                                              tokenize=True, return_dict=True,
                                              return_tensors="pt")
    assert set(direct) <= set(tokenized), family
    bos = processor.tokenizer.bos_token_id

    def body(ids):  # whether a BOS is added depends on the family's template: not compared
        ids = ids[0].tolist()
        while ids and ids[0] == bos:
            ids = ids[1:]
        return ids

    assert body(tokenized["input_ids"]) == body(direct["input_ids"]), family
    for key, value in direct.items():
        if key not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            assert torch.equal(tokenized[key], value), (family, key)
    ids = processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert processor.decode(ids).strip() == "red circle"
    assert processor.batch_decode([ids])[0].strip() == "red circle"


def test_a_processor_that_needs_torchvision_is_one_error_line_naming_it(family_dirs, tmp_path):
    import transformers.utils

    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed here")
    broken = tmp_path / "tv-only"
    shutil.copytree(family_dirs["llava"], broken)
    config_file = broken / "processor_config.json"
    config = json.loads(config_file.read_text())
    # an image processor that exists only with the torchvision backend
    config["image_processor"]["image_processor_type"] = "Cohere2VisionImageProcessor"
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="needs the torchvision package") as err:
        load_model(broken)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_remote_code_in_a_model_directory_is_never_run(family_dirs, tmp_path):
    """trust_remote_code stays off: an ``auto_map`` pointing at code in the directory is
    ignored and the family's own classes load."""
    evil = tmp_path / "evil"
    shutil.copytree(family_dirs["llava"], evil)
    marker = tmp_path / "ran"
    (evil / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.Evil",
                          "AutoProcessor": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(config))
    model, processor = load_model(evil)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor" and not marker.exists()


# ---------------------------------------------------------------------------- the runner
RUN = ["--steps", "1", "--eval-every", "1", "--save-every", "1", "--log-every", "1",
       "--eval-limit", "1", "--batch-size", "2", "--train-size", "4", "--warmup-steps", "0",
       "--device", "cpu"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_through_the_runner_evaluation_and_analysis(family, family_dirs,
                                                                     tmp_path):
    import analysis
    from spider.train import main

    out = tmp_path / "run"
    info = main(["--model", str(family_dirs[family]), "--output-dir", str(out), *RUN,
                 "--method", "spider"])
    assert info["status"] == "done"
    run = analysis.load_run(out)
    components = set(run.layers["component"])
    assert components == {"llm", "projector"}, (family, components)  # vision frozen by default
    scores = run.metrics[run.metrics["metric"] == "score"]
    assert sorted(set(scores["step"])) == [0, 1]
    assert set(scores["split"]) >= {"upstream", "downstream"}
    assert scores["value"].between(0, 1).all()


class _LossRecorder(LoopHooks):
    def __init__(self):
        self.losses: list[float] = []

    def after_step(self, step, record):
        self.losses.append(record["loss"])



@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_every_method_trains_and_keeps_its_invariants(family, family_dirs, examples):
    """Each registered method, two optimizer steps of the project's loop on a family batch:
    the loss is finite and some trainable weight moved (post-hoc methods: after finalize)."""
    from spider.loop import LoopConfig, make_optimizer, train_loop
    from spider.methods import available_methods, build_method
    from spider.models import select_trainable

    batch = TrainCollator(load_model(family_dirs[family])[1])(examples)
    for name in available_methods():
        model, _ = load_model(family_dirs[family])
        select_trainable(model)
        method = build_method(name, model)
        before = {n: p.detach().clone() for n, p in method.effective_weights().items()}
        cfg = LoopConfig(steps=2, lr=1e-2, warmup_steps=0, batch_size=3, grad_accum=1, clip=1.0,
                         weight_decay=0.0, seed=0)
        optimizer = make_optimizer(list(method.trainable_parameters()), cfg)
        hooks = _LossRecorder()
        train_loop(method.model, method, optimizer, lambda step, micro: batch, cfg, hooks)
        losses = hooks.losses
        method.finalize()
        after = method.effective_weights()
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), name
        assert any(not torch.equal(before[n], after[n]) for n in before), (family, name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_every_method_runs_through_the_runner(family, family_dirs, tmp_path):
    import analysis
    from spider.methods import available_methods
    from spider.train import main

    for name in available_methods():
        out = tmp_path / name
        info = main(["--model", str(family_dirs[family]), "--output-dir", str(out), *RUN,
                     "--steps", "2", "--method", name, "--lr", "1e-2"])
        assert info["status"] == "done", name
        run = analysis.load_run(out)
        assert set(run.layers["component"]) <= {"llm", "projector"}
        assert len(run.layers) > 0 and info["method"] == name
