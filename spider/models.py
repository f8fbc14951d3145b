"""Loading local image-text-to-text models, choosing what trains, and the bundled tiny LLaVA.

Any directory that ``transformers`` Auto classes load as an image-text-to-text model works
(LLaVA-1.5/NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, Gemma 3,
InternVL, Mistral 3 are tested). Nothing is downloaded: loading is ``local_files_only`` and
``trust_remote_code`` stays off, so a typo in a path is an error here rather than a hub
request, and code shipped in a model directory is never run. Processors that would need
torchvision are assembled without it (see "Processors, with or without torchvision").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from spider.data.collate import takes_suffix  # the training-example convention
from spider.data.text import WORDS
from spider.errors import UserError
from spider.naming import COMPONENTS, parse_param_name
from spider.rundir import (
    WEIGHTS_GROUP,
    base_model_dir,
    checkpoint_run,
    is_checkpoint,
    read_group,
)

TRAINABLE_PARTS = ("vision", "projector", "llm", "attn", "mlp_gate_up")
# Parts that are a subset of every language-model decoder layer (the recipes of "How to Teach
# Large Multimodal Models New Skills", Zhu et al. 2025): the modules (``parse_param_name``'s
# ``module``) whose weights and biases train.
LLM_SUBSETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),  # self-attention projections
    "mlp_gate_up": ("gate_proj", "up_proj"),  # the MLP's gate and up; down_proj stays frozen
}

# The word-splitting rule of ``spider.data.split_words`` (applied to lowercased text): runs
# of letters/digits are words, every other non-space character stands alone.
WORD_PATTERN = WORDS



# ----------------------------------------------------------------------------------------------
# Loading


def resolve_model_path(path: str | Path) -> str:
    """The model directory behind what a person passed as ``--model``: the path itself, or
    for a run checkpoint (``RUN/checkpoints/step-N``) the run's base model directory."""
    if is_checkpoint(path):
        return str(base_model_dir(checkpoint_run(path)))
    return str(path)


def _overlay_checkpoint(model, checkpoint: Path) -> None:
    """Copy a run checkpoint's trained tensors onto its freshly loaded base model."""
    weights = read_group(checkpoint, WEIGHTS_GROUP)
    state = model.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise UserError(f"checkpoint {checkpoint} holds tensors its base model lacks "
                        f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); "
                        "was the base model replaced?")
    for name, tensor in weights.items():
        if tensor.shape != state[name].shape:
            raise UserError(f"checkpoint {checkpoint}: tensor {name} has shape "
                            f"{tuple(tensor.shape)} but the base model's is "
                            f"{tuple(state[name].shape)}")
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)  # state_dict tensors share storage with the parameters


