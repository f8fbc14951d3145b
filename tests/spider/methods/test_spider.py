"""SPIDER against hand-computed values and against the plain transcription of the rule."""

import copy
import math
import os
import shutil
import warnings

import pytest
import torch

from bench.spider_reference import ReferenceSpider
from bench.spider_reference import rank as reference_rank
from spider.importance import rank
from spider.methods import build_method
from spider.methods.spider import keep_weight
from tests.spider.lockstep import EPS, rank_shift, sum_error


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _rank_by_hand(values):
    a = [abs(v) for v in values]
    mean = sum(a) / len(a)
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / (len(a) - 1))
    return [_sigmoid((x - mean) / std) for x in a]


def test_keep_weight_matches_hand_computation():
    theta0 = [0.5, -2.0, 1.0, 0.1]
    grad_sum = [0.3, -0.1, 0.9, 0.05]
    pre, ft = _rank_by_hand(theta0), _rank_by_hand(grad_sum)
    raw = [g / (i + g) if i < g else 0.0 for i, g in zip(pre, ft)]
    nonzero = [r for r in raw if r != 0]
    expected = [min(r / (sum(nonzero) / len(nonzero)), 1.0) for r in raw]
    # I = [.377, .902, .621, .265]-ish and G = [.542, .330, .887, .276]-ish: entries 0, 2, 3 win
    assert [r > 0 for r in raw] == [True, False, True, True]
    w, stats = keep_weight(torch.tensor(theta0), torch.tensor(grad_sum), collect=True)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats.nonzero == 3
    assert stats.as_row()["mask_density"] == pytest.approx(0.75)
    assert stats.as_row()["importance_pre_mean"] == pytest.approx(sum(pre) / 4, rel=1e-6)


