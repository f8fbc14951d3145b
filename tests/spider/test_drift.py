"""spider.drift and the Evaluator's drift metrics: KL to the step-0 model, kept for resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spider.drift import answer_log_probs, kl_divergence

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_divergence_is_the_mean_over_examples_of_the_mean_over_positions():
    base = torch.log_softmax(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), -1)
    tuned = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), -1)
    counts = torch.tensor([2, 0, 1])
    p = base.exp()
    first = float((p[0] * (base[0] - tuned[0])).sum()) / 2  # example 0: 2 positions
    assert kl_divergence(base, tuned, counts) == pytest.approx((first + 0.0) / 2)
    assert kl_divergence(base, base, counts) == 0.0


def _evaluator(run_path: Path):
    from spider.data import load_dataset
    from spider.distributed import Dist
    from spider.hooks import Evaluator
    from spider.methods.base import build_method
    from spider.models import load_model
    from spider.rundir import RunDir, RunInfoWriter

    model, processor = load_model(BASE)
    method = build_method("full", model)
    sets = {"upstream": load_dataset("builtin:upstream", "test"),
            "downstream": load_dataset("builtin:counting", "test")}
    run = RunDir(run_path)
    run.path.mkdir(exist_ok=True)
    return Evaluator(method, processor, sets, 6, 3, 6, run, RunInfoWriter(run, {}), Dist()), run


def _drift(run, step: int) -> dict[str, float]:
    return {e["metric"]: e["value"] for e in run.read_events()
            if e["step"] == step and e["split"] == "upstream" and e["metric"] != "score"
            and not e["metric"].startswith("task:")}


def test_the_evaluator_logs_drift_and_a_resumed_one_compares_with_the_same_base(tmp_path):
    evaluator, run = _evaluator(tmp_path / "run")
    evaluator.evaluate(0)
    at0 = _drift(run, 0)
    assert at0["kl_to_base"] == 0.0
    assert {"format_errors", "content_errors", "answer_type_drift"} <= set(at0)
    assert all(0.0 <= v <= 1.0 for v in at0.values())
    assert run.drift_base_file.exists()
    model = evaluator.method.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    evaluator.evaluate(3)
    kl = _drift(run, 3)["kl_to_base"]
    assert kl > 0

    # a resumed run: a new evaluator (its first evaluation after step 0) reads the base back
    resumed, _ = _evaluator(tmp_path / "run")
    resumed.method.model.load_state_dict(model.state_dict())
    resumed.evaluate(3)
    assert [e for e in run.read_events() if e["metric"] == "kl_to_base"][-1]["value"] == kl


def test_answer_log_probs_rows_are_the_answer_tokens():
    from spider.data import load_dataset
    from spider.models import load_model

    model, processor = load_model(BASE)
    data = load_dataset("builtin:upstream", "test")
    examples = [data[i] for i in range(3)]
    log_probs, counts = answer_log_probs(model, processor, examples, batch_size=2)
    assert log_probs.shape[0] == int(counts.sum()) and (counts > 0).all()
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(log_probs)), atol=1e-5)
