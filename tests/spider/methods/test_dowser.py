"""Model-Dowser (``spider.methods.dowser``): the estimator against exact Jacobians, its
reduction to |W|·a, the exact per-matrix mask, frozen entries bit-equal to theta0 under every
optimizer (weight decay included), the disk cache, and checkpoints the analysis reads."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from spider.methods import build_method
from spider.methods import dowser as dw

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "sample_checkpoints" / "tiny-llava-base"
SMALL = {"samples": 4, "text_len": 12, "probes": 2}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIDERSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Mlp(nn.Module):
    """Tokens (B x L x 4) -> logits (B x L x 5) through two SiLU layers; f = the last position."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 5)

    def forward(self, x):
        return self.lm_head(nn.functional.silu(self.mid(nn.functional.silu(self.up(x)))))


def exact_scores(model: Mlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """psi_i = mean over batch and positions of E_xi |d(xi . f_b / B) / d z_i|, the expectation
    taken exactly over all 2^V sign vectors, from the exact Jacobian of f_b w.r.t. each z."""
    batch, _, _ = x.shape
    vocab = model.lm_head.out_features
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=vocab)))  # 2^V x V
    out = {}
    for name in ("up", "mid"):
        layer = getattr(model, name)
        acts, zs = [], []

        def grab(module, args, output, acts=acts, zs=zs):
            acts.append(args[0].detach())
            zs.append(output.detach())

        handle = layer.register_forward_hook(grab)
        model(x)
        handle.remove()
        z = zs[0]

        def f_of(z_new, name=name, x=x):  # f (B x V) as a function of this layer's output
            def swap(module, args, output):
                return z_new

            h = getattr(model, name).register_forward_hook(swap)
            try:
                return model(x)[:, -1, :]
            finally:
                h.remove()

        jac = torch.autograd.functional.jacobian(f_of, z)  # B x V x B x L x d
        psi = torch.zeros(z.shape[-1])
        for b in range(batch):
            j = jac[b, :, b] / batch  # V x L x d: d(f_b / B) / d z_b
            expected = (signs @ j.reshape(vocab, -1)).abs().mean(0).reshape(j.shape[1:])
            psi += expected.sum(0)  # positions
        psi /= batch * z.shape[1]
        a = acts[0].abs().reshape(-1, acts[0].shape[-1]).mean(0)
        out[f"{name}.weight"] = psi[:, None] * layer.weight.detach().abs() * a[None, :]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_estimator_agrees_with_exact_jacobians_better_as_probes_grow():
    model = Mlp()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = exact_scores(model, x)
    agreement = {}
    for probes in (1, 8, 256):
        got = dw.importance_scores(model, [x], probes=probes, seed=0)
        agreement[probes] = min(spearman(got[n], exact[n]) for n in exact)
        errors = [float((got[n] - exact[n]).abs().sum() / exact[n].sum()) for n in exact]
        agreement[f"err{probes}"] = max(errors)
    assert agreement[1] < agreement[8] < agreement[256]
    assert agreement[256] > 0.99
    assert agreement["err256"] < agreement["err1"] and agreement["err256"] < 0.05
    # no gradient left behind, flags and mode as they were
    assert all(p.grad is None for p in model.parameters())


def test_score_reduces_to_weight_times_activation_when_psi_is_one():
    """lm_head's sensitivity is 1 (boundary rule): its score is |W| * mean|input|."""
    model = Mlp()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2))
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    got = dw.importance_scores(model, [x, x * 0.5], probes=3)
    handle.remove()
    a = torch.stack([s.abs().reshape(-1, 6).mean(0) for s in seen]).mean(0)
    expected = model.lm_head.weight.detach().abs() * a[None, :]
    torch.testing.assert_close(got["lm_head.weight"], expected, rtol=1e-6, atol=0)
    # with psi = 1 the probes do not matter
    torch.testing.assert_close(dw.importance_scores(model, [x, x * 0.5], probes=1, seed=5)
                               ["lm_head.weight"], got["lm_head.weight"])


