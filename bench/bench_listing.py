"""Listing many runs: ``analysis.list_runs`` of N runs against the floor of reading their
``run.json`` files (issue 24, "Scale").

Makes N hard-linked copies of a sample run in a temporary folder (no data copied), as a
finished run leaves itself: with the listing record in ``run.json``
(``RunDir.listing_record``, written by the run recorder at the end of a run), then times

* ``list_runs`` of the folder (best of ``--repeat``);
* the floor: reading and parsing the N ``run.json`` files (best of ``--repeat``);

and prints both and the ratio (goal: at most 20x). ``--legacy K`` also lists K copies
without the record (runs written before it: their logs and checkpoints are read).

    python -m bench.bench_listing [--runs 300] [--source sample_checkpoints/runs/spider]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis import list_runs  # noqa: E402
from spider import rundir  # noqa: E402


def link_tree(source: Path, target: Path, *, copy: tuple[str, ...] = ()) -> None:
    """``target`` as a tree of hard links to the files of ``source`` (``copy``: relative
    paths copied instead, so they can be changed)."""
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith("."):
                continue
            src, dst = Path(folder) / name, target / relative / name
            if str(relative / name) in copy:
                shutil.copy2(src, dst)
            else:
                os.link(src, dst)


def finished_copy(source: Path, target: Path) -> Path:
    """A hard-linked copy of ``source`` whose run.json holds the listing record, as the run
    recorder writes it when the run ends."""
    link_tree(source, target, copy=(rundir.RUN_FILE,))
    run = rundir.RunDir(target)
    info = run.read_run()
    info[rundir.LISTING_KEY] = run.listing_record()
    run.write_run(info)
    return target


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def read_run_files(paths: list[Path]) -> int:
    return sum(len(json.loads((p / rundir.RUN_FILE).read_bytes())) for p in paths)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--source", type=Path, default=REPO / "sample_checkpoints/runs/spider")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--legacy", type=int, default=20,
                        help="also list this many copies without the listing record")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        tmp = Path(tmp)
        template = finished_copy(args.source, tmp / "template")
        root = tmp / "runs"
        paths = []
        for index in range(args.runs):
            link_tree(template, root / f"run-{index:04d}")
            paths.append(root / f"run-{index:04d}")
        read_run_files(paths)  # warm the page cache for both
        floor, _ = best(lambda: read_run_files(paths), args.repeat)
        listing, frame = best(lambda: list_runs(root), args.repeat)
        assert len(frame) == args.runs and frame["ok"].all(), frame.loc[~frame["ok"], "problem"]
        result = {"runs": args.runs, "list_runs_s": listing, "read_run_json_s": floor,
                  "ratio": listing / floor}
        print(f"list_runs of {args.runs} finished runs: {listing * 1e3:.1f} ms "
              f"({listing / args.runs * 1e3:.2f} ms a run)")
        print(f"reading their {args.runs} run.json files: {floor * 1e3:.1f} ms")
        print(f"ratio: {listing / floor:.1f}x (goal <= 20x)")
        if args.legacy:
            legacy_root = tmp / "legacy"
            for index in range(args.legacy):
                link_tree(args.source, legacy_root / f"run-{index:04d}")
            old, frame = best(lambda: list_runs(legacy_root), 1)
            assert frame["ok"].all(), frame.loc[~frame["ok"], "problem"]
            per_run = old / args.legacy
            result.update(legacy_per_run_s=per_run)
            print(f"runs without the listing record (logs read): {per_run * 1e3:.1f} ms a run, "
                  f"{per_run * args.runs / floor:.0f}x the floor at {args.runs} runs")
    return result


if __name__ == "__main__":
    main()
