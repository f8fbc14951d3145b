"""Run the fault-injection suite (tests/faults) and write RELIABILITY.md from what it recorded.

    .venv/bin/python scripts/make_reliability_report.py            # the suite as in make test
    .venv/bin/python scripts/make_reliability_report.py --slow     # with its slow variants
    .venv/bin/python scripts/make_reliability_report.py --from results.jsonl   # no run
    .venv/bin/python scripts/make_reliability_report.py --mutations             # + planted bugs
    .venv/bin/python scripts/make_reliability_report.py --from R --mutations-from M.json

Each test of the suite appends JSON lines to the file named by ``SPIDER_FAULTS_RESULTS``:
one per fault or bad input it tried (what, how many times, the outcome it found, the data
it found lost) and one per test with its pytest outcome (tests/faults/conftest.py). This
script only groups and counts those lines; nothing in the report is typed by hand except
the fixed text of ``KNOWN_LIMITS``. With ``--mutations`` it also runs
``scripts/mutation_check.py`` (one planted bug per promise of ARCHITECTURE.md, each in a
temporary copy of the repository) and adds its table; ``--mutations-from`` takes the JSON an
earlier ``mutation_check.py --json`` wrote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_ENV = "SPIDER_FAULTS_RESULTS"

CATEGORY_ORDER = ["process killed", "full disk", "concurrent readers",
                  "statistics agree with checkpoints", "damaged files",
                  "arbitrary input (hypothesis)", "numeric edge", "security"]

KNOWN_LIMITS = """\
- A bit flipped inside the tensor data of a safetensors file (not its header) is not
  detected: safetensors stores no checksum, so the reader returns the changed value.
  Flips in the header (its length, names, dtypes, shapes, offsets) are tested above.
- The real full-disk test mounts a small tmpfs, which needs root and mount rights; where
  the suite runs without them that row is reported as skipped, and the portable ENOSPC
  injection (a checkpoint file write that fails after writing part of the file) stands
  for it.
- SIGKILLs of `test_kill_resume.py` are placed by time and by watching the run directory
  (a temporary checkpoint folder appearing, run.json saying an evaluation is under way), so
  their split across moments varies between runs of the suite. Those of
  `test_kill_at_events.py` are placed by counting the run's file changes (Python audit
  events and safetensors writes at their Python call), so they do not depend on the names
  the code chooses; a kill lands before an event or just after it returns, never in the
  middle of one system call (a torn line inside a single write is covered by the readers'
  unit tests and the damaged-file rows).
- The planted bugs are text replacements of specific lines; when the code they target
  moves, `scripts/mutation_check.py` stops and names the bug to re-express rather than
  report it caught.
"""


def run_suite(results: Path, slow: bool, workers: int) -> tuple[int, float]:
    """Run tests/faults with the results file set; (pytest's exit code, seconds)."""
    marker = "faults" if slow else "faults and not slow"
    command = [sys.executable, "-m", "pytest", "tests/faults", "-m", marker, "-q",
               "-p", "no:randomly", "-n", str(workers)]
    env = {**os.environ, RESULTS_ENV: str(results)}
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env)
    return done.returncode, time.monotonic() - started


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _merge(rows: list[dict], tests: dict) -> dict:
    """One row of the table from the records of one fault (a test split into parts writes
    one record per part): tries and data lost added up, counts of where things landed
    added up, the outcome of the first part, or every part's that was not as expected."""
    merged = dict(rows[0])
    merged["tries"] = sum(int(r["tries"]) for r in rows)
    merged["data_lost"] = sum(int(r["data_lost"]) for r in rows)
    merged["ok"] = all(r.get("ok", True) for r in rows)
    merged["results"] = sorted({tests.get(r["test"], {}).get("outcome", "did not finish")
                                for r in rows})
    if len(rows) > 1:
        if not merged["ok"]:
            merged["outcome"] = " / ".join(r["outcome"] for r in rows if not r.get("ok", True))
        elif all("landed" in r for r in rows):
            landed = defaultdict(int)
            for r in rows:
                for where, n in r["landed"].items():
                    landed[where] += n
            chains = sum(int(r.get("chains", 0)) for r in rows)
            merged["outcome"] = (
                f"every kill read back whole; {chains} chains, each resumed to the end of the "
                "uninterrupted run. Kills landed: "
                + ", ".join(f"{n} {w}" for w, n in sorted(landed.items(), key=lambda x: -x[1])))
        merged["outcome"] += f" ({len(rows)} parts)"
    return merged