def test_lowest_fraction_is_exact_and_breaks_ties_by_index():
    score = torch.tensor([[3.0, 1.0, 1.0], [1.0, 0.5, 2.0]])
    keep = dw.lowest_fraction(score, 0.5)  # 3 of 6: 0.5, then the first two 1.0s by index
    assert keep.tolist() == [[False, True, True], [False, True, False]]
    ties = dw.lowest_fraction(torch.zeros(7, 3), 0.25)
    assert int(ties.sum()) == 5 and ties.flatten()[:5].all()


def _tiny(parts=("llm", "projector")):
    from spider.models import load_model, select_trainable

    model, processor = load_model(MODEL)
    select_trainable(model, parts)
    return model, processor


def _batch(processor, n=4):
    from spider.data import load_dataset
    from spider.data.collate import TrainCollator

    data = load_dataset("builtin:counting", "train", seed=0, size=n)
    return TrainCollator(processor)([data[i] for i in range(n)])


def _train_steps(model, processor, method, optimizer, steps):
    params = list(method.trainable_parameters())
    batch = _batch(processor)
    for _ in range(steps):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adam"])
def test_frozen_entries_stay_at_theta0_with_weight_decay(kind):
    model, processor = _tiny()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("dowser", model, **SMALL)
    params = list(method.trainable_parameters())
    optimizer = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
                 "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                weight_decay=0.1),
                 "adam": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1)}[kind]()
    _train_steps(model, processor, method, optimizer, 3)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # given back after each step
    assert len(method.frozen) == 29  # q k v o gate up down x 4 layers + lm_head
    for name, p in method.params.items():
        if name in method.frozen:
            frozen = method.frozen[name]
            assert abs(float((~frozen).float().mean()) - 0.1) < 1e-3
            assert torch.equal(p.detach()[frozen], theta0[name][frozen]), name
            assert bool((p.detach()[~frozen] != theta0[name][~frozen]).any()), name
        else:  # norms, embeddings, the projector (not reached by text-only probes): dense
            assert torch.equal(method.masks()[name], torch.ones_like(p))
    method.finalize()
    assert not method._handles


@pytest.mark.parametrize("amsgrad", [False, True])
def test_frozen_second_moments_are_seeded_and_move_no_weight(monkeypatch, amsgrad):
    """On the CPU a frozen entry's Adam second moment is 1 after the first step (sqrt of
    zeros is slow there), decays as beta2^t after it, and the weights are bit for bit those
    of a run that leaves it at 0."""
    beta2 = 0.99
    runs = {}
    for seeded in (True, False):
        if not seeded:
            monkeypatch.setattr(dw, "_seed_second_moments", lambda optimizer: None)
        model, processor = _tiny()
        method = build_method("dowser", model, **SMALL)
        optimizer = torch.optim.AdamW(list(method.trainable_parameters()), lr=1e-2,
                                      betas=(0.9, beta2), weight_decay=0.1, amsgrad=amsgrad)
        _train_steps(model, processor, method, optimizer, 3)
        runs[seeded] = (method, optimizer)
    (method, optimizer), (plain, _) = runs[True], runs[False]
    for name, frozen in method.frozen.items():
        p = method.params[name]
        assert torch.equal(p.detach(), plain.params[name].detach()), name
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"][frozen], torch.zeros(int(frozen.sum()))), name
        v = state["exp_avg_sq"][frozen]
        assert torch.allclose(v, torch.full_like(v, beta2 ** 2)), name  # 1 after step 1
        trained = state["exp_avg_sq"][~frozen]
        assert bool((trained != beta2 ** 2).all()), name  # the trained entries' own moments
        if amsgrad:
            assert bool((state["max_exp_avg_sq"][frozen] == 1.0).all()), name


