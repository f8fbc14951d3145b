"""One matrix over every registered method: the invariants that the method
contract promises (ARCHITECTURE.md, "Methods").

Only the public contract is used (build_method, the hooks, masks(), has_masks, state_dict /
load_state_dict, finalize, trainable_parameters, model), so a new method is checked by simply
registering it.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from spider.methods import Method, available_methods, build_method, method_class

METHODS = available_methods()
STEPS = 30


def snapshot_model(model: torch.nn.Module):
    """Trainable tensors (by name) with their theta0, and frozen tensors with their values."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = (p, p.detach().clone())
    return trainable, frozen


def check_masks(method, trainable) -> dict[str, torch.Tensor]:
    """(d) masks are float, finite, in [0, 1], shaped like their tensor; empty iff no masks."""
    masks = method.masks()
    if not method.has_masks:
        assert masks == {}
        return masks
    assert masks, "a method with has_masks=True returned no masks"
    for name, w in masks.items():
        assert name in trainable, f"mask for '{name}', which is not a trainable tensor"
        assert w.dtype.is_floating_point, f"{name}: mask dtype {w.dtype}"
        assert w.shape == trainable[name][0].shape, name
        assert torch.isfinite(w).all(), name
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0, name
    return masks


def check_pinned_at_theta0(masks, trainable) -> int:
    """(a) every entry with w == 0 equals theta0 exactly; returns how many such entries."""
    pinned = 0
    for name, w in masks.items():
        p, theta0 = trainable[name]
        zero = w == 0
        pinned += int(zero.sum())
        assert torch.equal(p.detach()[zero], theta0[zero]), f"{name}: pinned entries moved"
    return pinned


def check_frozen_untouched(frozen) -> None:
    """(b) tensors with requires_grad=False are bit-for-bit what they were."""
    for name, (p, before) in frozen.items():
        assert torch.equal(p.detach(), before), f"frozen tensor '{name}' changed"


def check_finite(model) -> None:
    """(g) no NaN or inf in any weight."""
    for name, p in model.named_parameters():
        assert torch.isfinite(p.detach().float()).all(), f"non-finite weight in '{name}'"


# --------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", METHODS)
def test_method_is_documented_and_follows_the_protocol(name, harness):
    cls = method_class(name)
    assert cls.summary and "\n" not in cls.summary, f"'{name}' needs a one-line summary"
    assert inspect.getdoc(cls) and inspect.getdoc(inspect.getmodule(cls))
    for field in dataclasses.fields(cls.Options):
        assert field.metadata.get("help"), f"option '{field.name}' of '{name}' has no help"
        assert field.default is not dataclasses.MISSING, f"option '{field.name}' has no default"
    method = build_method(name, harness.make_model())
    assert isinstance(method, Method)
    assert method.name == name


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_invariants(name, optimizer, harness):
    model = harness.make_model()
    original_names = [n for n, _ in model.named_parameters()]
    trainable, frozen = snapshot_model(model)
    method = build_method(name, model)
    losses = harness.train(
        method, harness.make_optimizer(method, optimizer), harness.make_batch(), STEPS
    )

    # per-tensor statistics come from the masks (ARCHITECTURE.md, "The run directory")
    assert set(method.statistics()) == set(method.masks())
    # (f) the loss falls on a repeated batch
    assert losses[-1] < 0.8 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    # (a) (d) (b) (g) after the last step
    check_pinned_at_theta0(check_masks(method, trainable), trainable)
    check_frozen_untouched(frozen)
    check_finite(method.model)

    # ... and after finalize (where the post-hoc methods act)
    method.finalize()
    check_pinned_at_theta0(check_masks(method, trainable), trainable)
    check_frozen_untouched(frozen)
    check_finite(method.model)
    # the final model has the original parameter names, whatever the method wrapped it in
    assert [n for n, _ in method.model.named_parameters()] == original_names


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_full_fine_tuning_moves_every_trainable_entry(optimizer, harness):
    model = harness.make_model()
    trainable, frozen = snapshot_model(model)
    method = build_method("full", model)
    harness.train(method, harness.make_optimizer(method, optimizer), harness.make_batch(), 5)
    method.finalize()
    for name, (p, theta0) in trainable.items():
        assert bool((p.detach() != theta0).all()), f"full FT left entries of '{name}' unchanged"
        assert torch.equal(method.masks()[name], torch.ones_like(theta0))
    check_frozen_untouched(frozen)


