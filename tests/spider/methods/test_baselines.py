"""Numbers each baseline must get right, recomputed here from the rule it cites."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spider.methods import build_method

HALF_UP = lambda ratio, numel: math.floor(ratio * numel + 0.5)  # noqa: E731


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_delta(method, deltas: dict[str, torch.Tensor]) -> None:
    """Pretend training happened: p <- p + delta."""
    with torch.no_grad():
        for name, p in method.params.items():
            p.add_(deltas[name])


class Wide(nn.Module):
    """One large-ish tensor, so that random fractions are measurable (4096 entries)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64, bias=False)
        self.frozen = nn.Linear(64, 64, bias=False)
        self.frozen.requires_grad_(False)


def wide_model(quarters: bool = False) -> Wide:
    torch.manual_seed(0)
    model = Wide()
    if quarters:  # multiples of 1/4: sums and x10 below are exact in float32
        with torch.no_grad():
            model.proj.weight.copy_(torch.randint(-16, 16, (64, 64)) / 4)
    return model


# --------------------------------------------------------------------- magnitude_mask
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_magnitude_mask_pins_exactly_the_top_ratio_by_abs_theta0(ratio, harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("magnitude_mask", model, ratio=ratio)
    masks = method.masks()
    for name, t in theta0.items():
        k = HALF_UP(ratio, t.numel())
        expected = torch.zeros(t.numel(), dtype=torch.bool)
        expected[torch.topk(t.abs().flatten(), k).indices] = True
        assert torch.equal(masks[name] == 0, expected.view(t.shape)), name
        assert int((masks[name] == 0).sum()) == k

    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 10)
    for name, p in method.params.items():
        pinned = masks[name] == 0
        assert torch.equal(p.detach()[pinned], theta0[name][pinned])
        assert bool((p.detach()[~pinned] != theta0[name][~pinned]).all()), "free entries must train"


# --------------------------------------------------------------------- random_mask
def test_random_mask_is_seeded_reproducible_and_pins_about_ratio(harness):
    def pinned(seed, ratio=0.5):
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        m = build_method("random_mask", wide_model(), seed=seed, ratio=ratio)
        return m.masks()["proj.weight"] == 0

    a, b, c = pinned(0), pinned(0), pinned(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.sum()) == 2048 and int(c.sum()) == 2048
    assert 0.4 < float((a & c).float().mean()) / 0.5 < 0.6, "two seeds should overlap ~half"
    assert int(pinned(0, ratio=0.3).sum()) == HALF_UP(0.3, 4096)
    # not the magnitude mask in disguise: about half of the top-|theta0| entries are pinned
    w = wide_model().proj.weight.detach().abs().flatten()
    top = torch.zeros(4096, dtype=torch.bool)
    top[torch.topk(w, 2048).indices] = True
    assert 0.4 < float(a.flatten()[top].float().mean()) < 0.6