def test_second_moments_are_reseeded_before_they_become_subnormal():
    for beta2 in (0.9, 0.999, 0.99999):  # the last seeded step keeps v a normal float
        every = dw.reseed_interval(beta2)
        assert beta2 ** every >= 1e-30 > beta2 ** (every + 1) > 0
    assert dw.reseed_interval(0.3) is None and dw.reseed_interval(0.0) is None  # < 64 steps
    model, processor = _tiny()
    method = build_method("dowser", model, **SMALL)
    optimizer = torch.optim.AdamW(list(method.trainable_parameters()), lr=1e-2,
                                  betas=(0.9, 0.9))
    _train_steps(model, processor, method, optimizer, 1)
    name, frozen = next(iter(method.frozen.items()))
    state = optimizer.state[method.params[name]]
    state["exp_avg_sq"][frozen] = 1e-39  # as after ~850 steps of beta2 = 0.9
    state["step"].fill_(dw.reseed_interval(0.9))  # the next step is a reseeding one
    _train_steps(model, processor, method, optimizer, 1)
    assert bool((state["exp_avg_sq"][frozen] == 1.0).all())
    state["step"].fill_(3)  # an ordinary step: the moment just decays
    _train_steps(model, processor, method, optimizer, 1)
    assert bool((state["exp_avg_sq"][frozen] == 0.9).all())