def _check_model_dir(path: Path) -> None:
    """Raise a ``UserError`` naming ``path`` unless it holds an image-text-to-text config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not path.exists():
        raise UserError(f"model directory '{path}' does not exist.")
    if not path.is_dir():
        raise UserError(f"model path '{path}' is a file, not a model directory.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"model directory '{path}' has no config.json, so it is not a saved Hugging Face model."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"could not read '{config_file}' as JSON: {err}.") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        raise UserError(f"'{config_file}' has no model_type, so the model cannot be recognised.")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(
            f"model directory '{path}' is a '{model_type}' model, not an image-text model "
            "(LLaVA-style); give a directory saved from an image-text-to-text model such as "
            "LlavaForConditionalGeneration."
        )


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None):
    """Load ``(model, processor)`` from a local image-text-to-text directory, or from a run
    checkpoint ``RUN/checkpoints/step-N`` (the run's base model with the checkpoint's trained
    tensors copied in).

    ``device`` is ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when available); ``dtype``
    a ``torch.dtype`` or its name (``"bfloat16"``), ``None`` for the checkpoint's own. The model
    comes back in eval mode; the caller switches to train mode when training.
    """
    from transformers import AutoModelForImageTextToText, ProcessorMixin

    checkpoint = Path(path) if is_checkpoint(path) else None
    path = Path(resolve_model_path(path))
    target = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    _check_model_dir(path)
    _check_model_files(path)
    processor = load_processor(path)
    if (
        not isinstance(processor, ProcessorMixin)
        or getattr(processor, "image_processor", None) is None
    ):
        raise UserError(
            f"model directory '{path}' has a tokenizer but no image processor, so images "
            "cannot be prepared for it."
        )
    tokenizer = getattr(processor, "tokenizer", None)
    if (
        processor.chat_template is None
        and getattr(tokenizer, "chat_template", None) is None
        and not takes_suffix(processor)
    ):
        raise UserError(
            f"model directory '{path}' has no chat template (chat_template.jinja), which is "
            "needed to format questions the way the model was trained."
        )

    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, **kwargs
        )
    except ImportError as err:
        raise UserError(_missing_package(path, "model", err)) from None
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the model in '{path}': {_first_sentence(err)}") from None
    if checkpoint is not None:
        _overlay_checkpoint(model, checkpoint)
    model.to(target)
    model.eval()
    return model, processor


# ----------------------------------------------------------------------------------------------
# Processors, with or without torchvision
#
# transformers' processors load their image processor with the torchvision backend when it is
# installed and with PIL otherwise, but a processor that also handles video insists on a video
# processor, which needs torchvision, and Pixtral's processor module imports its torchvision
# image processor. With the CPU build of torch there is no torchvision that imports (PyPI's
# wheel is built against the CUDA build). Spiderscope trains on images only, so such a
# processor is assembled from its parts through public APIs: the tokenizer, the family's PIL
# image processor, the saved processor settings and chat template, and no video processor.


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


_WITHOUT_VIDEO: dict[type, type] = {}


class NoVideoProcessor:
    """Stands in for the video processor of a processor built without torchvision.

    The family's own methods read its settings on image-only paths too (SmolVLM's
    ``apply_chat_template`` sets ``num_frames`` and ``fps`` from it): every public setting
    reads as ``None``, which those paths pass along unused. Given videos, it refuses them in
    one sentence instead of failing deep inside ``transformers``.
    """

    @property
    def model_input_names(self) -> list[str]:  # what some processors add up: none here
        return []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def __call__(self, *args, **kwargs):
        raise UserError("this processor was built without torchvision (not installed), so it "
                        "takes images and text only, not videos.")

    def __repr__(self) -> str:
        return "NoVideoProcessor()"


NO_VIDEO_PROCESSOR = NoVideoProcessor()


def without_video_processor(processor_class: type) -> type:
    """``processor_class`` without its video part (image-only use, no torchvision needed).

    Every other behaviour is the family's own: the subclass only leaves ``video_processor``
    out of the processor's parts (its constructor then ignores the ``None`` given for it,
    and saving writes the other parts), and keeps the class name so a processor saved from
    it loads back as the family's processor. Its ``video_processor`` is
    :data:`NO_VIDEO_PROCESSOR`, so the family's methods that read video settings
    (``apply_chat_template`` of SmolVLM) still work on images and text.
    """
    if "video_processor" not in processor_class.get_attributes():
        return processor_class
    if processor_class not in _WITHOUT_VIDEO:

        @classmethod
        def get_attributes(cls):
            return [a for a in processor_class.get_attributes() if a != "video_processor"]

        _WITHOUT_VIDEO[processor_class] = type(processor_class.__name__, (processor_class,), {
            "get_attributes": get_attributes,
            "video_processor": NO_VIDEO_PROCESSOR,
            "__doc__": f"{processor_class.__name__} without a video processor (images only).",
        })
    return _WITHOUT_VIDEO[processor_class]


def _processor_module(class_name: str):
    """The module that defines ``class_name`` (a processor class of ``transformers``)."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for model_type, name in PROCESSOR_MAPPING_NAMES.items():
        if name == class_name:
            module = model_type_to_module_name(model_type)
            try:
                return importlib.import_module(f"transformers.models.{module}.processing_{module}")
            except ModuleNotFoundError as err:
                if err.name != "torchvision":
                    continue
                return _import_with_pil_image_processing(module)
    return None


