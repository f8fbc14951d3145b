"""A self-contained HTML report comparing runs (``python -m analysis.report``).

::

    python -m analysis.report RUN [RUN ...] --output report.html [--csv DIR] [--title TEXT]

``RUN`` is a run directory, or a folder searched for runs (every readable run found under it
is included; damaged ones are skipped with a note on stderr). The report holds, for the
chosen runs: which runs they are, the summary table (U, D, H, E, F, O), the 2x2
generalisation cells, the score curves, the trade-off plane and, per run, the layer x step
heatmap of the share of weights free to move. plotly.js is inlined once, so the file opens
offline and can be mailed; for the seven sample runs it weighs about 5 MB, almost all of it
plotly.js. ``--csv DIR`` also writes the tables behind it (summary, cells, metrics, train,
layers) as CSV files.

Compute comes from :mod:`analysis.stats` and :mod:`analysis.explore`, drawing from
:mod:`analysis.figures`, the functions the app's pages draw with (colour per run, marker per
method, the same heatmaps): this module only lays them out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis import explore, figures, stats
from analysis.overview import options_text
from analysis.run import Run, list_runs, load_run
from spider import rundir
from spider.errors import CliParser, UserError, cli_main

CSV_TABLES = ("summary", "cells", "metrics", "train", "layers")
"""Files ``--csv`` writes: ``DIR/<name>.csv``."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
p.note, p.meta { color: #555; } p.meta { margin-top: 0; font-size: 0.9rem; }
table.data { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0 1rem;
             display: block; max-width: 100%; overflow-x: auto; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
table.data th { background: #f4f4f4; text-align: left; }
table.data td { text-align: right; font-variant-numeric: tabular-nums; }
table.data td:first-child, table.data td.text { text-align: left; }
table.data td.text { overflow-wrap: anywhere; min-width: 5rem; }
.figure { margin: 1rem 0 2rem; }
"""


# --------------------------------------------------------------------------------------------
# Runs and their frames
# --------------------------------------------------------------------------------------------


def _as_runs(runs: Iterable[Run | str | os.PathLike]) -> list[Run]:
    out = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not out:
        raise UserError("a report needs at least one run")
    return out


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A unique label per run: its folder name, or ``parent/name`` where names repeat."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    labels = [f"{r.path.resolve().parent.name}/{r.name}" if names.count(r.name) > 1 else r.name
              for r in runs]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return unique


def _frames(runs: Sequence[Run], labels: Sequence[str], what: str) -> pd.DataFrame:
    """One of ``metrics | train | layers`` of every run, concatenated, run = its label."""
    parts = []
    for run, label in zip(runs, labels):
        frame = getattr(run, what)
        parts.append(frame.assign(run=label) if label != run.name else frame)
    non_empty = [p for p in parts if not p.empty]
    if not non_empty:
        return parts[0].iloc[0:0]
    return pd.concat(non_empty, ignore_index=True)


def report_tables(runs: Iterable[Run | str | os.PathLike], base: str | None = None,
                  labels: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """The tables behind a report: :data:`CSV_TABLES` -> DataFrame.

    ``summary`` is :func:`analysis.stats.summary_table` (gains measured from each run's own
    step 0, or from the run labelled ``base``), ``cells`` :func:`analysis.stats.cells_table`,
    ``metrics`` / ``train`` / ``layers`` the runs' frames one after another.
    """
    runs = _as_runs(runs)
    labels = list(labels) if labels is not None else run_labels(runs)
    metrics = _frames(runs, labels, "metrics")
    if metrics.empty:
        summary = pd.concat([r.summary.assign(run=label) for r, label in zip(runs, labels)],
                            ignore_index=True)
        cells = pd.DataFrame(columns=list(stats.CELLS_COLUMNS))
    else:
        summary = stats.summary_table(metrics, base=base)
        cells = stats.cells_table(metrics)
    return {
        "summary": summary,
        "cells": cells,
        "metrics": metrics,
        "train": _frames(runs, labels, "train"),
        "layers": _frames(runs, labels, "layers"),
    }


def export_csv(runs: Iterable[Run | str | os.PathLike], directory: str | os.PathLike,
               base: str | None = None) -> list[Path]:
    """Write :func:`report_tables` as ``DIR/<table>.csv`` (atomically, via
    :func:`analysis.stats.to_csv`); returns the files written."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--csv {directory} is a file; give a folder for the CSV tables")
    tables = report_tables(runs, base=base)
    try:
        return [stats.to_csv(tables[name], directory / f"{name}.csv") for name in CSV_TABLES]
    except OSError as err:
        raise UserError(f"cannot write CSV tables to {directory}: {err.strerror or err}") from None


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------


def _table(frame: pd.DataFrame, digits: int = 3, text_columns: Sequence[str] = ()) -> str:
    """A DataFrame as an escaped HTML table, floats to ``digits`` decimals, NaN as "–"."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                text = "–"
            elif isinstance(value, float):
                text = f"{value:.{digits}f}" if math.isfinite(value) else str(value)
            else:
                text = str(value)
            css = ' class="text"' if column in text_columns else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="data"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')



def html_head(title: str, css: str) -> list[str]:
    """The opening of a self-contained page (the report, the handout): its title, its style
    and plotly.js inline, so it opens offline; then the body's heading."""
    from plotly.offline import get_plotlyjs

    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>", f"<style>{css}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head><body>", f"<h1>{html.escape(title)}</h1>"]

def _figure(fig) -> str:
    body = fig.to_html(full_html=False, include_plotlyjs=False,
                       default_height=f"{fig.layout.height or 480}px",
                       config={"displaylogo": False, "responsive": True})
    return f'<div class="figure">{body}</div>'


def _runs_table(runs: Sequence[Run], labels: Sequence[str]) -> pd.DataFrame:
    rows = []
    for run, label in zip(runs, labels):
        info = run.info
        progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
        options = options_text(run.method, run.options, only_changed=False)
        rows.append({
            "run": label, "method": run.method, "options": options, "status": run.status,
            "steps": f"{progress.get('step', '?')} / {run.config.get('steps', '?')}",
            "checkpoints": ", ".join(map(str, run.steps)) or "–",
            "data": str(run.config.get("data", "")), "path": str(run.path),
        })
    return pd.DataFrame(rows)


def _mask_section(run: Run, label: str, layers: pd.DataFrame) -> str:
    title = f"<h3>{html.escape(label)} ({html.escape(run.method)})</h3>"
    mine = layers[layers["run"] == label]
    values = pd.to_numeric(mine["mask_density"], errors="coerce") if not mine.empty else None
    if values is None or values.isna().all():
        return title + ('<p class="note">No mask recorded: this method has no per-weight '
                        "keep-weight (or no statistics were logged).</p>")
    if (values.dropna() == 1.0).all() and (
            pd.to_numeric(mine["mask_mean"], errors="coerce").dropna() == 1.0).all():
        return title + ('<p class="note">Every weight is free to move at every logged step '
                        "(w = 1 everywhere): nothing is pinned to θ0.</p>")
    # the Layers page's heatmap, on its default (absolute) scale
    matrix = explore.layer_step_matrix(mine, "mask_density")
    zrange = figures.heatmap_range("mask_density", matrix["mask_density"], "absolute")
    return (title + _figure(figures.layer_step_heatmap(matrix, "mask_density", zrange))
            + f'<p class="note">{html.escape(figures.range_words("mask_density", zrange, "absolute"))}</p>')


def render_report(runs: Iterable[Run | str | os.PathLike], title: str = "Spiderscope report",
                  base: str | None = None, labels: Sequence[str] | None = None,
                  colors: Mapping[str, str] | None = None) -> str:
    """The report as one HTML string (plotly.js inlined once; no external resources).

    ``labels``: a name per run (default :func:`run_labels`); ``colors``: label -> colour (default
    :func:`analysis.figures.run_colors` in the order given). The app passes its own, so that a
    run looks the same in the report as on its pages.
    """

    runs = _as_runs(runs)
    labels = list(labels) if labels is not None else run_labels(runs)
    if len(labels) != len(runs) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must name each run once; got {labels}")
    colors = {**figures.run_colors(labels), **(colors or {})}
    tables = report_tables(runs, base=base, labels=labels)
    metrics, layers = tables["metrics"], tables["layers"]
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    base_text = (f"the scores of run {html.escape(base)} at its first step" if base else
                 "each run's own step-0 scores (the base model, evaluated before training)")

    parts = [
        *html_head(title, _CSS),
        f'<p class="meta">{len(runs)} run(s); generated {generated} by '
        "<code>python -m analysis.report</code>.</p>",
        "<h2>Runs</h2>",
        _table(_runs_table(runs, labels), text_columns=("method", "options", "status", "steps",
                                                        "checkpoints", "data", "path")),
        "<h2>Summary</h2>",
        '<p class="note">At each run\'s last step scored on both: U = upstream score '
        "(pre-training ability kept), D = downstream score (task learned), H = 2UD/(U+D); "
        f"E = D − D<sub>base</sub> (gain), F = U − U<sub>base</sub> (forgetting when "
        f"negative), O = E + F, measured from {base_text}.</p>",
        _table(tables["summary"], text_columns=("method",)),
        "<h2>2×2 generalisation cells</h2>",
    ]
    cells = explore.cells_long(metrics) if not metrics.empty else pd.DataFrame()
    if cells.empty:
        parts.append('<p class="note">No run scored the 2×2 cells (in/out-of-distribution '
                     "images × questions).</p>")
    else:
        parts += ['<p class="note">Score per cell at each run\'s last scored step: image '
                  "in/out of the training distribution (idimg/oodimg) × question in/out of "
                  "it (idq/oodq). <code>idimg-idq</code> is the downstream test split itself, "
                  "so its score is the run's downstream score D.</p>",
                  _figure(figures.cells_heatmap(cells, "score")),
                  _table(explore.cells_wide(cells, "score"), text_columns=("method",))]
    parts.append("<h2>Scores over training</h2>")
    if metrics.empty:
        parts.append('<p class="note">No run has evaluation scores yet.</p>')
    else:
        curves = explore.score_curves_frame(metrics, tables["train"])
        symbols = {label: figures.method_symbol(run.method) for run, label in zip(runs, labels)}
        parts += [_figure(figures.compare_score_curves(curves, colors)),
                  "<h2>Trade-off plane</h2>",
                  _figure(figures.tradeoff_plane(metrics, colors=colors, symbols=symbols))]
    parts += ["<h2>Where weights may move: mask density per layer</h2>",
              '<p class="note">Share of each layer\'s weights with keep-weight w &gt; 0 at '
              "each logged step (1 = free to move, 0 = pinned to θ0).</p>"]
    parts += [_mask_section(run, label, layers) for run, label in zip(runs, labels)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(runs: Iterable[Run | str | os.PathLike], path: str | os.PathLike,
                 title: str = "Spiderscope report", base: str | None = None) -> Path:
    """Write the HTML report of ``runs`` to ``path`` atomically (a reader never sees half a
    file) and return the path. ``base``: a run label whose first scored step is the
    reference for E, F, O (default: each run's own step 0)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name such as report.html")
    document = render_report(runs, title=title, base=base)
    try:
        rundir.atomic_write_bytes(path, document.encode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot write the report to {path}: {err.strerror or err}") from None
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _expand(arguments: Sequence[str]) -> list[Run]:
    """Run directories as given; a folder without run.json stands for the runs under it."""
    runs: list[Run] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir() and not (path / rundir.RUN_FILE).exists():
            found = list_runs(path)
            if found.empty:
                raise UserError(f"{path} is neither a run directory nor a folder holding runs")
            for row in found.itertuples(index=False):
                if row.ok:
                    runs.append(load_run(row.path))
                else:
                    print(f"skipped {row.path}: {row.problem}", file=sys.stderr)
        else:
            runs.append(load_run(path))
    if not runs:
        raise UserError("none of the given runs can be read")
    return runs


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m analysis.report",
        description="Write a self-contained HTML report comparing fine-tuning runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directory, or a folder searched for run directories")
    parser.add_argument("--output", "-o", default="report.html",
                        help="HTML file to write (default: report.html)")
    parser.add_argument("--csv", metavar="DIR",
                        help=f"also write the tables ({', '.join(CSV_TABLES)}) as CSV files here")
    parser.add_argument("--title", default="Spiderscope report", help="the report's title")
    parser.add_argument("--base", metavar="RUN_LABEL",
                        help="measure E, F, O from this run's first scored step instead of "
                             "each run's own step 0")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    runs = _expand(args.runs)
    if args.base is not None and args.base not in run_labels(runs):
        raise UserError(f"--base {args.base!r} is not one of the runs: "
                        f"{', '.join(run_labels(runs))}")
    path = write_report(runs, args.output, title=args.title, base=args.base)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(runs)} runs)")
    if args.csv:
        for file in export_csv(runs, args.csv, base=args.base):
            print(f"wrote {file}")
    return path


if __name__ == "__main__":
    main()
