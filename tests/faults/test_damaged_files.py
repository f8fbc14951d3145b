"""Damaged run files: the reader names the damaged file, and the rest of the run still reads.

Each case damages one file of a copy of the finished tiny run, then tries every read the
app and a notebook make. A read that needs the damaged file must raise a ``UserError`` whose
message names it; every other read must succeed and return exactly what it returns on the
undamaged run; ``list_runs`` must flag the run (``ok`` False, ``problem`` naming the file)
when a file is damaged, and never raise.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from harness import TINY, Trainer, record, wait_for

import analysis
from spider.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

STEP_DIR = {s: f"checkpoints/step-{s:06d}" for s in (2, 4, 6)}


def _reads(param: str) -> dict[str, Callable]:
    """Every read of a run that the damage cases try, by name."""
    reads = {
        "load_run": lambda p: analysis.load_run(p).config,
        "metrics": lambda p: analysis.load_run(p).metrics,
        "train": lambda p: analysis.load_run(p).train,
        "summary": lambda p: analysis.load_run(p).summary,
        "layers": lambda p: analysis.load_run(p).layers,
        "steps": lambda p: analysis.load_run(p).steps,
    }
    for step in (2, 4, 6):
        reads[f"weight@{step}"] = lambda p, s=step: analysis.load_run(p).tensor(s, param, "weight")
        reads[f"mask@{step}"] = lambda p, s=step: analysis.load_run(p).tensor(s, param, "mask")
    return reads


def _same(a, b) -> bool:
    if isinstance(a, pd.DataFrame):
        return a.equals(b)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _replace_line(file: Path, index: int, text: str) -> None:
    lines = file.read_text().splitlines(keepends=True)
    lines[index] = text + "\n"
    file.write_text("".join(lines))


def _first_train_line(file: Path) -> int:
    lines = file.read_text().splitlines()
    return next(i for i, line in enumerate(lines) if '"event": "train"' in line)


# name -> (what to do to the run, the file the errors must name, reads that must fail,
#          whether list_runs must flag the run[, reads that return something else: value])
CASES = {
    "weights.safetensors truncated": (
        lambda r: _truncate(r / STEP_DIR[4] / "weights.safetensors"),
        f"{STEP_DIR[4]}/weights.safetensors", {"weight@4", "mask@4"}, True),
    "method.safetensors truncated": (
        lambda r: _truncate(r / STEP_DIR[6] / "method.safetensors", 0.9),
        f"{STEP_DIR[6]}/method.safetensors", {"mask@6"}, True),
    "safetensors header length garbage": (
        lambda r: (r / STEP_DIR[2] / "weights.safetensors").write_bytes(
            b"\xff" * 8 + (r / STEP_DIR[2] / "weights.safetensors").read_bytes()[8:]),
        f"{STEP_DIR[2]}/weights.safetensors", {"weight@2", "mask@2"}, True),
    "safetensors file empty": (
        lambda r: (r / STEP_DIR[4] / "method.safetensors").write_bytes(b""),
        f"{STEP_DIR[4]}/method.safetensors", {"mask@4"}, True),
    # the weights file is whole: its tensor still reads; the mask needs the metadata
    "checkpoint meta.json not JSON": (
        lambda r: (r / STEP_DIR[4] / "meta.json").write_text('{"step": 4, "gro'),
        f"{STEP_DIR[4]}/meta.json", {"mask@4"}, True),
    "checkpoint folder missing": (
        lambda r: shutil.rmtree(r / STEP_DIR[4]),
        "step 4", {"weight@4", "mask@4"}, False, {"steps": [2, 6]}),
    "checkpoint file missing": (
        lambda r: (r / STEP_DIR[6] / "weights.safetensors").unlink(),
        f"{STEP_DIR[6]}/weights.safetensors", {"weight@6", "mask@6"}, True),
    "metrics.jsonl line malformed": (
        lambda r: _replace_line(r / "metrics.jsonl", 3, '{"event": "train", "step": 2, "lo'),
        "metrics.jsonl", {"metrics", "train", "summary"}, True),
    "metrics.jsonl row with a wrong type": (
        lambda r: _replace_line(r / "metrics.jsonl", 0, '{"event": "eval", "step": "zero", '
                                '"split": "upstream", "metric": "score", "value": 1}'),
        "metrics.jsonl", {"metrics", "summary"}, True),
    # every line is valid JSON, but a row lacks the fields a table needs
    "metrics.jsonl train row without a step": (
        lambda r: _replace_line(r / "metrics.jsonl", _first_train_line(r / "metrics.jsonl"),
                                '{"event": "train", "loss": null}'),
        "metrics.jsonl", {"train"}, True),
    "layers.jsonl empty row": (
        lambda r: _replace_line(r / "layers.jsonl", 5, "{}"),
        "layers.jsonl", {"layers"}, True),
    "layers.jsonl line malformed": (
        lambda r: _replace_line(r / "layers.jsonl", 5, "not json at all"),
        "layers.jsonl", {"layers"}, True),
    "layers.jsonl binary garbage": (
        lambda r: (r / "layers.jsonl").write_bytes(b"\x00\xff\xfe garbage\n" * 3 +
                                                   (r / "layers.jsonl").read_bytes()),
        "layers.jsonl", {"layers"}, True),
    "run.json truncated": (
        lambda r: _truncate(r / "run.json"),
        "run.json", {"load_run", "metrics", "train", "summary", "layers", "steps",
                     *(f"{k}@{s}" for k in ("weight", "mask") for s in (2, 4, 6))}, True),
}


def _try(reads, path) -> dict:
    out = {}
    for name, read in reads.items():
        try:
            out[name] = ("ok", read(path))
        except UserError as err:
            out[name] = ("error", str(err))
        except Exception as err:  # noqa: BLE001 - a crash is the finding
            out[name] = ("crash", f"{type(err).__name__}: {err}")
    return out


@pytest.fixture(scope="module")
def pristine(reference):
    ref, _ = reference
    param = next(n for n in ref.checkpoints[6]["weights"] if "layers.3.mlp.down_proj" in n)
    reads = _reads(param)
    results = _try(reads, ref.path)
    assert all(kind == "ok" for kind, _ in results.values()), results
    return ref.path, reads, results


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_file_is_named_and_the_rest_of_the_run_reads(tmp_path, pristine, case):
    source, reads, expected = pristine
    damage, culprit, must_fail, flagged, *changed = CASES[case]
    expected = {**expected, **{k: ("ok", v) for k, v in (changed[0] if changed else {}).items()}}
    root = tmp_path / "runs"
    path = root / source.name
    shutil.copytree(source, path)
    shutil.copytree(source, root / "healthy")
    damage(path)
    problems, lost = [], []  # lost: what the undamaged files no longer give
    for name, (kind, value) in _try(reads, path).items():
        if kind == "crash":
            problems.append(f"{name}: not a clear error: {value}")
        elif name in must_fail:
            if kind == "ok":
                problems.append(f"{name} read without an error")
            elif culprit not in value:
                problems.append(f"{name}: the error does not name {culprit}: {value}")
        elif kind == "error":
            lost.append(f"{name} failed although it does not need the damaged file: "
                        f"{value}")
        elif not _same(value, expected[name][1]):
            lost.append(f"{name} returned something else than on the undamaged run")
    try:
        listed = analysis.list_runs(root).set_index("name")
        row = listed.loc[path.name]
        if flagged and (row["ok"] or culprit not in row["problem"]):
            problems.append(f"list_runs does not flag the damage: ok={row['ok']}, "
                            f"problem={row['problem']!r}")
        if not listed.loc["healthy", "ok"]:
            lost.append(f"list_runs flags the healthy run: {listed.loc['healthy', 'problem']}")
    except Exception as err:  # noqa: BLE001 - list_runs must never raise for a bad run
        problems.append(f"list_runs raised {type(err).__name__}: {err}")
    record(f"damaged file: {case}", "damaged files", 1,
           f"reads needing it ({len(must_fail)}) name it; the other "
           f"{len(reads) - len(must_fail)} reads equal the undamaged run's"
           + ("; list_runs flags the run" if flagged else ""),
           problems + lost, data_lost=len(lost))
    assert not problems + lost, problems + lost


def test_random_bit_flips_in_a_safetensors_header_are_errors_or_harmless(tmp_path, pristine):
    """A flipped bit in a checkpoint file's header (its length or its JSON) is either an
    error naming the file (or, for a tensor's name, the checkpoint) or changes nothing that
    is read: never wrong tensors. (A flip in the tensor data itself goes unnoticed:
    safetensors has no checksum; see RELIABILITY.md.)"""
    source, reads, expected = pristine
    file_rel = f"{STEP_DIR[4]}/weights.safetensors"
    original = (source / file_rel).read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    rng = random.Random(13)
    outcomes, problems = {}, []
    flips = 60
    path = tmp_path / source.name
    shutil.copytree(source, path)
    for _ in range(flips):
        position = rng.randrange(header_end)
        damaged = bytearray(original)
        damaged[position] ^= 1 << rng.randrange(8)
        (path / file_rel).write_bytes(bytes(damaged))
        for name in ("weight@4", "mask@4"):
            try:
                value = reads[name](path)
            except UserError as err:
                # a flip in a tensor's name: "checkpoint step 4 ... holds no tensor for ..."
                kind = ("named in the error" if file_rel in str(err) or "step 4" in str(err)
                        else "error")
                if kind == "error":
                    problems.append(f"flip at {position}: {name}: error without the file: {err}")
            except Exception as err:  # noqa: BLE001 - a crash is the finding
                kind = "crash"
                problems.append(f"flip at {position}: {name}: {type(err).__name__}: {err}")
            else:
                kind = "harmless (equal tensors)"
                if not torch.equal(value, expected[name][1]):
                    kind = "wrong tensor"
                    problems.append(f"flip at {position}: {name} returned a wrong tensor")
            outcomes[kind] = outcomes.get(kind, 0) + 1
    record("a random bit flipped in a checkpoint file's safetensors header", "damaged files",
           flips, "each read an error naming the file or an unchanged tensor: "
           + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())), problems,
           data_lost=outcomes.get("wrong tensor", 0), outcomes=outcomes)
    assert not problems, problems[:10]


def test_resume_from_a_damaged_resume_state_is_one_error_naming_the_file(tmp_path, reference):
    """A resume state damaged on disk: --resume refuses with one line naming the file and
    writes nothing; the checkpoints stay as they were."""
    _, duration = reference
    path = tmp_path / "run"
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log")
    meta = path / "resume" / "meta.json"
    wait_for(lambda: meta.exists() or not child.alive(), duration * 4, every=0.005)
    child.kill()
    assert meta.exists(), child.output()[-2000:]
    damaged = path / "resume" / "optimizer.safetensors"
    _truncate(damaged)
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    child = Trainer(["--output-dir", str(path), "--resume"], tmp_path / "resume.log")
    code = child.wait()
    lines = [line for line in child.output().splitlines() if line.strip()]
    problems = []
    if code != 2:
        problems.append(f"exit {code}, not 2")
    if "Traceback" in child.output():
        problems.append("a traceback was printed")
    if not lines or not lines[-1].startswith("error: ") or "optimizer.safetensors" not in \
            lines[-1]:
        problems.append(f"the last line does not name the file: {lines[-1:]}")
    after = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    changed = sorted(str(f.relative_to(path)) for f in before.keys() | after.keys()
                     if before.get(f) != after.get(f))
    if changed:
        problems.append(f"files changed by the refused resume: {changed}")
    record("--resume from a resume state with a truncated file", "damaged files", 1,
           "exit 2, one 'error:' line naming the file, nothing in the run changed", problems,
           data_lost=len(changed))
    assert not problems, problems
