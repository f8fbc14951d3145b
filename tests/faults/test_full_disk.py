"""A disk that fills while a run writes: one clear error, status ``failed``, the checkpoints
written before intact, and ``--resume`` (once there is room) ends where an uninterrupted run
ends.

Two ways to fill it: a real size-limited file system (a tmpfs mounted for the test; needs
the right to mount, so it runs where the tests run as root), and, everywhere, a checkpoint
file write that gets part of the file out and then fails with ENOSPC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from harness import (
    TINY,
    Trainer,
    differences,
    leftovers,
    missing,
    read_back,
    record,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_failed_cleanly(path: Path, child: Trainer, code: int, reference,
                          step: int | None = None) -> tuple[list[str], list[str]]:
    """``(problems, data lost)`` of a run that met a full disk (empty lists: none); when
    ``step`` is given, the write failed after that step, and the message and run.json's
    progress must both say so."""
    problems = []
    output = child.output()
    lines = [line for line in output.splitlines() if line.strip()]
    if code != 1:
        problems.append(f"exit code {code}, not 1 (a run that failed)")
    if "Traceback" in output:
        problems.append("a traceback was printed")
    if not lines or not lines[-1].startswith("failed: "):
        problems.append(f"the last line is not one 'failed:' sentence: {lines[-1:]}")
    elif "space" not in lines[-1].lower():
        problems.append(f"the message does not say the disk is full: {lines[-1]}")
    found = read_back(path)
    if found.status != "failed":
        problems.append(f"status {found.status}, not failed")
    info = json.loads((path / "run.json").read_text())
    if "space" not in str(info.get("error", "")).lower():
        problems.append(f"run.json's error does not say the disk is full: {info.get('error')}")
    if step is not None:
        if f"after step {step};" not in (lines or [""])[-1]:
            problems.append(f"the message does not name step {step}: {lines[-1:]}")
        if info.get("progress", {}).get("step") != step:
            problems.append(f"run.json's progress says step {info.get('progress')}, not {step}")
    if not found.checkpoints:
        problems.append("no checkpoint before the disk filled (the test's size is wrong)")
    lost = differences(found, reference)  # every complete checkpoint equals the reference
    return problems + lost, lost


def _resume_to_the_end(path: Path, log: Path, reference) -> tuple[list[str], list[str]]:
    """``(problems, data lost)`` of ``--resume`` once there is room again."""
    child = Trainer(["--output-dir", str(path), "--resume"], log)
    code = child.wait()
    if code != 0:
        return [f"--resume after freeing space exited {code}: {child.output()[-1500:]}"], []
    found = read_back(path)
    lost = differences(found, reference) + [f"lacks {m}" for m in missing(found, reference)]
    return lost + [f"left {n}" for n in leftovers(path)], lost


def test_a_checkpoint_write_failing_with_enospc_fails_the_run_cleanly(tmp_path, reference):
    ref, _ = reference
    problems, lost, tried = [], [], 0
    # each save writes 5 safetensors files: the checkpoint's weights and method state, then
    # the resume state's weights, method state and optimizer. The 3rd is inside the step-2
    # resume state (after the step-2 checkpoint), the 7th inside the step-4 checkpoint.
    for on_call, step in ((3, 2), (7, 4)):
        tried += 1
        path = tmp_path / f"run-{on_call}"
        child = Trainer(["--output-dir", str(path), *TINY], tmp_path / f"{on_call}.log",
                        faults={"enospc_on_save_call": on_call})
        code = child.wait()
        for stage, (found, gone) in (
                ("", _check_failed_cleanly(path, child, code, ref, step)),
                (", then --resume", _resume_to_the_end(path, tmp_path / f"{on_call}-r.log",
                                                       ref))):
            problems += [f"ENOSPC at file write {on_call}{stage}: {p}" for p in found]
            lost += gone
    record("a checkpoint file write fails with ENOSPC (part of the file written)", "full disk",
           tried, "exit 1, one 'failed:' line naming the full disk and the step the weights "
           "reached (as run.json's progress does), status failed, earlier checkpoints equal to the uninterrupted run's; --resume then ends like it",
           problems, data_lost=len(lost))
    assert not problems, problems


def _mount_tmpfs(where: Path, size_bytes: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}",
                           f"spiderscope-{uuid.uuid4().hex[:8]}", str(where)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _checkpoint_bytes(reference) -> int:
    return sum(f.stat().st_size for f in (reference.path / "checkpoints" / "step-000002").iterdir())


def test_a_full_file_system_fails_the_run_cleanly_and_keeps_earlier_checkpoints(
        tmp_path, reference):
    ref, _ = reference
    mount = tmp_path / "small"
    checkpoint = _checkpoint_bytes(ref)
    # room for the step-2 checkpoint and resume state (about 3 checkpoints' worth) and the
    # step-4 checkpoint, not for the step-4 resume state written next to the step-2 one
    size = int(5 * checkpoint)
    if not _mount_tmpfs(mount, size):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights); the ENOSPC "
                    "test above covers the runner's handling")
    try:
        path = mount / "run"
        child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "full.log")
        code = child.wait()
        problems, lost = _check_failed_cleanly(path, child, code, ref)
        statvfs = os.statvfs(mount)
        free_after = statvfs.f_bavail * statvfs.f_frsize
        # make room, as a person would (here: a larger file system), and continue
        subprocess.run(["mount", "-o", f"remount,size={20 * checkpoint}", str(mount)],
                       check=True)
        resumed, gone = _resume_to_the_end(path, tmp_path / "r.log", ref)
        problems += [f"--resume: {p}" for p in resumed]
        record(f"the run directory's file system fills up (a tmpfs of {size / 2**20:.0f} MiB)",
               "full disk", 1, "exit 1, one 'failed:' line naming the full disk, status "
               "failed, earlier checkpoints equal to the uninterrupted run's; --resume after "
               "enlarging it ends like an uninterrupted run", problems,
               data_lost=len(lost) + len(gone), free_bytes_after_failure=free_after)
        assert not problems, problems
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)

