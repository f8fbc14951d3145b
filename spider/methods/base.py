"""The ``Method`` contract (ARCHITECTURE.md, "Methods"), a no-op base class, and the registry.

A method is built on a model whose trainable tensors (``requires_grad=True``) it snapshots,
and is driven by any PyTorch loop through a handful of hooks::

    m = build_method("spider", model)
    outputs = model(**batch)
    loss = outputs.loss + (m.loss_penalty() or 0) + (m.output_penalty(batch, outputs) or 0)
    loss.backward(); clip_grad_norm_(...)
    m.before_optimizer_step(); optimizer.step(); m.after_optimizer_step()
    optimizer.zero_grad()
    ...
    m.finalize()

Each method lives in its own module of this package and registers itself with
``@register("name")``; ``available_methods()`` imports every module here, so a new method is
one new file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from spider.statistics import METHOD_COLUMNS

#: The per-tensor statistics a method reports (``spider.statistics.METHOD_COLUMNS``: the
#: vocabulary names, labels and pools them); NaN where a method has no such notion.
STAT_COLUMNS = METHOD_COLUMNS

#: State-key group of the mask side (w > 0) at the last logged step, for ``mask_churn``.
MASK_SIDE_GROUP = "mask_side"


@runtime_checkable
class Method(Protocol):
    """What a training loop and the runners may use. ``MethodBase`` implements every hook as
    a no-op (see its docstring for the attributes)."""

    name: ClassVar[str]
    model: nn.Module
    options: Any
    params: dict[str, nn.Parameter]
    steps_done: int
    collect_statistics: bool
    restores_weights: bool

    def loss_penalty(self) -> torch.Tensor | None: ...
    def output_penalty(self, batch: dict, outputs: Any) -> torch.Tensor | None: ...
    def before_optimizer_step(self) -> None: ...
    def after_optimizer_step(self) -> None: ...
    def finalize(self) -> None: ...
    def masks(self) -> dict[str, torch.Tensor]: ...
    def importances(self) -> dict[str, dict[str, torch.Tensor]]: ...
    def statistics(self) -> dict[str, dict[str, float]]: ...
    def compute_statistics(self) -> dict[str, dict[str, float]]: ...
    def effective_weights(self) -> dict[str, torch.Tensor]: ...
    def trainable_parameters(self) -> Iterator[nn.Parameter]: ...
    def analysis_state(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class NoOptions:
    """This method takes no options."""


class MethodBase:
    """No-op implementation of every hook; a method overrides only what it needs.

    Attributes:
        model: the module to train. Usually the model passed in; LoRA returns its PEFT wrapper.
        params: the trainable tensors at construction, by ``named_parameters()`` name.
        steps_done: number of ``after_optimizer_step`` calls, part of the state.
        collect_statistics: when True, the next update records ``statistics()`` as a by-product
            (the runner sets it on log steps so that statistics cost no extra pass).
        has_masks: False for methods with no per-weight mask (LoRA); ``masks()`` is then empty.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    has_masks: ClassVar[bool] = True
    #: True when the method is correct on FSDP2-sharded parameters (it handles shards and
    #: all-reduces whatever per-tensor quantity it needs); the runner refuses the others.
    shardable: ClassVar[bool] = False
    #: one line for the app and ``--help``: what the method does.
    summary: ClassVar[str] = ""

    def __init__(self, model: nn.Module, options: Any | None = None):
        self.model = model
        self.options = options if options is not None else self.Options()
        self.params: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
        self.steps_done = 0
        self.collect_statistics = False
        self._last_statistics: dict[str, dict[str, float]] = {}
        #: per tensor, the mask side (w > 0) when statistics were last taken (this
        #: process's shard): the reference of ``mask_churn``, part of the resumable state.
        self._logged_side: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- hooks (no-ops)
    def loss_penalty(self) -> torch.Tensor | None:
        return None

    def output_penalty(self, batch: dict, outputs: Any) -> torch.Tensor | None:
        """A loss term from a micro-batch (the model's inputs, with ``labels``) and the
        model's outputs on it (``outputs.logits``); added to that micro-batch's loss like
        the loss itself. For methods that need the data, e.g. LwF's distillation."""
        return None

    def before_optimizer_step(self) -> None:
        return None

    def after_optimizer_step(self) -> None:
        self.steps_done += 1

    def finalize(self) -> None:
        return None

    # ----------------------------------------------------------------- views
    def masks(self) -> dict[str, torch.Tensor]:
        """Current keep-weight ``w`` in [0, 1] per element; all ones for unmasked methods."""
        return {name: torch.ones_like(p, dtype=torch.float32) for name, p in self.params.items()}

    def importances(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per tensor ``{"pre": I, "ft": G}`` where the method defines them; else empty."""
        return {}

    def statistics(self) -> dict[str, dict[str, float]]:
        """Per tensor, the ``STAT_COLUMNS``; from the last update when it collected them."""
        if self._last_statistics:
            return self._last_statistics
        return self.compute_statistics()

    def compute_statistics(self) -> dict[str, dict[str, float]]:
        """Statistics from ``masks()`` and ``importances()``; one pass over every tensor.

        Taking statistics is logging them: ``mask_churn`` is measured against the mask of
        the previous call (or collected update), and this call becomes the new reference.
        """
        imps = self.importances()
        out: dict[str, dict[str, float]] = {}
        for name, w in self.masks().items():
            row = dict.fromkeys(STAT_COLUMNS, float("nan"))
            row["mask_mean"] = float(w.float().mean())
            row["mask_density"] = float((w > 0).float().mean())
            row["mask_churn"] = self.mask_churn(name, w > 0)
            if name in imps:
                pre, ft = imps[name]["pre"], imps[name]["ft"]
                row["importance_pre_mean"] = float(pre.mean())
                row["importance_ft_mean"] = float(ft.mean())
                row["frac_ft_gt_pre"] = float((ft > pre).float().mean())
                row["importance_pre_sq_mean"] = float(pre.square().mean())
                row["importance_ft_sq_mean"] = float(ft.square().mean())
                row["importance_cross_mean"] = float((pre * ft).mean())
            out[name] = row
        return out

    def mask_churn(self, name: str, side: torch.Tensor, reduce=None) -> float:
        """Share of tensor ``name``'s entries whose mask side changed since the statistics
        were last taken (NaN the first time); ``side`` (bool, ``w > 0``, this process's
        shard) becomes the new reference. ``reduce`` sums a float64 vector over the shards
        of a sharded tensor (FSDP2), so every process gets the whole tensor's share."""
        side = side.detach()
        previous = self._logged_side.get(name)
        if previous is None or previous.shape != side.shape:
            self._logged_side[name] = side.to(torch.bool, copy=True)
            return float("nan")
        counts = torch.stack([(side != previous).sum(),
                              torch.tensor(side.numel(), device=side.device)]).double()
        if reduce is not None:
            counts = reduce(counts)
        previous.copy_(side)
        changed, numel = counts.tolist()
        return changed / numel if numel else float("nan")

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The trained tensors' current values, named as in the base model's ``state_dict``
        (base model + these = the fine-tuned model). Views, not copies."""
        return {name: p.detach() for name, p in self.params.items()}

    # Whether resuming needs the weights restored from ``effective_weights`` (False when the
    # trained tensors live in the method's own state, as LoRA's adapters do).
    restores_weights: bool = True

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer should update."""
        return (p for p in self.model.parameters() if p.requires_grad)

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with ``steps_done`` and the options, determine the method's state."""
        return {}

    def analysis_state(self) -> dict[str, torch.Tensor]:
        """The state tensors a checkpoint keeps for analysis: ``extra_state`` minus copies
        of the base model's weights (the analysis reads those from the base model)."""
        return self.extra_state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method '{self.name}' has no state tensors, got {sorted(tensors)[:3]}")

    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able dict, "tensors": {key: Tensor}}``: saveable as safetensors+JSON.

        Besides ``extra_state``, the tensors hold the mask side at the last logged step
        (``mask_side/<param>``, the reference of ``mask_churn``), so that a resumed run logs
        the churn the uninterrupted run would."""
        meta = {
            "method": self.name,
            "steps_done": self.steps_done,
            "options": dataclasses.asdict(self.options),
        }
        tensors = dict(self.extra_state())
        if self._logged_side:
            from spider.distributed import as_logical

            # uint8, not bool: every collective (gathering FSDP2 shards) and file takes it
            tensors.update({f"{MASK_SIDE_GROUP}/{n}": as_logical(t.to(torch.uint8),
                                                                  self.params[n])
                            for n, t in self._logged_side.items() if n in self.params})
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("meta", {})
        if meta.get("method", self.name) != self.name:
            raise ValueError(f"state is for method '{meta.get('method')}', not '{self.name}'")
        saved_options = meta.get("options")
        if saved_options is not None and saved_options != json.loads(
            json.dumps(dataclasses.asdict(self.options))
        ):
            raise ValueError(
                f"state was saved with options {saved_options}, "
                f"this method has {dataclasses.asdict(self.options)}"
            )
        self.steps_done = int(meta.get("steps_done", 0))
        tensors = dict(state.get("tensors", {}))
        sides = {key.split("/", 1)[1]: tensors.pop(key) for key in list(tensors)
                 if key.startswith(MASK_SIDE_GROUP + "/")}
        self.load_extra_state(tensors)
        self._logged_side = {}
        # a state saved before mask_churn existed has no sides: the churn restarts (NaN)
        if sides:
            from spider.distributed import shard_of

            for name, side in sides.items():
                if name not in self.params:
                    raise ValueError(f"unknown {MASK_SIDE_GROUP} tensor '{name}' in method "
                                     "state")
                self._logged_side[name] = shard_of(side, self.params[name]).to(torch.bool,
                                                                              copy=True)


# --------------------------------------------------------------------- shared helpers
def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Frozen copy of the trainable tensors in their own dtype (theta0)."""
    return {name: p.detach().clone() for name, p in params.items()}


