"""Plant one bug per promise of ARCHITECTURE.md in a copy of the repository and check that
the tests guarding that promise catch it.

    .venv/bin/python scripts/mutation_check.py                  # every planted bug
    .venv/bin/python scripts/mutation_check.py --only in-place-checkpoint --keep
    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py --dry-run        # do the bugs still apply?

Each bug is a set of exact text replacements in the product code (each target must occur
exactly once in the file, else the script stops and says which: the code moved and the bug
must be re-expressed). Nothing in this checkout is changed: the repository is copied to a
temporary folder (``.venv``, ``.git`` and caches left out), the copy is patched, and the
guarding tests run there with this checkout's Python (the copy's own ``spider`` first on the
path). First the guarding tests run on the unpatched copy and must pass; then each bug is
caught when at least one of its tests fails. The last line says ``N of N planted bugs
caught``; the exit status is 1 when any bug survives (or the unpatched copy fails).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache",
                                 ".ruff_cache", "node_modules", "*.pyc", ".hypothesis")

KILLS = "tests/faults/test_kill_at_events.py"
KILL_PART_0 = f"{KILLS}::test_sigkill_at_file_events_then_resume_reaches_the_uninterrupted_end[0]"
KILL_PART_1 = f"{KILLS}::test_sigkill_at_file_events_then_resume_reaches_the_uninterrupted_end[1]"
RUNDIR_TESTS = "tests/spider/test_rundir.py"


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    promise: str  # the promise of ARCHITECTURE.md it breaks
    file: str
    replacements: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]  # node ids of the tests that guard the promise
    # the same bug in other shapes of the code (file, replacements): the first shape whose
    # every target text occurs exactly once is applied
    alternatives: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


BUGS = (
    Bug("in-place-checkpoint",
        "whole or absent: a checkpoint folder is built aside and renamed into place",
        "spider/rundir.py",
        (("    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + final.name + \".\", "
          "dir=final.parent))\n",
          "    tmp = final  # PLANTED: written in place\n    tmp.mkdir(exist_ok=True)\n"),
         ("        swap_into_place(tmp, final)\n    except BaseException:\n"
          "        shutil.rmtree(tmp, ignore_errors=True)\n",
          "        pass\n    except BaseException:\n")),
        (KILL_PART_0, KILL_PART_1)),
    Bug("run-json-without-rename",
        "whole or absent: every file is written under a temporary name and renamed",
        "spider/rundir.py",
        (("        atomic_write_json(self.run_file, {\"schema_version\": SCHEMA_VERSION, "
          "**body})\n",
          "        self.run_file.parent.mkdir(parents=True, exist_ok=True)  # PLANTED\n"
          "        self.run_file.write_text(json.dumps({\"schema_version\": SCHEMA_VERSION, "
          "**body}, indent=2) + \"\\n\")\n"),),
        (KILL_PART_0, KILL_PART_1, "tests/faults/test_readers_during_writes.py")),
    Bug("resume-skips-optimizer",
        "exact resume: --resume after a kill reaches bit-identical weights",
        "spider/hooks.py",
        (("        self.optimizer.load_state_dict(found.optimizer_state(\n"
          "            lambda index, tensor: _like_param(tensor.to(self.device), "
          "params[index])))\n",
          "        pass  # PLANTED: the optimizer state is not restored\n"),),
        (KILL_PART_0, KILL_PART_1)),
    Bug("resume-skips-method-state",
        "exact resume: --resume after a kill reaches bit-identical weights",
        "spider/hooks.py",
        (("            self.method.load_state_dict(found.method)\n",
          "            pass  # PLANTED: the method state is not restored\n"),),
        (KILL_PART_0, KILL_PART_1)),
    Bug("torn-last-line-not-skipped",
        "a torn last line of a .jsonl log (a killed run) is skipped by readers",
        "spider/rundir.py",
        (("            if number == len(lines):\n                break  # the last line of a "
          "killed run\n",
          "            if False:  # PLANTED: a torn last line is an error\n                break\n"),),
        (f"{RUNDIR_TESTS}::test_events_skip_a_torn_last_line_and_truncate_for_resume",
         "tests/analysis/test_run.py::test_a_running_run_with_a_torn_last_line_loads")),
    Bug("heartbeat-never-written",
        "lifecycle: a heartbeat rewritten every 10 s by a daemon thread",
        "spider/rundir.py",
        (("                with self._lock:\n                    self._write()\n"
          "            except OSError:\n",
          "                pass  # PLANTED: the heartbeat thread writes nothing\n"
          "            except OSError:\n"),),
        (f"{RUNDIR_TESTS}::test_the_heartbeat_thread_keeps_run_json_fresh_and_readable",),
        alternatives=(("spider/rundir.py", (
            ("    def _beat(self) -> None:\n        with self._lock:\n            self._write()\n",
             "    def _beat(self) -> None:\n        pass  # PLANTED: the heartbeat writes nothing\n"),
        )),)),
    Bug("swap-not-recovered",
        "whole or absent: a kill between the two renames of a swap is undone on --resume",
        "spider/rundir.py",
        (("    if not final.exists() and (old / CHECKPOINT_META).exists():\n"
          "        os.replace(old, final)\n",
          "    if False:  # PLANTED: an interrupted swap is not recovered\n"
          "        os.replace(old, final)\n"),),
        (f"{RUNDIR_TESTS}::test_a_kill_between_the_renames_of_a_resume_swap_loses_no_state",
         KILL_PART_0, KILL_PART_1)),
    Bug("statistics-before-finalize",
        "statistics agree with checkpoints: the final step's rows are taken after finalize",
        "spider/train.py",
        (("        method.finalize()\n        statistics.log_final(step)\n",
          "        statistics.log_final(step)  # PLANTED: before finalize\n"
          "        method.finalize()\n"),),
        ("tests/faults/test_statistics_agree.py",)),
)


class PatchError(RuntimeError):
    pass


def copy_repository(source: Path, into: Path) -> Path:
    target = into / "repo"
    shutil.copytree(source, target, ignore=IGNORED, symlinks=True)
    return target


def apply(bug: Bug, repo: Path) -> str:
    """Apply ``bug`` to the copy at ``repo`` (the first of its shapes whose every target
    text occurs exactly once); the file it changed."""
    failures = []
    for name, replacements in ((bug.file, bug.replacements), *bug.alternatives):
        file = repo / name
        text = file.read_text() if file.exists() else ""
        counts = [text.count(old) for old, _ in replacements]
        if counts != [1] * len(replacements):
            failures.append(f"{name}: {counts}")
            continue
        for old, new in replacements:
            text = text.replace(old, new)
        file.write_text(text)
        return name
    raise PatchError(f"{bug.name}: its target texts do not occur exactly once (times found, "
                     f"per shape: {'; '.join(failures)}); re-express the bug")


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    """Run ``tests`` in the copy; (all passed, pytest's summary line, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests/faults")]),
           "OMP_NUM_THREADS": "1", "SPIDER_FAULTS_FAIL_FAST": "1"}
    env.pop("SPIDER_FAULTS_RESULTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
               "-p", "no:cacheprovider", "-m", "not slow", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    return done.returncode == 0, summary, time.monotonic() - started


def check_imports_copy(repo: Path) -> None:
    """The copy's own spider must be the one imported there (not this checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    where = subprocess.run([sys.executable, "-c", "import spider; print(spider.__file__)"],
                           cwd=repo, env=env, capture_output=True, text=True, check=True)
    if not Path(where.stdout.strip()).resolve().is_relative_to(repo.resolve()):
        raise RuntimeError(f"the copy imports spider from {where.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="a bug's name (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the bugs and their tests")
    parser.add_argument("--dry-run", action="store_true",
                        help="only check that every bug still applies to the code")
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="the repository to copy (default: this checkout)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the guarding tests on the unpatched copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    if args.only and len(bugs) != len(args.only):
        parser.error(f"unknown bug; known: {', '.join(b.name for b in BUGS)}")
    if args.list:
        for bug in bugs:
            print(f"{bug.name}: {bug.promise}\n  {bug.file}; tests: {', '.join(bug.tests)}")
        return 0
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="spider-mutants-"))
    results, code = [], 0
    try:
        pristine = copy_repository(args.source, work / "pristine")
        check_imports_copy(pristine)
        for bug in bugs:  # every target text is found before anything runs
            apply(bug, copy_repository(pristine, work / f"check-{bug.name}"))
            shutil.rmtree(work / f"check-{bug.name}")
        if args.dry_run:
            print(f"all {len(bugs)} planted bugs apply to {args.source}")
            return 0
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
            ok, summary, seconds = run_tests(pristine, tests, args.timeout * 2)
            print(f"unpatched copy: {'passed' if ok else 'FAILED'} ({summary}; {seconds:.0f} s)",
                  flush=True)
            if not ok:
                print("the guarding tests fail without a planted bug: nothing to conclude",
                      file=sys.stderr)
                code = 1
        for bug in bugs:
            repo = copy_repository(pristine, work / bug.name)
            changed_file = apply(bug, repo)
            passed, summary, seconds = run_tests(repo, bug.tests, args.timeout)
            caught = not passed
            results.append({"bug": bug.name, "promise": bug.promise, "file": changed_file,
                            "tests": list(bug.tests), "caught": caught, "pytest": summary,
                            "seconds": round(seconds, 1)})
            print(f"{bug.name}: {'caught' if caught else 'SURVIVED'} ({summary}; "
                  f"{seconds:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(repo, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"copies kept in {work}")
    caught = sum(r["caught"] for r in results)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "seconds":
                                         round(time.monotonic() - started, 1)}, indent=2))
    print(f"mutation check took {time.monotonic() - started:.0f} s")
    print(f"{caught} of {len(results)} planted bugs caught")
    return 1 if code or caught < len(results) else code


if __name__ == "__main__":
    raise SystemExit(main())
