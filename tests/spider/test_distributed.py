"""Several processes (torchrun, gloo on CPU) train the same model as one process.

A 2-process step takes micro-batches 0 and 1 of the single-process order, so a 2-process run
with ``--grad-accum 1`` must equal a 1-process run with ``--grad-accum 2`` (same global
batch), up to float rounding of the gradient average: under DDP (replicated model), and
under FSDP2 (sharded parameters, where SPIDER's per-tensor sums are all-reduced).

"Up to rounding" allows for SPIDER's tie: an entry with I within rounding of G may take the
other side of the mask in the other run (see ``ties.py``); such entries must be few and must
have sat at the tie, and everything else agrees to rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ties import TieFlips, spider_tie_flips

from spider.methods.spider import SpiderOptions, keep_weight
from spider.train import DEFAULT_MODEL

STEPS = 4
# a checkpoint every step: SPIDER's masks are compared at the step where they first differ
COMMON = ["--steps", str(STEPS), "--eval-every", str(STEPS), "--save-every", "1",
          "--log-every", "1", "--eval-limit", "8", "--batch-size", "4", "--train-size", "64",
          "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _single(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spider.train", *COMMON, "--grad-accum", "2",
                           "--output-dir", str(out), *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)


def _torchrun_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "spider.train", *COMMON, "--grad-accum", "1", "--output-dir", str(out),
            *extra]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(out, *extra), capture_output=True, text=True, env=ENV,
                          timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _group(run: Path, step: int, group: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / f"{group}.safetensors")


def _train_losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def _layers(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "layers.jsonl").read_text().splitlines()]


def _spider_flips(a: Path, b: Path) -> dict[str, TieFlips]:
    """Mask-side differences of two SPIDER runs at every step (empty for other methods)."""
    if json.loads((a / "run.json").read_text())["method"] != "spider":
        return {}
    from spider.models import load_model

    theta0 = {n: p.detach() for n, p in load_model(DEFAULT_MODEL)[0].named_parameters()}

    def sums(run: Path) -> list[dict[str, torch.Tensor]]:  # S keyed "grad_sum/<param>"
        return [{k.split("/", 1)[-1]: t for k, t in _group(run, s, "method").items()}
                for s in range(1, STEPS + 1)]

    flips = spider_tie_flips(theta0, sums(a), sums(b))
    far = [f"{name}: {line}" for name, f in flips.items() for line in f.far_from_tie]
    assert not far, "mask flips away from the tie I = G:\n" + "\n".join(far)
    flipped = sum(int(f.ever.sum()) for f in flips.values())
    entries = sum(f.ever.numel() for f in flips.values())
    assert flipped <= max(3, 1e-4 * entries), f"{flipped} of {entries} entries flipped"
    return flips


def _assert_same_run(a: Path, b: Path, step: int = STEPS) -> dict[str, TieFlips]:
    """Same losses, weights, SPIDER state and per-tensor statistics, up to rounding (and,
    for SPIDER, up to the few entries whose mask flipped at the tie I = G)."""
    assert _train_losses(a) == pytest.approx(_train_losses(b), rel=1e-5)
    flips = _spider_flips(a, b)
    for group in ("weights", "method"):
        ta, tb = _group(a, step, group), _group(b, step, group)
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            if not ta[key].is_floating_point():  # e.g. HFT's frozen-entry flags
                assert torch.equal(ta[key], tb[key]), key
                continue
            name = key.split("/", 1)[-1]  # method state is keyed "<group>/<param>"
            keep = ~flips[name].ever if name in flips else torch.ones_like(ta[key], dtype=bool)
            scale = float(ta[key].abs().max()) or 1.0
            assert torch.allclose(ta[key][keep], tb[key][keep], rtol=0, atol=2e-5 * scale), key
    rows_a, rows_b = _layers(a), _layers(b)
    assert [(r["step"], r["param"], r["numel"]) for r in rows_a] == \
           [(r["step"], r["param"], r["numel"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        flipped = flips[ra["param"]].per_step[ra["step"] - 1] if ra["param"] in flips else 0
        for key in ("mask_mean", "mask_density", "importance_ft_mean", "update_norm",
                    "theta0_norm"):
            nan = float("nan")  # methods without masks or importances log none
            # a flipped entry moves the tensor's mean mask by up to 1/numel and its update
            rel, absolute = (1e-4, 1e-7) if not flipped else (1e-2, flipped / ra["numel"])
            assert ra.get(key, nan) == pytest.approx(rb.get(key, nan), rel=rel, abs=absolute,
                                                     nan_ok=True), (ra["param"], key)
    return flips


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    _ok(_single(out, "--method", "spider"))
    return out


def test_ddp_two_processes_train_like_one_with_the_same_global_batch(single_run, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(out, "--method", "spider")
    _ok(proc)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done"
    assert info["parallel"] == {"mode": "ddp", "world_size": 2}
    # only process 0 writes: one line per step, no duplicates
    assert len(_train_losses(out)) == STEPS
    _assert_same_run(single_run, out)
    # and the runs moved: equality between two runs that did nothing would prove nothing
    from spider.models import load_model

    base = dict(load_model(DEFAULT_MODEL)[0].named_parameters())
    moved = [n for n, t in _group(out, STEPS, "weights").items()
             if not torch.equal(t, base[n].detach())]
    assert len(moved) > 10


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "hft", "l2"])
def test_ddp_equals_one_process_for_other_methods(method, tmp_path):
    """LoRA (a PEFT-wrapped model under DDP), HFT (seeded random freezing on every process)
    and L2 (a loss penalty) take the same steps on 2 processes as on one."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _ok(_single(single, "--method", method))
    _ok(_torchrun(ddp, "--method", method))
    _assert_same_run(single, ddp)