def run_mutations(output: Path) -> int:
    """Run scripts/mutation_check.py, its results to ``output``; its exit code."""
    command = [sys.executable, str(ROOT / "scripts" / "mutation_check.py"), "--json",
               str(output)]
    return subprocess.run(command, cwd=ROOT).returncode


def _short_test(node: str) -> str:
    """A test's node id without ``tests/`` and with a long function name cut short."""
    path, _, name = node.removeprefix("tests/").partition("::")
    if len(name) > 48:
        name = name[:40] + "…" + (name[name.index("["):] if "[" in name else "")
    return f"{path}::{name}" if name else path


def render_mutations(mutations: dict) -> list[str]:
    """The planted-bugs section from what mutation_check.py wrote."""
    results = mutations["results"]
    caught = sum(r["caught"] for r in results)
    out = ["## Planted bugs", "",
           "`scripts/mutation_check.py` plants one bug per promise of ARCHITECTURE.md in a "
           "temporary copy of the repository and runs the tests that guard that promise "
           "(first on the unpatched copy, where they pass). A bug is caught when one of them "
           f"fails. {caught} of {len(results)} planted bugs caught; the check took "
           f"{mutations['seconds']:.0f} s.", "",
           "| planted bug | promise it breaks | caught | tests that guard it | pytest | seconds |",
           "| --- | --- | --- | --- | --- | ---: |"]
    for r in results:
        tests = "<br>".join(f"`{_cell(_short_test(t))}`" for t in r["tests"])
        out.append(f"| {_cell(r['bug'])} (`{r['file']}`) | {_cell(r['promise'])} | "
                   f"{'yes' if r['caught'] else '**no**'} | {tests} | {_cell(r['pytest'])} | "
                   f"{r['seconds']:.0f} |")
    return out + [""]


