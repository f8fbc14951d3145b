"""A one-page, printable handout for a class demo (``python -m analysis.handout``).

::

    python -m analysis.handout [RUN ...] -o handout.html

``RUN`` is a run directory, or a folder searched for runs (as for ``analysis.report``);
without any, the bundled sample runs ``spider`` and ``full``. The page holds three things a
presenter points at: the SPIDER rule in five lines, the forgetting curve (old-task and
new-task score over training, every run), and the layer heatmap of the first SPIDER run (the
share of each layer's weights free to move, per logged step). It is one HTML file that opens
offline: plotly.js is inlined once, nothing is fetched; ``@media print`` lays it out on one
A4 or Letter page (figures at a fixed width of 180 mm, no page break inside a figure).

The pieces come from :mod:`analysis.report` (how a run list is expanded, how a figure is
embedded, how the layers heatmap is drawn on its absolute scale) and :mod:`analysis.figures`,
so the handout shows what the app and the report show.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from analysis import explore, figures
from analysis.report import _expand, _figure, html_head, report_tables, run_labels
from analysis.run import Run, load_run
from spider import rundir
from spider.errors import CliParser, UserError, cli_main

SAMPLE_RUNS = tuple(Path(__file__).resolve().parents[1] / "sample_checkpoints" / "runs" / name
                    for name in ("spider", "full"))
"""The runs a handout shows when none is given: the bundled SPIDER and full fine-tuning."""

HEATMAP_VALUE = "mask_density"
"""The heatmap's statistic: the Layers page's default view (share free to move, w > 0)."""

# 96 CSS px per inch: 180 mm = 680 px, inside A4's 210 mm and Letter's 216 mm less margins;
# the heights keep title, rule and both figures within Letter's 279 mm less margins.
_WIDTH_PX = 680
_CURVE_HEIGHT_PX = 260
_HEATMAP_HEIGHT_PX = 280

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       width: 180mm; margin: 1rem auto; font-size: 10pt; line-height: 1.3; }
h1 { font-size: 16pt; margin: 0 0 0.2rem; } h2 { font-size: 12pt; margin: 0.6rem 0 0.2rem; }
p { margin: 0.2rem 0; } p.meta, p.note { color: #555; font-size: 9pt; }
.rule { display: grid; grid-template-columns: auto 1fr; gap: 0.1rem 1rem;
        border: 1px solid #ccc; border-radius: 4px; padding: 0.3rem 0.6rem;
        font-size: 9.5pt; line-height: 1.2; }
.rule .eq { font-family: "STIX Two Math", "Cambria Math", Georgia, serif; white-space: nowrap; }
.figure { margin: 0.2rem 0; break-inside: avoid; page-break-inside: avoid; }
@page { size: auto; margin: 10mm; }
@media print {
  body { margin: 0; }
  .modebar-container { display: none !important; }
}
"""

# the rule, as the Learn page writes it (ARCHITECTURE.md, "The SPIDER rule"), one line each
_RULE = (
    ("I = rank(θ0)", "how much pre-training relied on a weight (its size, ranked in its tensor)"),
    ("G = rank(S), S = Σₜ gₜ", "how much the new task wants it (the summed gradients, ranked)"),
    ("rank(x) = σ((|x| − mean|x|) / std|x|)", "a 0–1 rank: the sigmoid of the z-score of |x|"),
    ("w = G / (I + G) if G > I, else 0",
     "the keep-weight, then divided by the mean of the non-zero w and capped at 1"),
    ("θ ← θ0 (1 − w) + θ w", "after every optimizer step: w = 0 puts the weight back to θ0"),
)


def _as_runs(runs: Iterable[Run | str | os.PathLike] | None) -> list[Run]:
    chosen = list(runs) if runs is not None else list(SAMPLE_RUNS)
    if not chosen:
        raise UserError("a handout needs at least one run")
    return [r if isinstance(r, Run) else load_run(r) for r in chosen]


def _curve(metrics: pd.DataFrame, train: pd.DataFrame, colors: dict[str, str]) -> str:
    if metrics.empty:
        return '<p class="note">None of these runs has evaluation scores yet.</p>'
    curves = explore.score_curves_frame(metrics, train)
    fig = figures.compare_score_curves(curves, colors)
    fig.update_layout(width=_WIDTH_PX, height=_CURVE_HEIGHT_PX, margin={"t": 50, "b": 30},
                      title={"text": "Old task (forgetting) and new task over training"},
                      legend={"orientation": "h", "y": -0.3, "title": {"text": ""}})
    return _figure(fig)