def test_fsdp_shards_get_the_masks_of_whole_tensors(single_run, tmp_path):
    out = tmp_path / "fsdp"
    _ok(_torchrun(out, "--method", "spider", "--parallel", "fsdp"))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["parallel"]["mode"] == "fsdp"
    _assert_same_run(single_run, out)
    # _assert_same_run compared the masks rebuilt from each run's S and theta0 at every
    # step; here: every tensor was sharded in two along dim 0, and a shard's statistics alone
    # would have given another mask, so it is the all-reduce that makes them agree.
    from spider.models import load_model

    base, _ = load_model(DEFAULT_MODEL)
    theta0 = dict(base.named_parameters())
    s_one = _group(single_run, STEPS, "method")
    compared = 0
    for key, grad_sum in s_one.items():
        name = key.split("/", 1)[-1] if "/" in key else key
        if grad_sum.shape[0] < 2:
            continue
        w_one, _ = keep_weight(theta0[name].detach(), grad_sum, SpiderOptions())
        half = grad_sum.shape[0] // 2
        w_shard, _ = keep_weight(theta0[name].detach()[:half], grad_sum[:half], SpiderOptions())
        if not torch.allclose(w_shard, w_one[:half], atol=1e-3):
            compared += 1
    assert compared > 0  # per-shard statistics would indeed have changed the masks


@pytest.mark.slow
def test_fsdp_run_stopped_by_sigterm_resumes_to_the_same_end(single_run, tmp_path):
    out = tmp_path / "fsdp-resume"
    proc = subprocess.Popen(_torchrun_cmd(out, "--method", "spider", "--parallel", "fsdp"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        layers = out / "layers.jsonl"
        if layers.exists() and '"step": 2,' in layers.read_text():
            break
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] in ("cancelled", "done")
    if info["status"] == "cancelled":
        _ok(_torchrun(out, "--method", "spider", "--parallel", "fsdp", "--resume"))
    _assert_same_run(single_run, out)


def test_fsdp_refuses_a_method_that_cannot_handle_shards(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spider.train", *COMMON, "--method", "lora",
                           "--parallel", "fsdp", "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--parallel fsdp: method 'lora' does not support sharded parameters" in proc.stderr


def test_resume_with_another_number_of_processes_is_refused(single_run, tmp_path):
    out = tmp_path / "cut"
    # a run cut short: copy the single-process run, drop its end, mark it cancelled
    import shutil

    shutil.copytree(single_run, out)
    info = json.loads((out / "run.json").read_text())
    info.update(status="cancelled", parallel={"mode": "ddp", "world_size": 2})
    (out / "run.json").write_text(json.dumps(info))
    proc = subprocess.run([sys.executable, "-m", "spider.train", "--output-dir", str(out),
                           "--resume"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "was made with 2 process(es), not 1" in proc.stderr


def test_unknown_parallel_mode_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spider.train", "--parallel", "mpi",
                           "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "--parallel must be one of auto, none, ddp, fsdp, not 'mpi'" in proc.stderr