def image_only_processor_class(class_name: str) -> type | None:
    """The ``transformers`` processor class ``class_name``, importable and constructible
    without torchvision (see :func:`without_video_processor`); ``None`` if unknown."""
    module = _processor_module(class_name)
    found = getattr(module, class_name, None) if module is not None else None
    return without_video_processor(found) if isinstance(found, type) else None


def _import_with_pil_image_processing(module: str):
    """Import ``processing_<module>`` whose module imports the torchvision image processor
    (for a helper function): the PIL twin module stands in while it is imported, then goes."""
    import importlib
    import sys

    base = f"transformers.models.{module}"
    tv_name, pil_name = f"{base}.image_processing_{module}", f"{base}.image_processing_pil_{module}"
    try:
        pil_module = importlib.import_module(pil_name)
    except ModuleNotFoundError:
        return None
    sys.modules[tv_name] = pil_module
    try:
        return importlib.import_module(f"{base}.processing_{module}")
    except ModuleNotFoundError:
        return None
    finally:
        if sys.modules.get(tv_name) is pil_module:
            del sys.modules[tv_name]


def _processor_class_name(path: Path) -> str | None:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                found = json.loads(file.read_text()).get("processor_class")
            except (OSError, ValueError, AttributeError):
                found = None
            if isinstance(found, str):
                return found
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return PROCESSOR_MAPPING_NAMES.get(model_type)


def _assemble_processor(path: Path):
    """The processor of ``path`` built from its tokenizer and PIL image processor, without a
    video processor (see above); ``None`` when the family cannot be built that way."""
    from transformers import AutoImageProcessor, AutoTokenizer

    class_name = _processor_class_name(path)
    processor_class = image_only_processor_class(class_name) if class_name else None
    if processor_class is None:
        return None
    family_class = processor_class.__mro__[1] if processor_class in _WITHOUT_VIDEO.values() \
        else processor_class
    parts = []
    for attribute in family_class.get_attributes():  # in the constructor's order
        if attribute == "video_processor":
            parts.append(None)
            continue
        if attribute == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                       trust_remote_code=False))
        elif attribute == "image_processor":
            parts.append(AutoImageProcessor.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, backend="pil"))
        else:
            return None  # an audio part or the like: not an image-text processor
    processor_dict, init_kwargs = processor_class.get_processor_dict(path, local_files_only=True)
    return processor_class.from_args_and_dict(parts, processor_dict, **init_kwargs)


def _missing_package(path: Path, what: str, err: ImportError) -> str:
    name = getattr(err, "name", None)
    text = str(err)
    if not name:
        for candidate in ("torchvision", "num2words", "timm", "einops", "sentencepiece"):
            if candidate in text.lower():
                name = candidate
                break
    if name == "torchvision":
        return (f"the {what} of '{path}' needs the torchvision package, which is not installed "
                "(no torchvision wheel imports beside the CPU build of torch).")
    if name:
        return f"the {what} of '{path}' needs the Python package '{name}', which is not installed."
    return f"could not load the {what} of '{path}': {_first_sentence(err)}"


def load_processor(path: str | Path):
    """The processor of a local model directory (``trust_remote_code`` off, no downloads).

    ``AutoProcessor`` first; where it fails because torchvision is missing, the processor is
    assembled from the family's PIL image processor and tokenizer without a video part.
    A package that is still missing is a ``UserError`` naming it.
    """
    from transformers import AutoProcessor

    path = Path(path)
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as err:
        failure = err
    if not _torchvision_available():
        try:
            assembled = _assemble_processor(path)
        except ImportError as err:
            raise UserError(_missing_package(path, "processor", err)) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            assembled = None
        if assembled is not None:
            return assembled
    if isinstance(failure, ImportError):
        raise UserError(_missing_package(path, "processor", failure)) from None
    if "torchvision" in str(failure) and not _torchvision_available():
        # e.g. "Could not load any image processor class ... Missing optional dependencies:
        # torchvision": an image processor that exists only with the torchvision backend
        raise UserError(_missing_package(path, "processor", ImportError(name="torchvision")))
    raise UserError(
        f"could not load the processor of '{path}': {_first_sentence(failure)}"
    ) from None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise UserError(f"unknown dtype '{dtype}'; use e.g. float32, bfloat16 or float16.")
    return resolved


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for but CUDA is not available here.")
    return resolved