def render(lines: list[dict], seconds: float | None, slow: bool,
           mutations: dict | None = None) -> str:
    tests = {r["test"]: r for r in lines if r.get("kind") == "test"}
    grouped = defaultdict(list)
    for r in lines:
        if r.get("kind") == "fault":
            grouped[(r["category"], r["fault"])].append(r)
    faults = [_merge(rows, tests) for rows in grouped.values()]
    cpu = sum(r["process_s"] + r["children_s"] for r in lines if r.get("kind") == "cpu")
    counts = defaultdict(int)
    for test in tests.values():
        counts[test["outcome"]] += 1
    by_category = defaultdict(list)
    for row in faults:
        by_category[row["category"]].append(row)
    order = CATEGORY_ORDER + sorted(set(by_category) - set(CATEGORY_ORDER))

    out = ["# Reliability", "",
           "What the fault-injection suite (`tests/faults/`) did to Spiderscope and what came "
           "of it. **Generated** by `scripts/make_reliability_report.py` from the records the "
           "suite's tests write while they run; do not edit by hand. To regenerate:", "",
           "    .venv/bin/python scripts/make_reliability_report.py          # as in make test",
           "    .venv/bin/python scripts/make_reliability_report.py --slow   # slow variants too",
           "",
           f"Last generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
           f"at commit {_git_commit()} on {platform.machine()} Linux with {os.cpu_count()} "
           f"CPUs, Python {platform.python_version()}"
           + (f"; the suite took {seconds:.0f} s" if seconds is not None else "")
           + (f" and {cpu:.0f} CPU seconds (test processes and the training processes they "
              f"started, whatever else ran on the machine)" if cpu else "")
           + ("; slow variants included." if slow else "; slow variants not included."), "",
           f"Tests: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
           f"{counts.get('skipped', 0)} skipped. Faults and bad inputs tried: {len(faults)} "
           f"kinds, {sum(int(r['tries']) for r in faults)} tries in all; data lost: "
           f"{sum(int(r['data_lost']) for r in faults)}.", ""]
    out += ["\"Data lost\" counts what a test found gone or different afterwards, by "
            "comparison in every row: a complete checkpoint tensor, event or statistics row "
            "that differs from the same run never interrupted, or is missing once the run is "
            "continued to its end; a statistics row that does not describe its checkpoint; a "
            "read of an undamaged file that no longer gives the undamaged value; a file that "
            "an operation which must not write (a refused run, a reader, a scan) changed. It "
            "must be 0.", ""]
    for category in order:
        rows = by_category.get(category)
        if not rows:
            continue
        out += [f"## {category[0].upper()}{category[1:]}", "",
                "| fault or bad input | tries | outcome | data lost | test |",
                "| --- | ---: | --- | ---: | --- |"]
        for row in sorted(rows, key=lambda r: r["fault"]):
            result = ", ".join(row["results"])
            out.append(f"| {_cell(row['fault'])} | {row['tries']} | {_cell(row['outcome'])} | "
                       f"{row['data_lost']} | {result} |")
        out.append("")
    skipped = [t for t in tests.values() if t["outcome"] == "skipped"]
    if skipped:
        out += ["## Skipped here", ""]
        out += [f"- `{t['test']}`: {t.get('reason') or 'skipped'}" for t in skipped]
        out.append("")
    failed = [t for t in tests.values() if t["outcome"] == "failed"]
    if failed:
        out += ["## Failed", ""] + [f"- `{t['test']}`" for t in failed] + [""]
    if mutations:
        out += render_mutations(mutations)
    out += ["## Time per test", "", "| test | seconds | result |", "| --- | ---: | --- |"]
    out += [f"| `{_cell(t['test'].removeprefix('tests/faults/'))}` | {t['seconds']:.1f} | "
            f"{t['outcome']} |" for t in sorted(tests.values(), key=lambda t: -t["seconds"])]
    out += ["", "## Known limits", "", KNOWN_LIMITS]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path,
                        help="a results file written by an earlier run (no tests are run)")
    parser.add_argument("--slow", action="store_true", help="include the slow variants")
    parser.add_argument("--workers", type=int, default=2, help="pytest -n (default 2)")
    parser.add_argument("--output", type=Path, default=ROOT / "RELIABILITY.md")
    parser.add_argument("--mutations", action="store_true",
                        help="also run scripts/mutation_check.py and add its table")
    parser.add_argument("--mutations-from", type=Path,
                        help="the JSON of an earlier `mutation_check.py --json` run")
    args = parser.parse_args(argv)
    code, seconds = 0, None
    if args.source is not None:
        results = args.source
    else:
        results = Path(tempfile.mkstemp(prefix="spider-faults-", suffix=".jsonl")[1])
        code, seconds = run_suite(results, args.slow, args.workers)
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if not lines:
        print(f"error: {results} holds no records; was the suite run?", file=sys.stderr)
        return 2
    slow = args.slow or any(r.get("slow") for r in lines if r.get("kind") == "test")
    mutations = None
    if args.mutations:
        found = Path(tempfile.mkstemp(prefix="spider-mutations-", suffix=".json")[1])
        code = run_mutations(found) or code
        args.mutations_from = found
    if args.mutations_from is not None:
        mutations = json.loads(args.mutations_from.read_text())
    args.output.write_text(render(lines, seconds, slow, mutations))
    print(f"wrote {args.output} ({sum(1 for r in lines if r.get('kind') == 'fault')} records)")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