def test_update_pulls_weight_back_by_hand():
    model = torch.nn.Linear(4, 1, bias=False)
    theta0 = [0.5, -2.0, 1.0, 0.1]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([theta0]))
    method = build_method("spider", model)
    grad = [0.3, -0.1, 0.9, 0.05]
    moved = [0.2, 0.2, 0.2, 0.2]
    with torch.no_grad():
        model.weight.add_(torch.tensor([moved]))  # pretend optimizer.step() moved every weight
    model.weight.grad = torch.tensor([grad])
    method.after_optimizer_step()
    pre, ft = _rank_by_hand(theta0), _rank_by_hand(grad)
    raw = [g / (i + g) if i < g else 0.0 for i, g in zip(pre, ft)]
    mean_nz = sum(r for r in raw if r) / sum(1 for r in raw if r)
    w = [min(r / mean_nz, 1.0) for r in raw]
    expected = [t * (1 - wi) + (t + m) * wi for t, m, wi in zip(theta0, moved, w)]
    assert model.weight[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert model.weight[0, 1].item() == theta0[1]  # w = 0: exactly theta0


def test_about_half_get_weight_and_a_quarter_reach_one():
    """ARCHITECTURE.md: with unrelated weights and gradients ~1/2 of w > 0 and ~1/4 reach 1."""
    gen = torch.Generator().manual_seed(0)
    w, _ = keep_weight(torch.randn(200_000, generator=gen), torch.randn(200_000, generator=gen))
    assert (w > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (w == 1).float().mean().item() == pytest.approx(0.25, abs=0.05)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )
    with torch.no_grad():  # LayerNorm starts all-equal (degenerate, NaN in the transcription)
        model[2].weight.copy_(torch.linspace(0.5, 1.5, 32))
        model[2].bias.copy_(torch.linspace(-0.1, 0.1, 32))
    return model


def _fuse(method, backend: str, names=None) -> None:
    """Send every tensor (however small) through ``backend``'s fused passes ("native": the C
    library, "compiled": torch.compile's kernels), or skip where they cannot be built here:
    no C compiler, or, for "compiled", ATEN_CPU_CAPABILITY=default, whose headers torch
    2.13's inductor code does not compile against. The update then runs eagerly after one
    warning (test_a_failing_compiler_falls_back_to_the_eager_update), so there is nothing
    fused to compare; CI's machine builds both."""
    method.fused, method.fused_min_numel, method.fused_backend = True, 0, backend
    names = list(method.params) if names is None else names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning
        if not all(method._fused(name) for name in names):
            pytest.skip(f"SPIDER's {backend} kernels cannot be built on this machine, or "
                        "built wrong (their probe failed)")


@pytest.mark.parametrize("optimizer, fused", [("sgd", None), ("adamw", None), ("adamw", "native"),
                                              ("adamw", "compiled")])
def test_matches_transcription_step_by_step(optimizer, fused):
    """Our SPIDER against the plain transcription, in lockstep (ARCHITECTURE.md, *The tie at
    I = G*): before every one of 40 steps the transcription is given our weights, S and
    optimizer state; both take the same batch, and the one step that comes out is compared.

    Forward, backward, clipping and the optimizer are the same code on the same numbers, so
    they agree bit for bit; only the ranks are computed differently (ours as sigmoid(a|t| + b)
    from three sums, the transcription from mean() and std()). Each rank is within
    ``rank_shift`` of the exact one (tests/spider/lockstep.py derives it), so two sides' ranks
    differ by at most ``s = 2 * (rank_shift(theta0) + rank_shift(S))``, and from there:

    * mask side: entries on different sides had |G - I| <= s (they sat at the tie);
    * raw weight G/(I+G): moves by <= (I dG + G dI)/(I+G)^2 <= s/(I+G), plus 2 roundings;
    * the normaliser m (mean of the non-zero raw weights): by <= max d(raw) + the sum's
      rounding, and by <= k/(n - k) more where k of its n entries flipped (raw <= 1);
    * w = min(raw/m, 1): by <= d(raw)/m + raw * dm / m^2 (m the smaller of the two);
    * p = theta0 + w (p' - theta0): by <= dw |p' - theta0|, plus the blends' roundings (ours
      3, the transcription's 4, each <= EPS * 2 max(|theta0|, |p'|)).
    """
    ours, ref = _mlp(0), _mlp(0)
    method = build_method("spider", ours)
    if fused:  # every tensor through the fused passes, however small
        _fuse(method, fused)
    else:
        method.fused = False
    reference = ReferenceSpider(dict(ref.named_parameters()))

    def make_opt(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    opt_ours, opt_ref = make_opt(ours), make_opt(ref)
    gen = torch.Generator().manual_seed(1)
    flips = pinned = free = 0
    for _ in range(40):
        with torch.no_grad():  # the same state into both sides
            for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
                b.copy_(a)
                reference.grad_sum[name].copy_(method.grad_sum[name])
        opt_ref.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
        x = torch.randn(8, 16, generator=gen)
        y = torch.randn(8, 4, generator=gen)
        stepped = []
        for model, opt, hook in ((ours, opt_ours, method.after_optimizer_step),
                                 (ref, opt_ref, reference.after_optimizer_step)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # clipping is active
            opt.step()
            stepped.append({n: p.detach().clone() for n, p in model.named_parameters()})
            hook()
            opt.zero_grad()
        ranks, masks = method.importances(), method.masks()
        for (name, p_ours), p_ref in zip(ours.named_parameters(), ref.parameters()):
            after_opt, theta0 = stepped[0][name], method.theta0[name]
            assert torch.equal(after_opt, stepped[1][name]), name  # same code, same numbers
            assert torch.equal(method.grad_sum[name], reference.grad_sum[name]), name
            pre, ft = ranks[name]["pre"], ranks[name]["ft"]
            s = 2 * (rank_shift(theta0) + rank_shift(method.grad_sum[name]))
            w_ours, w_ref = masks[name], reference.mask[name]
            flipped = (w_ours > 0) != (w_ref > 0)
            assert bool(((ft - pre).abs()[flipped] <= s).all()), f"{name}: a flip off the tie"
            raw = torch.where(ft > pre, ft / (pre + ft), torch.zeros_like(ft))
            n, k = int((raw > 0).sum()), int(flipped.sum())
            if n == 0:
                continue
            d_raw = s / (pre + ft) + 2 * EPS * raw
            m = float(raw[raw > 0].mean())
            ref_raw = reference.importance_ft[name] / (reference.importance_pre[name]
                                                       + reference.importance_ft[name])
            ref_kept = reference.importance_ft[name] > reference.importance_pre[name]
            if bool(ref_kept.any()):
                m = min(m, float(ref_raw[ref_kept].mean()))
            d_m = float(d_raw[raw > 0].max()) + 2 * sum_error(n) * m + k / max(n - k, 1)
            d_w = d_raw / m + raw * d_m / m**2
            keep = ~flipped
            assert bool(((w_ours - w_ref).abs() <= d_w)[keep].all()), f"{name}: w"
            blend = 14 * EPS * torch.maximum(theta0.abs(), after_opt.abs())
            bound = d_w * (after_opt - theta0).abs() + blend
            assert bool(((p_ours - p_ref).abs() <= bound)[keep].all()), f"{name}: weights"
            zero = (w_ours == 0) & (w_ref == 0)  # pinned on both sides: theta0 exactly
            assert torch.equal(p_ours.detach()[zero], theta0[zero])
            flips, pinned, free = flips + k, pinned + int(zero.sum()), free + int((w_ours > 0).sum())
    # the rule did something (weights pinned, weights moved), and ties were rare
    assert pinned > 0 and free > 0
    assert flips <= 1e-3 * (pinned + free)


def test_importances_are_the_ranks():
    model = _mlp(0)
    method = build_method("spider", model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    method.after_optimizer_step()
    imps = method.importances()
    for name in method.params:
        torch.testing.assert_close(imps[name]["pre"], reference_rank(method.theta0[name]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(imps[name]["ft"], reference_rank(method.grad_sum[name]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([3.0], 0.5),  # one element: z-score undefined -> 0.5
        ([2.0, -2.0, 2.0, 2.0], 0.5),  # all |t| equal: no spread -> 0.5
        ([0.0, 0.0, 0.0], 0.0),  # all zeros -> 0 (the authors' rule)
        ([0.0], 0.0),
    ],
)
def test_degenerate_ranks_are_defined(values, expected):
    r = rank(torch.tensor(values))
    assert r.tolist() == [expected] * len(values)


@pytest.mark.parametrize("theta0", [[3.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
def test_degenerate_tensors_never_poison_weights(theta0):
    """Where the authors' code divides by a zero std (NaN), ours keeps weights finite."""
    layer = torch.nn.Linear(len(theta0), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([theta0]))
    method = build_method("spider", layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(5):
        grad = torch.full((1, len(theta0)), 1.0) if step % 2 else torch.randn(1, len(theta0))
        layer.weight.grad = grad
        opt.step()
        method.after_optimizer_step()
        assert torch.isfinite(layer.weight).all()
        for w in method.masks().values():
            assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    if len(theta0) == 1:  # G and I both 0.5: never G > I, so it stays at theta0
        assert layer.weight.item() == theta0[0]
    # the transcription gives NaN for the same tensors (why the definition exists)
    if theta0 != [0.0] * len(theta0):
        assert torch.isnan(reference_rank(torch.tensor(theta0))).all()


def test_underflowing_ranks_do_not_make_nan():
    # |S| with a large mean and tiny spread: the low entries' z-scores underflow sigmoid to 0,
    # and theta0's do too, so I + G == 0 there.
    theta0 = torch.cat([torch.zeros(1), torch.full((999,), 100.0) + torch.linspace(0, 0.1, 999)])
    grad_sum = theta0.clone()
    w, _ = keep_weight(theta0, grad_sum)
    assert torch.isfinite(w).all()
    assert w[0].item() == 0.0


def test_ablations_behave_as_documented():
    gen = torch.Generator().manual_seed(3)
    theta0, grad_sum = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    from spider.methods.spider import SpiderOptions

    weighted, _ = keep_weight(theta0, grad_sum)
    binary, _ = keep_weight(theta0, grad_sum, SpiderOptions(mask="binary"))
    raw, _ = keep_weight(theta0, grad_sum, SpiderOptions(normalize=False))
    pre, ft = reference_rank(theta0), reference_rank(grad_sum)
    assert torch.equal(binary, (ft > pre).float())
    torch.testing.assert_close(raw, torch.where(pre < ft, ft / (pre + ft), 0.0))
    assert ((raw > 0.5) | (raw == 0)).all() and raw.max() <= 1.0
    assert torch.equal(weighted > 0, binary > 0)
    # normalisation makes the mean of non-zero entries 1 before the cap
    assert weighted[weighted > 0].max().item() == 1.0


@pytest.mark.parametrize("accumulate", ["abs", "fisher"])
def test_accumulate_variants(accumulate):
    layer = torch.nn.Linear(8, 1, bias=False)
    method = build_method("spider", layer, accumulate=accumulate)
    grads = [torch.randn(1, 8) for _ in range(3)]
    for g in grads:
        layer.weight.grad = g
        method.after_optimizer_step()
    expected = sum(g.abs() if accumulate == "abs" else g * g for g in grads)
    torch.testing.assert_close(method.grad_sum["weight"], expected)


def test_bf16_parameters_keep_theta0_in_bf16():
    model = _mlp(0).to(torch.bfloat16)
    method = build_method("spider", model)
    assert all(t.dtype == torch.bfloat16 for t in method.theta0.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    for _ in range(5):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        method.after_optimizer_step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        pinned = method.masks()[name] == 0
        assert torch.equal(p[pinned], method.theta0[name][pinned])


def test_statistics_collected_during_the_update_match_the_importances():
    """The by-product statistics (one update's sums) equal the same quantities computed
    from ``importances()`` and ``masks()`` after the update, including the second moments
    from which the correlation of I and G is pooled."""
    model = _mlp(3)
    method = build_method("spider", model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    method.collect_statistics = True
    method.after_optimizer_step()
    collected = method.statistics()
    imps, masks = method.importances(), method.masks()
    for name, row in collected.items():
        pre, ft, w = imps[name]["pre"], imps[name]["ft"], masks[name]
        expected = {
            "mask_mean": w.mean(), "mask_density": (w > 0).float().mean(),
            "importance_pre_mean": pre.mean(), "importance_ft_mean": ft.mean(),
            "frac_ft_gt_pre": (ft > pre).float().mean(),
            "importance_pre_sq_mean": pre.square().mean(),
            "importance_ft_sq_mean": ft.square().mean(),
            "importance_cross_mean": (pre * ft).mean(),
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(float(value), rel=1e-5, abs=1e-7), (name, key)


def test_sharded_statistics_equal_unsharded():
    """Sums all-reduced over shards give the same mask as the whole tensor.

    Two threads play two ranks; the reducer is a real (in-process) all-reduce: each rank
    deposits its local sums, waits for the other, and gets the total.
    """
    import threading

    gen = torch.Generator().manual_seed(5)
    theta0, grad_sum = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    whole, whole_stats = keep_weight(theta0, grad_sum, collect=True)
    shards = [(theta0[:300], grad_sum[:300]), (theta0[300:], grad_sum[300:])]
    barrier = threading.Barrier(2)
    deposited: list = [None, None]
    results: list = [None, None]

    def all_reduce(rank_):
        def reducer(sums):
            deposited[rank_] = sums.clone()
            barrier.wait()
            total = deposited[0] + deposited[1]
            barrier.wait()
            return total
        return reducer

    def work(rank_):
        t0, s = shards[rank_]
        results[rank_] = keep_weight(t0, s, reducer=all_reduce(rank_), collect=True)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), whole,
                               rtol=1e-6, atol=1e-7)
    assert results[0][1].nonzero == whole_stats.nonzero  # global count on every rank
    # without the all-reduce a shard's mask differs (its own mean and std)
    alone, _ = keep_weight(*shards[0])
    assert not torch.allclose(alone, whole[:300])


def test_state_round_trip_resumes_exactly():
    def run(steps, model, method, opt, gen):
        for _ in range(steps):
            x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 4, generator=gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            method.after_optimizer_step()
            opt.zero_grad()

    gen = torch.Generator().manual_seed(0)
    straight = _mlp(0)
    m1 = build_method("spider", straight)
    o1 = torch.optim.SGD(straight.parameters(), lr=0.1)
    run(10, straight, m1, o1, gen)

    gen = torch.Generator().manual_seed(0)
    first = _mlp(0)
    m2 = build_method("spider", first)
    o2 = torch.optim.SGD(first.parameters(), lr=0.1)
    run(5, first, m2, o2, gen)
    state = m2.state_dict()
    resumed = _mlp(0)
    resumed.load_state_dict(first.state_dict())
    m3 = build_method("spider", resumed)
    m3.load_state_dict(state)
    o3 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    run(5, resumed, m3, o3, gen)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert m3.steps_done == 10


def test_moments_stay_accurate_for_large_tensors():
    """A 4M-entry tensor's std matches float64 (float32 serial sums drift at this size)."""
    from spider.importance import abs_sums

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4_000_003, generator=gen) * 0.02 + 0.01
    count, sum_abs, sum_sq = abs_sums(t).tolist()
    exact = t.double().abs()
    assert count == t.numel()
    assert sum_abs == pytest.approx(exact.sum().item(), rel=1e-6)
    assert sum_sq == pytest.approx((exact * exact).sum().item(), rel=1e-6)


@pytest.mark.parametrize("backend, dtype", [("compiled", torch.float32),
                                            ("compiled", torch.bfloat16),
                                            ("native", torch.float32)])
def test_fused_update_matches_the_eager_one(backend, dtype):
    """The fused update (three passes per tensor) against the eager one, step by step from
    the same state: the same S bit for bit, the same pinned set (ties aside), weights equal
    to float rounding, and pinned weights exactly theta0."""
    fused_model, eager_model = _mlp(0).to(dtype), _mlp(0).to(dtype)
    fused, eager = build_method("spider", fused_model), build_method("spider", eager_model)
    eager.fused = False
    _fuse(fused, backend)
    assert not any(eager._fused(n) for n in eager.params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):
        with torch.no_grad():
            for (name, a), b in zip(fused_model.named_parameters(), eager_model.parameters()):
                step = (torch.randn(a.shape, generator=gen) * 0.05).to(dtype)
                a.add_(step)  # as if the optimizer moved the weights
                b.copy_(a)
                grad = torch.randn(a.shape, generator=gen).to(dtype)
                a.grad, b.grad = grad.clone(), grad.clone()
                eager.grad_sum[name].copy_(fused.grad_sum[name])
        before = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
        fused.after_optimizer_step()
        eager.after_optimizer_step()
        masks_f, masks_e = fused.masks(), eager.masks()
        for (name, a), b in zip(fused_model.named_parameters(), eager_model.parameters()):
            assert torch.equal(fused.grad_sum[name], eager.grad_sum[name]), name
            same_side = (masks_f[name] > 0) == (masks_e[name] > 0)
            assert float(same_side.float().mean()) >= 0.99, name  # flips only at ties
            torch.testing.assert_close(masks_f[name][same_side], masks_e[name][same_side],
                                       rtol=1e-5, atol=1e-6)
            tol = (before[name].float() - fused.theta0[name].float()).abs() * 1e-5
            ulp = 1e-6 if dtype == torch.float32 else 1e-2
            close = ((a.float() - b.float()).abs()
                     <= tol + ulp * a.float().abs().clamp(min=1e-3))
            assert bool(close[same_side].all()), name
            pinned = masks_f[name] == 0
            assert torch.equal(a.detach()[pinned], fused.theta0[name][pinned]), name


@pytest.mark.parametrize("fused", [None, "native", "compiled"])
def test_a_shard_with_summed_moments_updates_as_the_whole_tensor(fused):
    """The all-reduce hook between the kernels: a tensor [x, x] held whole, and its half x
    held by a method whose reducer doubles every sum (the other shard being a copy), get
    the same mask and the same update on x."""
    gen = torch.Generator().manual_seed(4)
    x0, move, grad = (torch.randn(3000, generator=gen) for _ in range(3))
    whole = torch.nn.Linear(6000, 1, bias=False)
    half = torch.nn.Linear(3000, 1, bias=False)
    with torch.no_grad():
        whole.weight.copy_(torch.cat([x0, x0])[None])
        half.weight.copy_(x0[None])
    m_whole, m_half = build_method("spider", whole), build_method("spider", half)
    m_half.reducer = lambda sums: 2 * sums
    for m in (m_whole, m_half):
        if fused:
            _fuse(m, fused)
        else:
            m.fused = False
        assert all(m._fused(n) == bool(fused) for n in m.params)
    with torch.no_grad():
        whole.weight.add_(torch.cat([move, move])[None])
        half.weight.add_(move[None])
    whole.weight.grad = torch.cat([grad, grad])[None]
    half.weight.grad = grad[None].clone()
    m_whole.after_optimizer_step()
    m_half.after_optimizer_step()
    w_whole, w_half = m_whole.masks()["weight"][0, :3000], m_half.masks()["weight"][0]
    assert bool((w_half > 0).any()) and bool((w_half == 0).any())
    torch.testing.assert_close(w_half, w_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.weight[0], whole.weight[0, :3000], rtol=1e-6, atol=1e-6)
    # without the reducer the half's own moments give another mask
    alone = build_method("spider", torch.nn.Linear(3000, 1, bias=False))
    alone.fused, alone.fused_min_numel, alone.fused_backend = bool(fused), 0, fused
    alone.theta0["weight"].copy_(x0[None])
    alone._pre_affine.clear()
    alone.grad_sum["weight"].copy_(m_half.grad_sum["weight"])
    assert not torch.allclose(alone.masks()["weight"][0], w_half)


def test_fusion_follows_the_environment_and_the_backends_limits(monkeypatch):
    from spider.methods.spider import _KERNELS, _NATIVE, FUSED_ENV, NATIVE_MIN_NUMEL, fusion_wanted

    monkeypatch.delenv(FUSED_ENV, raising=False)
    assert fusion_wanted(torch.device("cpu")) and fusion_wanted(torch.device("cuda"))
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not fusion_wanted(torch.device("cuda")) and not fusion_wanted(torch.device("cpu"))
    monkeypatch.setenv(FUSED_ENV, "1")
    assert fusion_wanted(torch.device("cpu"))
    method = build_method("spider", torch.nn.Linear(300, 300))
    assert method._kernels(torch.device("cpu")) is _NATIVE  # the C library on CPUs
    assert method._kernels(torch.device("cuda")) is _KERNELS  # compiled elsewhere
    assert 300 < NATIVE_MIN_NUMEL and not method._fused("bias")  # below the minimum
    _fuse(method, "native", ["weight"])
    method.fused_min_numel = None
    assert method._fused("weight")  # 90,000 entries: fused by default
    method.fused = False
    assert not method._fused("weight")
    # bf16 tensors on a CPU: the C library is float32 only, so they take the eager update
    low = build_method("spider", torch.nn.Linear(300, 300).to(torch.bfloat16))
    assert not low._fused("weight")


def _check_fallback(backend: str, warning: str) -> None:
    """With ``backend`` unbuildable: one warning naming why, then exactly the eager update."""
    model, twin = _mlp(0), _mlp(0)
    method, eager = build_method("spider", model), build_method("spider", twin)
    method.fused, method.fused_min_numel, method.fused_backend = True, 0, backend
    eager.fused = False
    with pytest.warns(RuntimeWarning, match=warning):
        assert not method._fused("0.weight")
    for a, b in zip(model.parameters(), twin.parameters()):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    method.after_optimizer_step()
    eager.after_optimizer_step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_failing_compiler_falls_back_to_the_eager_update(monkeypatch):
    import spider.methods.spider as spider_module

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(spider_module, "_KERNELS", spider_module._Kernels())
    monkeypatch.setattr(torch, "compile", broken)
    _check_fallback("compiled", "no C\\+\\+ compiler")


def test_a_cpu_without_a_c_compiler_falls_back_to_the_eager_update(monkeypatch, tmp_path):
    import spider.methods.spider as spider_module
    from spider.methods import _native

    monkeypatch.setattr(spider_module, "_NATIVE", spider_module._NativeBackend())
    monkeypatch.setattr(_native, "_LOADED", None)
    monkeypatch.setenv("SPIDERSCOPE_KERNELS", str(tmp_path / "kernels"))  # nothing cached
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    _check_fallback("native", "fused CPU update unavailable.*no-such-cc")


def test_the_cpu_library_is_built_once_and_cached_by_source_and_machine(monkeypatch, tmp_path):
    from spider.methods import _native

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("SPIDERSCOPE_KERNELS", str(tmp_path))
    built = _native.build()
    assert built.parent == tmp_path and built.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary left behind
    stamp = built.stat().st_mtime_ns
    assert _native.build() == built and built.stat().st_mtime_ns == stamp  # from the cache
    monkeypatch.setattr(_native, "_cpu_flags", lambda: "flags : another cpu")
    assert _native.build() != built  # another CPU: another library
    # a compiler that fails leaves nothing under the real name, and says why in one line
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'fatal error: omp.h: No such file' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    before = set(tmp_path.iterdir())
    with pytest.raises(_native.NativeUnavailable, match="failed: fatal error: omp.h"):
        _native.build()
    assert set(tmp_path.iterdir()) == before


def test_a_read_only_kernel_folder_builds_in_the_temporary_folder(monkeypatch, tmp_path):
    from spider.methods import _native

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    configured = tmp_path / "read-only" / "kernels"
    monkeypatch.setenv("SPIDERSCOPE_KERNELS", str(configured))
    # as a folder without write permission answers (a chmod does not stop root, who may run
    # this suite)
    monkeypatch.setattr(_native, "_writable", lambda folder: folder != configured)
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = _native.build()
    assert built.parent == tmp_path / "tmp" / f"spiderscope-kernels-{os.getuid()}"
    assert not configured.exists()
    assert _native.NativeKernels(built).lib  # it loads


def test_passes_that_run_but_compute_wrongly_are_never_used(monkeypatch):
    """A compiler can build a kernel that runs and is wrong (inductor left a bf16 tensor's
    tail unsummed under ATEN_CPU_CAPABILITY=avx2): the probe compares every pass with the
    eager update, and a backend that fails it is turned off with one warning."""
    import spider.methods.spider as spider_module
    from spider.methods.spider import SpiderOptions, _check_passes

    class Wrong:
        """The CPU library, with one pass broken."""

        def __init__(self, real, broken: str):
            self.real, self.broken = real, broken

        def accumulate(self, grad_sum, grad, mode):
            if self.broken == "accumulate":
                grad = grad.clone()
                grad[-5:] = 0  # the tail left out
            return self.real.accumulate(grad_sum, grad, mode)

        def mask(self, *args):
            sums = self.real.mask(*args)
            if self.broken == "mask":
                args[3][::1000] += 0.01
            return sums

        def merge(self, param, theta0, w, sums, normalize, full):
            self.real.merge(param, theta0, w, sums, normalize, full)
            if self.broken == "merge":
                param[::1000] += 0.01

    method = build_method("spider", torch.nn.Linear(300, 300))
    _fuse(method, "native", ["weight"])  # the real library builds and passes
    real = spider_module._NATIVE.kernels
    cpu = torch.device("cpu")
    for broken, words in (("accumulate", "S \\+= g differs"), ("mask", "mask differs"),
                          ("merge", "merge differs")):
        with pytest.raises(RuntimeError, match=words):
            _check_passes(Wrong(real, broken), "probe", cpu, torch.float32, torch.float32,
                          SpiderOptions())
    backend = spider_module._NativeBackend()
    backend.kernels = Wrong(real, "accumulate")
    monkeypatch.setattr(spider_module, "_NATIVE", backend)
    fresh = build_method("spider", torch.nn.Linear(300, 300))
    fresh.fused = True
    with pytest.warns(RuntimeWarning, match="S \\+= g differs"):
        assert not fresh._fused("weight")


def test_a_model_cast_after_the_method_was_built_is_updated_eagerly():
    """The C passes read raw float32 memory: a parameter cast to bf16 after the choice of
    fused tensors was made takes the eager update (as an eager twin does), never the C one."""
    model, twin = torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)
    twin.load_state_dict(model.state_dict())
    method, eager = build_method("spider", model), build_method("spider", twin)
    _fuse(method, "native", ["weight"])
    eager.fused = False
    assert "weight" in method._fused_names()  # chosen while float32
    for m in (model, twin):
        m.weight.data = m.weight.data.to(torch.bfloat16)
        m.weight.grad = torch.ones_like(m.weight)
        m.bias.grad = torch.ones_like(m.bias)
    method.after_optimizer_step()
    eager.after_optimizer_step()
    assert torch.equal(model.weight, twin.weight) and model.weight.dtype == torch.bfloat16