def _first_sentence(err: BaseException) -> str:
    """The first sentence of a library's (often many-sentence) error message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text.split(". ")[0].rstrip(".") + "."


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "tekken.json",
)
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_model_files(path: Path) -> None:
    """Name the missing piece of a model directory before ``transformers`` gets to it."""
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"model directory '{path}' has no weights (model.safetensors).")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"model directory '{path}' has no tokenizer files (tokenizer.json).")
    if not any((path / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        raise UserError(
            f"model directory '{path}' has no image processor files (preprocessor_config.json "
            "or processor_config.json)."
        )


# ----------------------------------------------------------------------------------------------
# What trains


def is_trained(info, parts: Iterable[str], first_trained_layer: int | None = None) -> bool:
    """Whether a parameter (``parse_param_name``'s ``info``) trains under ``parts`` (the
    ``--train`` parts), its language-model layers narrowed to ``first_trained_layer`` on: the
    rule of :func:`select_trainable`, without a model (the analysis applies it to the names
    in a base model's file header)."""
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    train = info.component in parts or (
        info.component == "llm" and info.layer is not None
        and any(info.module in LLM_SUBSETS[part] for part in parts if part in LLM_SUBSETS))
    if train and info.component == "llm" and first_trained_layer is not None:
        train = info.layer is not None and info.layer >= first_trained_layer
    return train


def select_trainable(
    model: torch.nn.Module,
    parts: Iterable[str] = ("llm", "projector"),
    last_layers: int | None = None,
) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` per parameter by component; return counts of elements.

    The default trains the language model and the projector and freezes the vision tower, as
    the SPIDER authors fine-tune LLaVA. ``attn`` trains only the q/k/v/o projections (weights
    and biases) of every language-model decoder layer, ``mlp_gate_up`` only the MLP's gate and
    up projections (``LLM_SUBSETS``); both compose with the other parts. ``last_layers=N``
    narrows the language model (or its ``attn``/``mlp_gate_up`` subsets) to its last N
    decoder blocks (embeddings, final norm and ``lm_head`` then stay frozen).
    Parameters whose component is ``other`` are frozen.

    Returns ``{component: {"trainable": n, "frozen": n}}`` for every component plus a
    ``"total"`` entry, counting elements (``numel``), not tensors.
    """
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in TRAINABLE_PARTS]
    if unknown:
        raise UserError(
            f"unknown trainable part '{unknown[0]}'; choose from {', '.join(TRAINABLE_PARTS)}."
        )

    named = list(model.named_parameters())
    parsed = {name: parse_param_name(name) for name, _ in named}
    first_trained_layer = None
    if last_layers is not None:
        if not {"llm", *LLM_SUBSETS} & set(parts):
            raise UserError(
                "last_layers narrows the language model, but 'llm' is not a trained part "
                f"(nor {' or '.join(LLM_SUBSETS)})."
            )
        llm_layers = {
            p.layer for p in parsed.values() if p.component == "llm" and p.layer is not None
        }
        if isinstance(last_layers, bool) or not isinstance(last_layers, int) or last_layers < 1:
            raise UserError(f"last_layers must be a positive whole number, not {last_layers!r}.")
        if last_layers > len(llm_layers):
            raise UserError(
                f"last_layers={last_layers} but the language model has only {len(llm_layers)} layers."
            )
        first_trained_layer = max(llm_layers) + 1 - last_layers

    summary = {c: {"trainable": 0, "frozen": 0} for c in (*COMPONENTS, "total")}
    for name, param in named:
        info = parsed[name]
        train = is_trained(info, parts, first_trained_layer)
        param.requires_grad_(train)
        key = "trainable" if train else "frozen"
        summary[info.component][key] += param.numel()
        summary["total"][key] += param.numel()
    return summary