def check_state_tensors(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str
) -> None:
    """Raise a ValueError naming the first key that is unknown, missing or mis-shaped."""
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ValueError(f"unknown {what} tensor '{unknown[0]}' in method state")
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{what} tensor '{key}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )


# --------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[MethodBase]] = {}
_DISCOVERED = False


def register(name: str):
    """Class decorator: make a ``MethodBase`` subclass available as ``build_method(name)``."""

    def deco(cls: type[MethodBase]) -> type[MethodBase]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("spider.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"spider.methods.{info.name}")
    _DISCOVERED = True


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MethodBase]:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method '{name}'; available methods: {', '.join(available_methods())}"
        )
    return _REGISTRY[name]


def option_fields(name: str) -> list[dataclasses.Field]:
    """The option fields of a method (name, type, default, ``metadata['help']``)."""
    return list(dataclasses.fields(method_class(name).Options))


def make_options(name: str, **options: Any):
    """Build a method's options dataclass; unknown names or bad values raise ValueError."""
    cls = method_class(name)
    known = {f.name: f for f in dataclasses.fields(cls.Options)}
    for key in options:
        if key not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"unknown option '{key}' for method '{name}'; its options are: {listed}")
    coerced = {key: _coerce(name, known[key], value) for key, value in options.items()}
    return cls.Options(**coerced)


def _coerce(method: str, field: dataclasses.Field, value: Any) -> Any:
    """Accept strings (from a command line or a form) for bool/int/float options."""
    default = field.default
    if isinstance(value, str) and not isinstance(default, str) and default is not None:
        text = value.strip().lower()
        try:
            if isinstance(default, bool):
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(default, int):
                return int(text)
            if isinstance(default, float):
                return float(text)
        except ValueError:
            raise ValueError(
                f"option '{field.name}' of method '{method}' expects a "
                f"{type(default).__name__}, got '{value}'"
            ) from None
    return value


def build_method(name: str, model: nn.Module, **options: Any) -> MethodBase:
    """Build the method ``name`` on ``model``, snapshotting its trainable tensors."""
    opts = make_options(name, **options)
    return method_class(name)(model, opts)


def choice(value: str, allowed: tuple[str, ...], option: str, method: str) -> None:
    """Validate a string option against its allowed values."""
    if value not in allowed:
        raise ValueError(
            f"option '{option}' of method '{method}' must be one of {', '.join(allowed)}; "
            f"got '{value}'"
        )