# --------------------------------------------------------------------- exact resume
def copy_matching(weights: dict[str, torch.Tensor], module: torch.nn.Module) -> int:
    """Copy ``weights`` into the parameters of ``module`` with the same name; return how many."""
    copied = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in weights:
                p.copy_(weights[name])
                copied += 1
    return copied


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip_resumes_exactly(name, harness):
    """(e) k steps, save, rebuild on the step-k weights, load, continue == never stopping."""
    batch, k = harness.make_batch(), 4

    straight = build_method(name, harness.make_model())
    opt = harness.make_optimizer(straight)
    harness.train(straight, opt, batch, 2 * k)

    first = build_method(name, harness.make_model())
    opt = harness.make_optimizer(first)
    harness.train(first, opt, batch, k)
    saved_state = harness.through_disk(first.state_dict())
    saved_opt = opt.state_dict()
    saved_weights = harness.weights(first.model)  # what a checkpoint holds, by model names
    del first

    # A fresh model with the step-k weights. A method that wraps the model (LoRA) names its
    # tensors differently; then nothing matches here and the base keeps its initial weights,
    # which is what a wrapper's base holds at step k (the adapters come back below).
    fresh = harness.make_model()
    n_fresh = len(list(fresh.parameters()))
    assert copy_matching(saved_weights, fresh) in (0, n_fresh)
    resumed = build_method(name, fresh)
    assert copy_matching(saved_weights, resumed.model) == len(saved_weights)
    resumed.load_state_dict(saved_state)
    opt = harness.make_optimizer(resumed)
    opt.load_state_dict(saved_opt)
    harness.train(resumed, opt, batch, k)

    def assert_same(what):
        a, b = harness.weights(straight.model), harness.weights(resumed.model)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{what}: '{key}' differs after resuming"
        ma, mb = straight.masks(), resumed.masks()
        assert ma.keys() == mb.keys()
        for key in ma:
            assert torch.equal(ma[key], mb[key]), f"{what}: mask of '{key}' differs"

    assert resumed.state_dict()["meta"] == straight.state_dict()["meta"]
    assert_same("after training")
    straight.finalize()
    resumed.finalize()
    assert_same("after finalize")


@pytest.mark.parametrize("name", METHODS)
def test_finalized_state_round_trips(name, harness):
    """A state saved after finalize, loaded on the final weights, changes nothing more."""
    method = build_method(name, harness.make_model())
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 5)
    method.finalize()
    final, masks = harness.weights(method.model), method.masks()
    state = harness.through_disk(method.state_dict())

    fresh = harness.make_model(seed=3)
    assert copy_matching(final, fresh) == len(final)
    resumed = build_method(name, fresh)
    resumed.load_state_dict(state)
    resumed.finalize()
    after = harness.weights(resumed.model)
    assert after.keys() == final.keys()
    assert all(torch.equal(after[k], final[k]) for k in final)
    assert resumed.masks().keys() == masks.keys()
    assert all(torch.equal(resumed.masks()[k], masks[k]) for k in masks)


@pytest.mark.parametrize("name", METHODS)
def test_finalize_twice_is_finalize_once(name, harness):
    method = build_method(name, harness.make_model())
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 5)
    method.finalize()
    once = harness.weights(method.model)
    method.finalize()
    twice = harness.weights(method.model)
    assert all(torch.equal(once[k], twice[k]) for k in once)


# --------------------------------------------------------------------- bf16
@pytest.mark.parametrize("name", METHODS)
def test_bf16_parameters(name, harness):
    """(h) bf16 weights train, stay bf16 and finite, pinned entries stay exactly at theta0."""
    model = harness.make_model(dtype=torch.bfloat16)
    trainable, frozen = snapshot_model(model)
    method = build_method(name, model)
    losses = harness.train(
        method, harness.make_optimizer(method), harness.make_batch(dtype=torch.bfloat16), 10
    )
    assert losses[-1] < losses[0]
    check_pinned_at_theta0(check_masks(method, trainable), trainable)
    method.finalize()
    check_pinned_at_theta0(check_masks(method, trainable), trainable)
    check_frozen_untouched(frozen)
    check_finite(method.model)
    assert all(p.dtype == torch.bfloat16 for p in method.model.parameters())


# --------------------------------------------------------------------- errors
def test_unknown_method_lists_the_available_ones(harness):
    with pytest.raises(ValueError, match="no_such_method") as err:
        build_method("no_such_method", harness.make_model())
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_lists_the_options(name, harness):
    with pytest.raises(ValueError, match="no_such_option") as err:
        build_method(name, harness.make_model(), no_such_option=1)
    for field in dataclasses.fields(method_class(name).Options):
        assert field.name in str(err.value)


def _has_typed_options(name: str) -> bool:
    return any(isinstance(f.default, (bool, int, float))
               for f in dataclasses.fields(method_class(name).Options))


@pytest.mark.parametrize("name", [m for m in METHODS if _has_typed_options(m)])
def test_unparseable_option_value_names_the_option(name, harness):
    """A number or flag given as text that is not one is refused with the option's name."""
    fields = [
        f
        for f in dataclasses.fields(method_class(name).Options)
        if isinstance(f.default, (bool, int, float))
    ]
    assert fields
    for field in fields:
        with pytest.raises(ValueError, match=f"'{field.name}'"):
            build_method(name, harness.make_model(), **{field.name: "not-a-value"})