def _final_scores(metrics: pd.DataFrame) -> str:
    """One sentence: each run's old-task score at its first and last scored step."""
    if metrics.empty:
        return ""
    curves = explore.score_curves_frame(metrics, None, splits=("upstream",))
    parts = []
    for run, mine in curves.groupby("run", sort=False):
        mine = mine.sort_values("step")
        parts.append(f"{html.escape(str(run))} {mine['score'].iloc[0]:.2f} → "
                     f"{mine['score'].iloc[-1]:.2f}")
    return ('<p class="note">Old-task score, first → last evaluation: ' + "; ".join(parts)
            + ". The lower it falls, the more the run forgot.</p>")


def _heatmap(runs: Sequence[Run], labels: Sequence[str], layers: pd.DataFrame) -> str:
    spider = [(r, label) for r, label in zip(runs, labels) if r.method.startswith("spider")]
    if not spider:
        return ('<p class="note">No SPIDER run among these, so no mask to show: add a run '
                "trained with --method spider.</p>")
    run, label = spider[0]
    mine = layers[layers["run"] == label]
    if mine.empty:
        return f'<p class="note">{html.escape(label)} has logged no layer statistics yet.</p>'
    matrix = explore.layer_step_matrix(mine, HEATMAP_VALUE)
    zrange = figures.heatmap_range(HEATMAP_VALUE, matrix[HEATMAP_VALUE], "absolute")
    fig = figures.layer_step_heatmap(
        matrix, HEATMAP_VALUE, zrange,
        title=f"{html.escape(label)}: share of each layer's weights free to move (w > 0)")
    fig.update_layout(width=_WIDTH_PX, height=_HEATMAP_HEIGHT_PX, margin={"t": 45, "b": 30})
    words = figures.range_words(HEATMAP_VALUE, zrange, "absolute", run.method)
    return _figure(fig) + f'<p class="note">{html.escape(words)}</p>'


def render_handout(runs: Iterable[Run | str | os.PathLike] | None = None,
                   title: str = "SPIDER: fine-tuning without forgetting") -> str:
    """The handout as one HTML string (plotly.js inlined once; no external resources)."""

    runs = _as_runs(runs)
    labels = run_labels(runs)
    colors = figures.run_colors(labels)
    tables = report_tables(runs, labels=labels)
    metrics, layers = tables["metrics"], tables["layers"]
    rule = "".join(f'<div class="eq">{html.escape(eq)}</div><div>{html.escape(what)}</div>'
                   for eq, what in _RULE)
    names = ", ".join(f"{html.escape(label)} ({html.escape(run.method)})"
                      for run, label in zip(runs, labels))
    parts = [
        *html_head(title, _CSS),
        '<p class="meta">Fine-tuning a model on a new task moves its weights away from what '
        "pre-training put there, and it gets worse at its old tasks: it <b>forgets</b>. "
        "SPIDER lets a weight move only where the new task values it more than pre-training "
        f"did. Runs: {names}.</p>",
        "<h2>The rule, for each weight tensor</h2>",
        f'<div class="rule">{rule}</div>',
        "<h2>The forgetting curve</h2>",
        _curve(metrics, tables["train"], colors),
        _final_scores(metrics),
        "<h2>Where SPIDER let the weights move</h2>",
        _heatmap(runs, labels, layers),
        '<p class="meta">Made by <code>python -m analysis.handout</code> (Spiderscope).</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def write_handout(runs: Iterable[Run | str | os.PathLike] | None, path: str | os.PathLike
                  ) -> Path:
    """Write :func:`render_handout` to ``path`` atomically and return the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"-o {path} is a folder; give a file name such as handout.html")
    document = render_handout(runs)
    try:
        rundir.atomic_write_bytes(path, document.encode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot write the handout to {path}: {err.strerror or err}") from None
    return path


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m analysis.handout",
        description="Write a one-page printable HTML handout (the SPIDER rule, the forgetting "
                    "curve, the layer heatmap) from fine-tuning runs.")
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directory, or a folder searched for run directories "
                             "(default: the bundled sample runs spider and full)")
    parser.add_argument("--output", "-o", default="handout.html",
                        help="HTML file to write (default: handout.html)")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    runs = _expand(args.runs) if args.runs else None
    path = write_handout(runs, args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