# --------------------------------------------------------------------- l2
def test_l2_penalty_value_and_gradient(harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("l2", model, lam=0.01)
    assert float(method.loss_penalty().detach()) == 0.0
    generator = torch.Generator().manual_seed(3)
    deltas = {n: torch.randn(t.shape, generator=generator) for n, t in theta0.items()}
    set_delta(method, deltas)

    penalty = method.loss_penalty()
    expected = 0.01 * sum(float((d.double() ** 2).mean()) for d in deltas.values())
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for name, p in method.params.items():
        delta = p.detach() - theta0[name]
        torch.testing.assert_close(p.grad, 2 * 0.01 * delta / p.numel())
    assert all(torch.equal(w, torch.ones_like(w)) for w in method.masks().values())


# --------------------------------------------------------------------- dare
def test_dare_keeps_about_10_percent_and_rescales_by_exactly_10():
    model = wide_model(quarters=True)
    theta0 = trainable(model)["proj.weight"]
    method = build_method("dare", model, seed=7)
    assert torch.equal(method.masks()["proj.weight"], torch.ones(64, 64))
    delta = torch.randint(-8, 8, (64, 64)) / 4
    set_delta(method, {"proj.weight": delta})
    method.finalize()

    p = model.proj.weight.detach()
    kept = method.masks()["proj.weight"] == 1
    assert 0.08 < float(kept.float().mean()) < 0.12
    assert torch.equal(p[kept], (theta0 + 10 * delta)[kept])
    assert torch.equal(p[~kept], theta0[~kept])

    method.finalize()  # a second call must not rescale again
    assert torch.equal(model.proj.weight.detach(), p)

    again = build_method("dare", wide_model(quarters=True), seed=7)
    set_delta(again, {"proj.weight": delta})
    again.finalize()
    assert torch.equal(again.masks()["proj.weight"], method.masks()["proj.weight"])
    other = build_method("dare", wide_model(quarters=True), seed=8)
    other.finalize()
    assert not torch.equal(other.masks()["proj.weight"], method.masks()["proj.weight"])


def test_dare_p_drop_option():
    model = wide_model(quarters=True)
    theta0 = trainable(model)["proj.weight"]
    method = build_method("dare", model, p_drop=0.5)
    set_delta(method, {"proj.weight": torch.full((64, 64), 0.25)})
    method.finalize()
    kept = method.masks()["proj.weight"] == 1
    assert 0.45 < float(kept.float().mean()) < 0.55
    assert torch.equal(model.proj.weight.detach()[kept], (theta0 + 0.5)[kept])


# --------------------------------------------------------------------- wise_ft
@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_wise_ft_interpolates_exactly(alpha, harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("wise_ft", model, alpha=alpha)
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 5)
    tuned = trainable(model)
    method.finalize()
    method.finalize()
    for name, p in method.params.items():
        expected = theta0[name] + alpha * (tuned[name] - theta0[name])
        assert torch.equal(p.detach(), expected), name
        assert torch.equal(method.masks()[name], torch.full_like(p, alpha))


# --------------------------------------------------------------------- tailor
def test_tailor_keeps_the_top_10_percent_by_fisher_salience(harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("tailor", model)
    fisher = {n: torch.zeros_like(t) for n, t in theta0.items()}

    def record_grad_squares(m):  # called after optimizer.step(): gradients are the clipped ones
        for name, p in m.params.items():
            fisher[name] += p.grad.float() ** 2

    harness.train(
        method, harness.make_optimizer(method), harness.make_batch(), 12, record_grad_squares
    )
    tuned = trainable(model)
    method.finalize()

    total_kept = 0
    for name, p in method.params.items():
        delta = tuned[name] - theta0[name]
        salience = (0.5 * fisher[name] * delta**2).flatten()
        k = HALF_UP(0.1, salience.numel())
        expected = torch.zeros_like(salience, dtype=torch.bool)
        expected[torch.topk(salience, k).indices] = True
        expected = expected.view(p.shape)
        kept = method.masks()[name] == 1
        assert torch.equal(kept, expected), name
        assert torch.equal(p.detach()[kept], tuned[name][kept])
        assert torch.equal(p.detach()[~kept], theta0[name][~kept])
        total_kept += int(kept.sum())
    assert total_kept == sum(HALF_UP(0.1, t.numel()) for t in theta0.values())


def test_tailor_magnitude_score_keeps_the_largest_changes(harness):
    model = wide_model(quarters=True)
    theta0 = trainable(model)["proj.weight"]
    method = build_method("tailor", model, score="magnitude", keep_ratio=0.25)
    set_delta(
        method, {"proj.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(5))}
    )
    delta = model.proj.weight.detach() - theta0
    method.finalize()
    p = model.proj.weight.detach()
    threshold = delta.abs().flatten().kthvalue(4096 - 1024).values  # 1024 largest |delta| kept
    kept = method.masks()["proj.weight"] == 1
    assert int(kept.sum()) == 1024
    assert torch.equal(kept, delta.abs() > threshold)
    assert torch.equal(p[~kept], theta0[~kept])


# --------------------------------------------------------------------- hft
def test_hft_frozen_half_stays_at_theta0_in_a_single_round(harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("hft", model)
    masks = method.masks()
    for w in masks.values():
        assert int((w == 0).sum()) == HALF_UP(0.5, w.numel())
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 12)
    for name, p in method.params.items():
        frozen = method.masks()[name] == 0
        assert torch.equal(method.masks()[name], masks[name]), "one round: the half never changes"
        assert torch.equal(p.detach()[frozen], theta0[name][frozen])
        assert bool((p.detach()[~frozen] != theta0[name][~frozen]).all())


def test_hft_draws_a_new_half_each_round_anchored_at_the_round_start(harness):
    model = harness.make_model()
    theta0 = trainable(model)
    method = build_method("hft", model, round_steps=3)
    history = []  # (masks, weights) after each step
    harness.train(
        method,
        harness.make_optimizer(method),
        harness.make_batch(),
        6,
        lambda m: history.append((m.masks(), trainable(m.model))),
    )
    # history[i] is after step i + 1; round 2 starts right after step 3
    round1, round2 = history[1][0], history[4][0]
    assert all(torch.equal(history[0][0][n], round1[n]) for n in round1)
    assert all(torch.equal(history[2][0][n], round2[n]) for n in round2)
    for name, p in method.params.items():
        # the round-1 half held theta0 up to the last step of round 1 (step 3)...
        frozen1 = history[2][1][name][round1[name] == 0]
        assert torch.equal(frozen1, theta0[name][round1[name] == 0])
        # ... round 2 froze a different half, at its value when round 2 began (after step 3)
        assert not torch.equal(round1[name], round2[name])
        frozen2 = round2[name] == 0
        assert int(frozen2.sum()) == HALF_UP(0.5, p.numel())
        assert torch.equal(history[4][1][name][frozen2], history[2][1][name][frozen2])


def test_hft_resumes_exactly_across_a_round_boundary(harness):
    batch = harness.make_batch()
    straight = build_method("hft", harness.make_model(), round_steps=3)
    harness.train(straight, harness.make_optimizer(straight), batch, 8)

    first = build_method("hft", harness.make_model(), round_steps=3)
    opt = harness.make_optimizer(first)
    harness.train(first, opt, batch, 4)
    state, opt_state, weights = (
        harness.through_disk(first.state_dict()),
        opt.state_dict(),
        harness.weights(first.model),
    )
    fresh = harness.make_model(seed=5)
    fresh.load_state_dict(weights)
    resumed = build_method("hft", fresh, round_steps=3)
    resumed.load_state_dict(state)
    opt = harness.make_optimizer(resumed)
    opt.load_state_dict(opt_state)
    harness.train(resumed, opt, batch, 4)
    for name, p in resumed.params.items():
        assert torch.equal(p, straight.params[name]), name


# --------------------------------------------------------------------- tailor / dare resume
def test_tailor_state_carries_the_fisher_sums(harness):
    batch = harness.make_batch()
    straight = build_method("tailor", harness.make_model())
    harness.train(straight, harness.make_optimizer(straight), batch, 6)
    first = build_method("tailor", harness.make_model())
    opt = harness.make_optimizer(first)
    harness.train(first, opt, batch, 3)
    state = harness.through_disk(first.state_dict())
    assert any(key.startswith("fisher/") for key in state["tensors"])
    fresh = harness.make_model()
    fresh.load_state_dict(harness.weights(first.model))
    resumed = build_method("tailor", fresh)
    resumed.load_state_dict(state)
    opt2 = harness.make_optimizer(resumed)
    opt2.load_state_dict(opt.state_dict())
    harness.train(resumed, opt2, batch, 3)
    straight.finalize()
    resumed.finalize()
    for name, w in straight.masks().items():
        assert torch.equal(w, resumed.masks()[name])
        assert torch.equal(straight.params[name], resumed.params[name])


def test_state_of_another_shape_or_method_is_refused(harness):
    method = build_method("magnitude_mask", harness.make_model())
    state = method.state_dict()
    bad = dict(state["tensors"])
    bad["theta0/embed.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="embed.weight"):
        build_method("magnitude_mask", harness.make_model()).load_state_dict(
            {"meta": state["meta"], "tensors": bad}
        )
    missing = {k: v for k, v in state["tensors"].items() if k != "pinned/hidden.bias"}
    with pytest.raises(ValueError, match="hidden.bias"):
        build_method("magnitude_mask", harness.make_model()).load_state_dict(
            {"meta": state["meta"], "tensors": missing}
        )
    with pytest.raises(ValueError, match="magnitude_mask"):
        build_method("random_mask", harness.make_model()).load_state_dict(state)


# --------------------------------------------------------------------- lora
def test_lora_trains_only_adapters_and_merges_them(harness):
    model = harness.make_model()
    original = harness.weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    method = build_method("lora", model, r=4, alpha=8)
    assert method.has_masks is False and method.masks() == {}
    adapted = ("embed", "hidden")  # the trainable Linears; lm_head excluded, frozen not trainable
    assert set(method.params) == {
        f"base_model.model.{module}.lora_{ab}.default.weight" for module in adapted for ab in "AB"
    }
    assert [id(p) for p in method.trainable_parameters()] == [id(p) for p in method.params.values()]

    adapters0 = {n: p.detach().clone() for n, p in method.params.items()}
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 10)
    for name, p in method.params.items():
        if ".lora_B." in name:  # B starts at 0; A gets gradient once B is non-zero
            assert not torch.equal(p.detach(), adapters0[name]), name
    base_now = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    for name, p in base_now.items():
        assert torch.equal(p.detach(), original[name.replace("base_layer.", "")]), name

    expected = {}
    for module in ("embed", "hidden"):
        a = method.params[f"base_model.model.{module}.lora_A.default.weight"].detach()
        b = method.params[f"base_model.model.{module}.lora_B.default.weight"].detach()
        expected[f"{module}.weight"] = original[f"{module}.weight"] + (b @ a) * (8 / 4)
    method.finalize()

    merged = harness.weights(method.model)
    assert list(merged) == list(original)
    assert {n: p.requires_grad for n, p in method.model.named_parameters()} == flags
    for name, tensor in merged.items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
            assert not torch.equal(tensor, original[name])
        else:
            assert torch.equal(tensor, original[name]), name


def test_lora_state_restores_the_adapters(harness):
    method = build_method("lora", harness.make_model())
    harness.train(method, harness.make_optimizer(method), harness.make_batch(), 5)
    state = harness.through_disk(method.state_dict())
    resumed = build_method("lora", harness.make_model(seed=0))
    resumed.load_state_dict(state)
    for name, p in method.params.items():
        assert torch.equal(p, resumed.params[name]), name
    method.finalize()
    resumed.finalize()
    pairs = zip(method.model.named_parameters(), resumed.model.named_parameters(), strict=True)
    for (n1, p1), (n2, p2) in pairs:
        assert n1 == n2 and torch.equal(p1, p2)


def test_lora_target_option(harness):
    method = build_method("lora", harness.make_model(), target="hidden")
    assert {n.split(".lora_")[0] for n in method.params} == {"base_model.model.hidden"}
    with pytest.raises(ValueError, match="'target'"):
        build_method("lora", harness.make_model(), target="frozen")  # not trainable


# --------------------------------------------------------------------- option validation
@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("magnitude_mask", "ratio", 1.5),
        ("magnitude_mask", "ratio", float("nan")),
        ("random_mask", "ratio", -0.1),
        ("random_mask", "seed", -1),
        ("l2", "lam", -1e-3),
        ("l2", "lam", float("inf")),
        ("dare", "p_drop", 1.0),
        ("dare", "seed", 0.5),
        ("wise_ft", "alpha", 1.5),
        ("tailor", "keep_ratio", 2.0),
        ("tailor", "score", "gradient"),
        ("hft", "ratio", 1.01),
        ("hft", "round_steps", -3),
        ("lora", "r", 0),
        ("lora", "alpha", 0.0),
        ("lora", "dropout", 1.0),
    ],
)
def test_bad_option_value_names_the_option(name, option, value, harness):
    with pytest.raises(ValueError, match=f"option '{option}' of method '{name}'"):
        build_method(name, harness.make_model(), **{option: value})


# --------------------------------------------------------------------- a real LLaVA model
def tiny_llava():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=63, image_seq_length=4,
        vision_feature_layer=-1,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)  # the usual LLaVA recipe: vision frozen
    ids = torch.tensor([[1, 63, 63, 63, 63, 5, 6, 7, 8, 9]])  # 4 image tokens (2x2 patches)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, ids, pixels


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["lora", "magnitude_mask"])
def test_methods_on_a_tiny_llava(name):
    model, ids, pixels = tiny_llava()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    vision = [n for n in original if ".vision_tower." in n]
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    method = build_method(name, model)
    if name == "lora":  # every trainable Linear is adapted: projector and language model
        prefix, suffix = "base_model.model.", ".lora_A.default.weight"
        adapted = {n[len(prefix) : -len(suffix)] for n in method.params if n.endswith(suffix)}
        assert adapted == {n for n in linears if ".vision_tower." not in n and n != "lm_head"}
        assert "model.multi_modal_projector.linear_1" in adapted
        assert "model.language_model.layers.0.self_attn.q_proj" in adapted
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = method.model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad()
    method.finalize()
    assert losses[-1] < losses[0]
    final = {n: p.detach() for n, p in method.model.named_parameters()}
    assert list(final) == list(original)
    for n in vision:
        assert torch.equal(final[n], original[n]), f"frozen vision tower weight '{n}' changed"
    changed = [n for n in original if not torch.equal(final[n], original[n])]
    assert any("language_model" in n for n in changed) and any("projector" in n for n in changed)
    for n, w in method.masks().items():  # magnitude_mask: pinned entries are exactly theta0
        assert torch.equal(final[n][w == 0], original[n][w == 0])