def test_scores_are_cached_by_weights(cache, monkeypatch):
    model, _ = _tiny()
    first = build_method("dowser", model, **SMALL)
    assert len(list((cache / "dowser").glob("*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("scored again instead of reading the cache")

    monkeypatch.setattr(dw, "synthetic_batches", refuse)
    second = build_method("dowser", model, **SMALL, ratio=0.2)  # the ratio is not in the key
    for name, frozen in first.frozen.items():
        assert bool((second.frozen[name] <= frozen).all())  # 20 % trainable includes the 10 %
    # memory keeps the masks alone; the factors are read back from the cache for checkpoints
    assert first.factors == {} and second.factors == {}
    state = first.analysis_state()
    assert {k.split("/")[0] for k in state} == {"frozen", "score_moments", "psi", "act",
                                                "weight"}
    for path in (cache / "dowser").glob("*.safetensors"):
        path.unlink()  # a cleaned cache: checkpoints keep the mask, not the score
    assert {k.split("/")[0] for k in first.analysis_state()} == {"frozen", "score_moments"}
    assert first.importances() == {}
    second.load_extra_state(first.extra_state())  # (its ratio differs: the tensors only)
    assert all(torch.equal(second.frozen[n], f) for n, f in first.frozen.items())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="scored again"):
        build_method("dowser", model, **SMALL)


def test_prompts_are_seeded_self_generated_and_leave_the_rng_alone():
    model, _ = _tiny()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = dw.synthetic_batches(model, samples=5, text_len=10, seed=3)
    after = torch.rand(1)
    b = dw.synthetic_batches(model, samples=5, text_len=10, seed=3)
    assert torch.equal(before, after)
    assert [t["input_ids"].shape[0] for t in a] == [4, 1]
    assert all(t["input_ids"].shape[1] == 10 for t in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    noise = dw.synthetic_batches(model, samples=2, text_len=10, images="noise")
    assert noise[0]["pixel_values"].shape == (2, 3, 48, 48)
    assert int((noise[0]["input_ids"] == model.config.image_token_id).sum(1)[0]) > 0
    factors = dw.probe_factors(model, noise, probes=1)
    assert any("multi_modal_projector" in n for n in factors)  # images reach the projector


def test_checkpoints_keep_the_mask_and_the_score(tmp_path):
    from analysis import load_run
    from spider.train import RunConfig, train

    out = tmp_path / "run"
    cfg = RunConfig(method="dowser", options=dict(SMALL), output_dir=str(out), steps=2,
                    batch_size=4, train_size=8, eval_every=2, eval_limit=4, log_every=1,
                    save_every=2, device="cpu", warmup_steps=0, weight_decay=0.1,
                    train="attn")
    train(cfg)
    run = load_run(out)
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    mask = run.tensor(2, name, "mask")
    assert abs(float(mask.mean()) - 0.1) < 1e-3
    score = run.tensor(2, name, "importance_pre")
    assert score.shape == mask.shape
    # the trained entries are exactly the lowest-scoring tenth, frozen ones did not move
    assert torch.equal(dw.lowest_fraction(score, 0.1).float(), mask)
    delta = run.tensor(2, name, "delta")
    assert float(delta[mask == 0].abs().max()) == 0.0
    assert float(delta[mask == 1].abs().max()) > 0.0


def test_spider_callback_scores_at_train_begin_and_keeps_frozen_entries(tmp_path):
    """In a stock Trainer (its AdamW, weight decay 0.1): scored at on_train_begin, frozen
    entries bit-equal to theta0, and the run directory the analysis reads has the mask."""
    from transformers import Trainer, TrainingArguments

    from analysis import load_run
    from spider.data import load_dataset
    from spider.data.collate import TrainCollator
    from spider.integrations.hf import SpiderCallback

    model, processor = _tiny(("attn", "mlp_gate_up"))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = load_dataset("builtin:counting", "train", seed=0, size=8)
    callback = SpiderCallback("dowser", run_dir=tmp_path / "run", **SMALL)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, disable_tqdm=True, logging_steps=1,
                             dataloader_pin_memory=False)
    Trainer(model=model, args=args, train_dataset=data, data_collator=TrainCollator(processor),
            callbacks=[callback]).train()
    method = callback.method
    assert len(method.frozen) == 24  # q k v o gate up x 4 layers
    for name, frozen in method.frozen.items():
        p = method.params[name].detach()
        assert torch.equal(p[frozen], theta0[name][frozen]), name
        assert bool((p[~frozen] != theta0[name][~frozen]).any()), name
    run = load_run(tmp_path / "run")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(run.tensor(2, name, "mask"), (~method.frozen[name]).float())


def test_spider_callback_resume_takes_the_saved_mask_without_scoring(cache, tmp_path,
                                                                      monkeypatch):
    """A resumed Trainer run holds the checkpoint's weights, not theta0: scoring them would
    miss the cache and be thrown away for the saved mask; the callback does not score."""
    from transformers import Trainer, TrainingArguments

    from spider.data import load_dataset
    from spider.data.collate import TrainCollator
    from spider.integrations.hf import SpiderCallback

    calls = []
    probe = dw.probe_factors
    monkeypatch.setattr(dw, "probe_factors", lambda *a, **k: calls.append(1) or probe(*a, **k))
    data = load_dataset("builtin:counting", "train", seed=0, size=8)

    def run(resume=None):
        model, processor = _tiny(("attn",))
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        callback = SpiderCallback("dowser", **SMALL)
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, max_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_strategy="steps", save_steps=1, report_to=[],
                                 remove_unused_columns=False, disable_tqdm=True,
                                 dataloader_pin_memory=False)
        Trainer(model=model, args=args, train_dataset=data,
                data_collator=TrainCollator(processor), callbacks=[callback]
                ).train(resume_from_checkpoint=resume)
        return callback.method, theta0

    whole, theta0 = run()
    assert len(calls) == 1
    # (this model's Trainer checkpoint loads back through the callback's state, so the model
    # may still hold theta0 at train begin; a cleaned cache makes any scoring show)
    for path in (cache / "dowser").glob("*.safetensors"):
        path.unlink()
    resumed, _ = run(resume=str(tmp_path / "hf" / "checkpoint-1"))
    assert len(calls) == 1  # not scored again: the mask came from checkpoint-1
    assert set(resumed.frozen) == set(whole.frozen)
    for name, frozen in whole.frozen.items():
        assert torch.equal(resumed.frozen[name], frozen), name
        p = resumed.params[name].detach()
        assert torch.equal(p[frozen], theta0[name][frozen]), name
        assert torch.equal(p, whole.params[name].detach()), name  # as if never stopped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zeroing_frozen_gradients_is_masked_fill_bit_for_bit(dtype):
    from spider.methods.dowser import zero_frozen_

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(33, 17, generator=gen).to(dtype)
    grad[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    frozen = torch.rand(33, 17, generator=gen) < 0.9
    frozen[0, :4] = True
    frozen[1, :4] = False
    expected = grad.masked_fill(frozen, 0)
    zero_frozen_(grad, frozen)
    assert torch.equal(grad.view(torch.uint8), expected.view(torch.uint8))  # the very bits
    assert not torch.signbit(grad[frozen]).any()  # +0.0, even where the gradient was -0.0
    assert torch.equal(grad[~frozen], expected[~frozen]) and bool((grad[~frozen] != 0).all())
